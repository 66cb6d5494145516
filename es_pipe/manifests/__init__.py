"""Parquet shard manifests: one file per shard per epoch, committed by a marker written last.

The package, one concept per module:

* :mod:`~es_pipe.manifests.fs`: the root's filesystem, every call retried under
  ``retry=`` and every file written whole;
* :mod:`~es_pipe.manifests.layout`: where each file goes, and the path checks;
* :mod:`~es_pipe.manifests.codec`: the schema (``es_pipe/schemas/manifest.json``), the
  Parquet encoding and the checks of markers and done-files;
* :mod:`~es_pipe.manifests.reader`: :class:`ManifestReader`, the public read API;
* :mod:`~es_pipe.manifests.writer`: one rank's staged files and done-file;
* :mod:`~es_pipe.manifests.commit`: the commit protocol (rank 0);
* :mod:`~es_pipe.manifests.lease`: attempts and the one-job-per-root lease;
* :mod:`~es_pipe.manifests.fingerprints`: a shard's fingerprint as manifests record it;
* :mod:`~es_pipe.manifests.root`: :class:`Manifests`, all of the above for one run.
"""

from es_pipe.manifests.codec import (
    StateBits,
    arrow_schema,
    build_table,
    encode_table,
    file_meta,
    schema_spec,
    schema_version,
)
from es_pipe.manifests.fingerprints import fingerprint, fingerprints_match
from es_pipe.manifests.fs import ManifestFS
from es_pipe.manifests.layout import COMMITS, LEASE, STAGING, safe_name
from es_pipe.manifests.reader import ManifestReader, ShardManifest, manifests_dataset
from es_pipe.manifests.root import Manifests, run_fingerprint

__all__ = [
    "COMMITS",
    "LEASE",
    "STAGING",
    "ManifestFS",
    "ManifestReader",
    "Manifests",
    "ShardManifest",
    "StateBits",
    "arrow_schema",
    "build_table",
    "encode_table",
    "file_meta",
    "fingerprint",
    "fingerprints_match",
    "manifests_dataset",
    "run_fingerprint",
    "safe_name",
    "schema_spec",
    "schema_version",
]
