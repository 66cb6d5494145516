"""A shard's fingerprint as a manifest records it, and the check that a manifest still
matches its shard. There is one fingerprint function in es_pipe,
:func:`es_pipe.sources.shards.fingerprint`; manifests call it with ``missing="none"``
(a source name that is no file has nothing to record) and the root's ``retry=`` policy."""

from __future__ import annotations

from typing import Any

from es_pipe.retry import Retry
from es_pipe.sources import shards as shard_files


def fingerprint(url: str, *, retry: Retry | int | None = None) -> dict[str, Any] | None:
    """The fingerprint of the shard at ``url``, or ``None`` when ``url`` names no file (an
    in-memory source's name, a directory). A remote shard is reached with the storage
    options its source was given (``storage.options_for``); a storage that refuses (no
    credentials, no bucket) is a ``StorageError``, not a missing shard."""
    return shard_files.fingerprint(url, retry=retry, missing="none")


def fingerprints_match(stored: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Same size, and the same etag (object stores) or else the same mtime."""
    if stored is None or current is None:
        return stored is None and current is None
    if stored.get("size") != current.get("size"):
        return False
    if stored.get("etag") is not None and current.get("etag") is not None:
        return stored["etag"] == current["etag"]
    if stored.get("mtime") is not None and current.get("mtime") is not None:
        return stored["mtime"] == current["mtime"]
    return True
