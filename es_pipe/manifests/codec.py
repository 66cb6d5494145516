"""The manifest schema and its codec: score-store columns to a Parquet file and back, and
the checks of the JSON files (commit markers, done-files) that name those files.

``es_pipe/schemas/manifest.json`` is the single source of truth; the code builds the Arrow
schema from it and refuses files of another schema version. No pickle. The codec knows
nothing of pruning: the bit layout of the per-sample pruning ``state`` byte is passed in
(:class:`StateBits`) by whoever owns it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from es_pipe.errors import ConfigError, ManifestError
from es_pipe.manifests.fs import load_json
from es_pipe.manifests.layout import check_entry

MARKER_FORMAT = "es_pipe.commit"
DONE_FORMAT = "es_pipe.done"
MARKER_FIELDS = ("shard", "path", "rows", "pruned", "repruned", "size", "crc32")
DECODED = ("score", "loss", "visits", "step", "pruned", "streak", "weight")
_TYPES = {
    "string": pa.string(),
    "dictionary<int32,string>": pa.dictionary(pa.int32(), pa.string()),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "uint32": pa.uint32(),
    "uint8": pa.uint8(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
}
_ENTRY_TYPES = {"shard": str, "path": str, "size": int, "crc32": int}
_DONE_TYPES = {"shard": str, "path": str, "staged": str, "rows": int, "size": int, "crc32": int}


class StateBits(NamedTuple):
    """The layout of the per-sample pruning ``state`` byte: the bits holding the streak
    (epochs in a row pruned) and the bit marking a kept sample whose loss is upweighted."""

    streak: int
    upweight: int


@lru_cache(maxsize=1)
def schema_spec() -> dict[str, Any]:
    """The manifest schema, as stored in ``es_pipe/schemas/manifest.json``."""
    text = resources.files("es_pipe").joinpath("schemas/manifest.json").read_text("utf-8")
    return json.loads(text)


def schema_version() -> int:
    """The schema version this es_pipe writes and reads."""
    return int(schema_spec()["version"])


@lru_cache(maxsize=1)
def arrow_schema() -> pa.Schema:
    """The Arrow schema every manifest file has (without file metadata). Built once: every
    shard's table of every epoch is built against it (Arrow schemas are immutable)."""
    return pa.schema(
        [
            pa.field(field["name"], _TYPES[field["type"]], nullable=field["nullable"])
            for field in schema_spec()["fields"]
        ]
    )


@lru_cache(maxsize=1)
def es_pipe_version() -> str:
    """The version of es_pipe that writes a file (recorded in it)."""
    from es_pipe import __version__

    return __version__


def build_table(
    shard: str,
    columns: Mapping[str, np.ndarray],
    *,
    bits: StateBits,
    keys: pa.Array | None = None,
    factor: float = 1.0,
) -> pa.Table:
    """The manifest table of one shard (schema: :func:`arrow_schema`) from per-ordinal
    ``score, loss, visits, step`` and the uint8 pruning ``state`` laid out as ``bits``.

    Column-wise numpy and Arrow only (it runs once per shard at every epoch end, inside
    the commit); the numeric columns are wrapped, not copied, where their dtype fits."""
    rows = len(columns["score"])
    if keys is not None and len(keys) != rows:
        raise ConfigError(f"shard {shard!r}: {len(keys)} keys for {rows} rows")
    state = columns.get("state")
    if state is None:
        state = np.zeros(rows, np.uint8)
    else:
        state = np.asarray(state, np.uint8)
        if len(state) < rows:
            state = np.concatenate([state, np.zeros(rows - len(state), np.uint8)])
        state = state[:rows]
    streak = state & np.uint8(bits.streak)
    weight = np.full(rows, 1.0, np.float32)
    weight[(state & np.uint8(bits.upweight)) != 0] = np.float32(factor)
    shard_col = pa.DictionaryArray.from_arrays(  # indices all 0: nothing to check
        pa.array(np.zeros(rows, np.int32)), pa.array([shard], pa.string()), safe=False
    )
    arrays = [
        shard_col,
        pa.nulls(rows, pa.string()) if keys is None else keys.cast(pa.string()),
        pa.array(np.arange(rows, dtype=np.int64)),
        pa.array(np.asarray(columns["score"], np.float32)),
        pa.array(np.asarray(columns["loss"], np.float32)),
        pa.array(np.asarray(columns["visits"], np.uint32)),
        pa.array(np.asarray(columns["step"], np.int32)),
        pa.array(streak != 0),
        pa.array(streak),
        pa.array(weight),
    ]
    return pa.Table.from_arrays(arrays, schema=arrow_schema())


def encode_table(table: pa.Table, meta: Mapping[str, Any]) -> pa.Buffer:
    """Parquet bytes of ``table`` with es_pipe's file metadata."""
    key = schema_spec()["metadata_key"]
    table = table.replace_schema_metadata({key: json.dumps(meta, sort_keys=True)})
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="lz4",
        use_dictionary=["shard"],
        # ordinals 0..n-1: delta-packed they take a few bytes a page instead of 8 a row,
        # and encode faster than plain + lz4 (any Parquet reader decodes them)
        column_encoding={"row": "DELTA_BINARY_PACKED"},
        write_statistics=["row", "pruned"],
    )
    return sink.getvalue()


