"""Where es_pipe puts the files of a manifest root, and the checks that keep every path
it reads, writes or deletes inside that root.

Layout under a manifest root (any fsspec URL)::

    ROOT/
      epoch=3/                          committed data: hive-style, complete files only
        train-000123.tar-5f1c2a9e01b4.parquet
      _commits/epoch=00000003.json      the commit marker: names every file of the epoch
                                        with its row count, size and crc32
      _staging/epoch=4/a-ATTEMPT/       an epoch being written (ignored by readers)
        train-000123.tar-5f1c2a9e01b4.r0-a1b2c3d4.parquet.part
        _done/rank=0.json               rank 0 finished: its files, sizes, checksums
      _lease.json                       the job that holds the root, and its heartbeat

File names come from shard URLs through :func:`safe_name` (never from sample keys), and a
path read from a marker or done-file is refused unless it is exactly where es_pipe puts
such a file (:func:`check_entry`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from es_pipe.errors import ConfigError, ManifestError

COMMITS = "_commits"
STAGING = "_staging"
LEASE = "_lease.json"
MAX_INT32 = 2**31 - 1  # epochs and steps are stored as int32
OURS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*-[0-9a-f]{12}\.parquet$")
MARKER_RE = re.compile(r"^epoch=(\d+)\.json$")
DONE_RE = re.compile(r"^rank=(\d+)\.json$")
EPOCH_RE = re.compile(r"epoch=(\d+)")
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def epoch_folder(epoch: int) -> str:
    """The committed folder of ``epoch``: ``epoch=N`` (hive-style)."""
    return f"epoch={int(epoch)}"


def marker_name(epoch: int) -> str:
    """The commit marker of ``epoch``, relative to the root."""
    return f"{COMMITS}/epoch={int(epoch):08d}.json"


def attempt_folder(attempt: str) -> str:
    """The staging folder name of an attempt: safe characters plus a hash."""
    tail = _SAFE_RE.sub("_", attempt)[:40]
    return f"a-{tail}-{hashlib.sha1(attempt.encode('utf-8')).hexdigest()[:8]}"


def staging(epoch: int, attempt: str, *parts: str) -> str:
    """Relative path in ``attempt``'s staging folder of ``epoch``: attempts never share a
    staged file or a done-file."""
    return "/".join([STAGING, epoch_folder(epoch), attempt_folder(attempt), *parts])


def last_name(path: str) -> str:
    """The last component of a listed path."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def safe_name(shard: str) -> str:
    """A file name for ``shard``'s manifest that cannot leave its directory: the shard's
    last path component, sanitised to ``[A-Za-z0-9._-]`` and shortened, plus 12 hex digits
    of the SHA-1 of the whole shard URL (two shards never share a name)."""
    tail = shard.rstrip("/").rsplit("/", 1)[-1]
    tail = _SAFE_RE.sub("_", tail).lstrip(".-")[:80] or "shard"
    digest = hashlib.sha1(shard.encode("utf-8")).hexdigest()[:12]
    return f"{tail}-{digest}"


def check_relative(path: str, where: str) -> str:
    """``path``, if it is a plain relative path (no ``..``, no absolute path, no ``\\``)."""
    if (
        not isinstance(path, str)
        or path.startswith("/")
        or any(p in ("", ".", "..") for p in path.split("/"))
        or "\\" in path
    ):
        raise ManifestError(
            f"{where} names the file {path!r}, which is not a plain path inside the "
            "manifest root; the marker was not written by es_pipe or was edited: "
            "delete it to fall back to the previous epoch"
        )
    return path


def check_entry(entry: Mapping[str, Any], epoch: int, where: str) -> None:
    """A file entry of a done-file or marker names files where es_pipe puts them, and
    nowhere else: ``epoch=N/NAME.parquet`` (and ``_staging/epoch=N/a-ATTEMPT/NAME.part``),
    NAME a :func:`safe_name`. Anything else (``..``, an absolute path, a URL, another
    epoch's folder, a commit marker) was not written by es_pipe and is refused before any
    file is read, copied or written."""
    for field, folder, suffix in (("path", "", ".parquet"), ("staged", STAGING, ".parquet.part")):
        if field not in entry or (field == "staged" and entry[field] is None):
            continue
        path = check_relative(entry[field], where)
        head = f"{folder}/epoch={int(epoch)}/" if folder else f"epoch={int(epoch)}/"
        name = path[len(head) :]
        if folder:  # staged files live in their attempt's folder: a-TAG/NAME
            tag, _, name = name.partition("/")
            name = name if tag.startswith("a-") and _NAME_RE.match(tag) else ""
        if not (path.startswith(head) and name.endswith(suffix) and _NAME_RE.match(name)):
            raise ManifestError(
                f"{where} names the file {path!r} for epoch {epoch}; es_pipe puts it at "
                f"{head}NAME{suffix}. The file was not written by es_pipe or was edited: "
                "delete it to fall back to the previous epoch"
            )


def refuse_links(fs: Any, root: str, *parts: str) -> None:
    """Refuse (before writing or removing anything) a folder of ``root`` that is a
    symlink, or any path that resolves outside the root: a commit would move or delete
    files that are not es_pipe's. ``fs`` is the root's fsspec filesystem."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        return  # object stores have no links
    real_root = os.path.realpath(root)
    for part in parts:
        path = "/".join([root, part])
        real = os.path.realpath(path)
        inside = real == real_root or real.startswith(real_root.rstrip("/") + "/")
        if os.path.islink(path) or not inside:
            raise ManifestError(
                f"{path} is a symlink (to {real}); es_pipe only writes and deletes inside "
                f"the manifests folder {root}, and never follows a link out of it. "
                "Remove the link, or give manifests= a folder of its own"
            )


def check_relocate(relocate: Mapping[str, str] | None) -> dict[str, str]:
    """``relocate=`` as a plain ``{old_prefix: new_prefix}`` dict, else a ConfigError."""
    if relocate is None:
        return {}
    if not isinstance(relocate, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in relocate.items()
    ):
        raise ConfigError(
            f"relocate={relocate!r}: give {{'old_prefix': 'new_prefix'}}, e.g. "
            "{'s3://old-bucket/data/': 's3://new-bucket/data/'}"
        )
    return dict(relocate)


def relocated(shard: str, relocate: Mapping[str, str]) -> str:
    """``shard`` under its new prefix (the longest old prefix that matches wins)."""
    for old in sorted(relocate, key=len, reverse=True):
        if shard.startswith(old):
            return relocate[old] + shard[len(old) :]
    return shard


def ranges(epochs: list[int]) -> str:
    """Epochs for a message: ``3..9`` for a run of them, else a list."""
    if not epochs:
        return "none"
    if epochs == list(range(epochs[0], epochs[-1] + 1)) and len(epochs) > 2:
        return f"{epochs[0]}..{epochs[-1]}"
    return ", ".join(map(str, epochs))


def shard_set_digest(shards: Iterable[str]) -> dict[str, Any]:
    """The shard set of a commit: count and a SHA-1 of the sorted names."""
    names = sorted(set(shards))
    digest = hashlib.sha1("\n".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return {"count": len(names), "sha1": digest}