def decode_columns(table: pa.Table, path: str) -> dict[str, np.ndarray]:
    """The per-ordinal numpy columns of a manifest table read whole (:data:`DECODED`);
    a table whose rows are not ``0..n-1`` in order is refused."""
    rows = table.column("row").to_numpy()
    if len(rows) and not (rows[0] == 0 and rows[-1] == len(rows) - 1):
        raise ManifestError(
            f"{path}: rows are not 0..n-1 in order; not an es_pipe manifest. Restore the file, "
            "or delete its epoch's commit marker to fall back to the previous epoch"
        )
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in DECODED}


def decode_file(
    data: bytes, columns: list[str] | None, path: str
) -> tuple[pa.Table, dict[str, Any]]:
    """A manifest file's bytes (checked against its marker already) as ``(table, es_pipe
    metadata)``, only ``columns`` when given; schema and version checked."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        table = parquet.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(
            f"{path} is not a readable Parquet file ({exc}); restore it, or delete its epoch's "
            "commit marker to fall back to the previous epoch"
        ) from exc
    return table, file_meta(parquet.schema_arrow, path)


def listing_json(doc: Mapping[str, Any]) -> bytes:
    """A commit marker or done-file as UTF-8 JSON, one line per field and one line per
    entry of its ``files``: as readable as ``indent=1`` but written by the C encoder
    (``indent=`` makes ``json`` fall back to its pure-Python one, which cost a few ms per
    commit of 100 shards, more with thousands)."""
    files = doc.get("files")
    head = {k: v for k, v in doc.items() if k != "files"}
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
    if isinstance(files, list):
        entries = ",\n  ".join(json.dumps(entry) for entry in files)
        lines.append(f'"files": [\n  {entries}\n ]' if files else '"files": []')
    return ("{\n " + ",\n ".join(lines) + "\n}\n").encode()


def parse_marker(raw: bytes, epoch: int, path: str) -> dict[str, Any]:
    """The commit marker of ``epoch`` from its bytes, checked: its format, schema version,
    fields and every path it names (:func:`es_pipe.manifests.layout.check_entry`)."""
    marker = load_json(
        raw,
        f"commit marker {path}",
        "it was edited, or written half by a filesystem without atomic writes that "
        "crashed during the commit. Delete it to fall back to the previous epoch",
    )
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise ManifestError(
            f"{path} is not an es_pipe commit marker; restore it, or delete it to fall back to "
            "the previous committed epoch"
        )
    check_version(marker.get("schema_version"), path)
    check_marker(marker, epoch, path)
    for entry in marker["files"]:
        check_entry(entry, epoch, f"commit marker {path}")
    return marker


def file_meta(schema: pa.Schema, path: str) -> dict[str, Any]:
    """es_pipe's metadata of a manifest file, checked for its schema version and fields."""
    key = schema_spec()["metadata_key"].encode()
    raw = (schema.metadata or {}).get(key)
    if raw is None:
        raise ManifestError(
            f"{path} has no es_pipe metadata; it was not written by es_pipe. Point manifests= at "
            "the folder es_pipe writes, or remove the file"
        )
    meta = load_json(
        raw,
        f"{path}: es_pipe metadata",
        "the file was edited or damaged: restore it, or delete its epoch's commit marker to "
        "fall back to the previous epoch",
    )
    if not isinstance(meta, dict):
        raise ManifestError(f"{path}: es_pipe metadata is not a mapping; the file was edited")
    check_version(meta.get("schema_version"), path)
    expected = arrow_schema()
    if not schema.remove_metadata().equals(expected):
        raise ManifestError(
            f"{path} has schema {schema.remove_metadata()} but manifest schema version "
            f"{schema_version()} is {expected}; the file was edited or not written by es_pipe"
        )
    return meta


def check_version(version: Any, path: str) -> None:
    """Refuse a file of another schema version, naming the way out."""
    if version != schema_version():
        raise ManifestError(
            f"{path} has manifest schema version {version!r}; this es_pipe "
            f"({es_pipe_version()}) reads version {schema_version()}. Use the es_pipe version "
            "that wrote it, or start the run with a fresh manifests= folder"
        )


def check_marker(marker: dict[str, Any], epoch: int, path: str) -> None:
    """The fields of a commit marker that readers rely on, with their types."""
    files = marker.get("files")
    problem = None
    if marker.get("epoch", epoch) != epoch:
        problem = f"it says epoch {marker.get('epoch')!r} but is the marker of epoch {epoch}"
    elif not isinstance(files, list):
        problem = "it has no list of 'files'"
    elif not isinstance(marker.get("hyper", {}), dict):
        problem = "its 'hyper' is not a mapping"
    else:
        for entry in files:
            if not _typed(entry, _ENTRY_TYPES):
                problem = f"a file entry is not {{shard, path, size, crc32}}: {str(entry)[:200]}"
                break
            for count in ("pruned", "repruned"):  # optional: markers before these counts
                value = entry.get(count, 0)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    problem = f"a file entry's {count!r} is not a count: {str(entry)[:200]}"
                    break
            if problem:
                break
    if problem:
        raise ManifestError(
            f"commit marker {path} is damaged: {problem}. Restore it, or delete it to fall "
            "back to the previous committed epoch"
        )


def check_done(done: Mapping[str, Any], path: str, fix: str) -> None:
    """The fields of a done-file the commit relies on, with their types."""
    files = done.get("files")
    if not isinstance(files, list):
        raise ManifestError(f"done-file {path} has no list of 'files'; {fix}")
    for entry in files:
        if not _typed(entry, _DONE_TYPES):
            raise ManifestError(
                f"done-file {path} has a damaged file entry ({str(entry)[:200]}); {fix}"
            )


def _typed(entry: Any, types: Mapping[str, type]) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool) for k, t in types.items()
    )
