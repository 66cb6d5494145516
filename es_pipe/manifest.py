"""Parquet shard manifests: one file per shard per epoch, committed by a marker written last.

Layout under a manifest root (any fsspec URL)::

    ROOT/
      epoch=3/                          committed data: hive-style, complete files only
        train-000123.tar-5f1c2a9e01b4.parquet
      _commits/epoch=00000003.json      the commit marker: names every file of the epoch
                                        with its row count, size and crc32
      _staging/epoch=4/                 an epoch being written (ignored by readers)
        train-000123.tar-5f1c2a9e01b4.r0-a1b2c3d4.parquet.part
        _done/rank=0.json               rank 0 finished: its files, sizes, checksums

Commit protocol (no atomic rename needed; object stores have none):

1. every rank writes each of its shards' manifests under a *unique* staging name (rank +
   attempt token), whole, in one PUT, then its done-file listing them
   (:meth:`Manifests.write_shard`, :meth:`Manifests.finish`);
2. one caller (:meth:`Manifests.commit`) waits until the done-file of every expected rank
   of the same attempt is there (or raises, naming the missing ranks), checks every named
   file's size, removes the markers of this and any later epoch (re-running an epoch makes
   the later ones stale), publishes the files to ``ROOT/epoch=N/`` (local: rename; object
   stores: server-side copy), deletes files in ``epoch=N/`` that the epoch does not name,
   and writes the marker ``_commits/epoch=N.json`` **last**, in one PUT;
3. readers use the newest marker and read exactly the files it names, checking size and
   crc32, so a half-published epoch, an orphan or a truncated file is never read as data.

A crash anywhere before step 2's marker leaves the previous epoch's marker and files
untouched. Single objects are written whole: object stores guarantee it for one PUT; on a
local disk es_pipe writes to a hidden temporary name and ``os.replace``-s it.

Plain readers: ``pyarrow.dataset``/``pandas`` on ROOT skip ``_commits`` and ``_staging``
(names starting with ``_``), DuckDB's ``ROOT/**/*.parquet`` never matches staged
``.part`` files, so they see ``epoch=N`` directories of complete files. The only thing a
plain reader can see that es_pipe does not is the epoch being published right now (or
one whose publication crashed): filter ``epoch <= newest committed``
(``es-pipe inspect ROOT`` prints the query).

Schema: ``es_pipe/schemas/manifest.json`` is the single source of truth; the code builds
the Arrow schema from it and refuses files of another schema version. No pickle.

Every filesystem call (``cat_file``, ``pipe_file``, ``ls``, ``info``, ``copy``, ``rm``) is
retried after transient errors under the ``retry=`` policy (:class:`es_pipe.Retry`) and
counted in :attr:`Manifests.retries`; a write that fails for good removes what it may have
left half-written (a filesystem without atomic writes can leave a prefix), so a failed
commit never leaves a truncated marker behind.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
import warnings
import weakref
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from es_pipe import storage
from es_pipe.errors import ConfigError, ManifestError, ManifestStorageError
from es_pipe.retry import Retry
from es_pipe.sources import shards as shard_files

if TYPE_CHECKING:
    import pyarrow.dataset

_FINGERPRINT_RETRY = Retry()
MARKER_FORMAT = "es_pipe.commit"
DONE_FORMAT = "es_pipe.done"
LEASE_FORMAT = "es_pipe.lease"
COMMITS = "_commits"
STAGING = "_staging"
LEASE = "_lease.json"
MAX_INT32 = 2**31 - 1  # epochs and steps are stored as int32
_PROCESS_TOKEN = secrets.token_hex(6)  # one launch of a single process: one attempt
_STORAGE_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n)
)
_OURS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*-[0-9a-f]{12}\.parquet$")
MARKER_FIELDS = ("shard", "path", "rows", "pruned", "repruned", "size", "crc32")
_MARKER_RE = re.compile(r"^epoch=(\d+)\.json$")
_DONE_RE = re.compile(r"^rank=(\d+)\.json$")
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
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


# --------------------------------------------------------------------------- schema


@lru_cache(maxsize=1)
def schema_spec() -> dict[str, Any]:
    """The manifest schema, as stored in ``es_pipe/schemas/manifest.json``."""
    text = resources.files("es_pipe").joinpath("schemas/manifest.json").read_text("utf-8")
    return json.loads(text)


def schema_version() -> int:
    return int(schema_spec()["version"])


def arrow_schema() -> pa.Schema:
    """The Arrow schema every manifest file has (without file metadata)."""
    return pa.schema(
        [
            pa.field(field["name"], _TYPES[field["type"]], nullable=field["nullable"])
            for field in schema_spec()["fields"]
        ]
    )


# --------------------------------------------------------------------------- naming


def safe_name(shard: str) -> str:
    """A file name for ``shard``'s manifest that cannot leave its directory: the shard's
    last path component, sanitised to ``[A-Za-z0-9._-]`` and shortened, plus 12 hex digits
    of the SHA-1 of the whole shard URL (two shards never share a name)."""
    import hashlib

    tail = shard.rstrip("/").rsplit("/", 1)[-1]
    tail = _SAFE_RE.sub("_", tail).lstrip(".-")[:80] or "shard"
    digest = hashlib.sha1(shard.encode("utf-8")).hexdigest()[:12]
    return f"{tail}-{digest}"


def _check_relative(path: str, where: str) -> str:
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


def _check_entry(entry: Mapping[str, Any], epoch: int, where: str) -> None:
    """A file entry of a done-file or marker names files where es_pipe puts them, and
    nowhere else: ``epoch=N/NAME.parquet`` (and ``_staging/epoch=N/a-ATTEMPT/NAME.part``),
    NAME a :func:`safe_name`. Anything else (``..``, an absolute path, a URL, another
    epoch's folder, a commit marker) was not written by es_pipe and is refused before any
    file is read, copied or written."""
    for field, folder, suffix in (("path", "", ".parquet"), ("staged", STAGING, ".parquet.part")):
        if field not in entry or (field == "staged" and entry[field] is None):
            continue
        path = _check_relative(entry[field], where)
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


# --------------------------------------------------------------------------- fingerprints


def fingerprint(url: str) -> dict[str, Any] | None:
    """The shard's fingerprint (see ``sources.shards.fingerprint``), or ``None`` when ``url``
    names no file (an in-memory source's name, a directory). A remote shard is reached with
    the storage options its source was given (``storage.options_for``); a storage that
    refuses (no credentials, no bucket) is a ``StorageError``, not a missing shard."""
    try:
        fs, path = storage.url_to_fs(url)
        info = _FINGERPRINT_RETRY.call(fs.info, path, what=f"info {url}")
    except (FileNotFoundError, ValueError, ImportError, OSError) as exc:
        storage.raise_storage_error(exc, url)
        return None
    except Exception as exc:
        storage.raise_storage_error(exc, url)
        raise
    return shard_files.fingerprint_of(url, info) if info.get("type") == "file" else None


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


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ShardManifest:
    """One shard's manifest as read back: columns by ordinal (``row``)."""

    shard: str
    epoch: int
    path: str
    columns: dict[str, np.ndarray]  # score, loss, visits, step, pruned, streak, weight
    keys: pa.Array  # string, by ordinal (null where unknown)
    meta: dict[str, Any]

    @property
    def rows(self) -> int:
        return len(self.columns["score"])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _crc(data: bytes | memoryview | pa.Buffer) -> int:
    return zlib.crc32(memoryview(data)) & 0xFFFFFFFF


class Manifests:
    """A manifest root: write shard manifests, commit epochs, read them back.

    Args:
        root: directory or fsspec URL (``s3://bucket/run-17/manifests``).
        rank: this process's rank (names its staged files and done-file).
        attempt: identifies one launch of the job, the same on every rank and new for
            every launch; the committer only accepts done-files of its own attempt, and a
            rank only trusts a commit marker of its own attempt. Default: ``ES_PIPE_ATTEMPT``,
            else torchelastic's ``TORCHELASTIC_RUN_ID`` + ``TORCHELASTIC_RESTART_COUNT``,
            else a random token of this process (the sampler broadcasts rank 0's over
            ``torch.distributed`` when it is initialized, see :meth:`begin`).
        relocate: ``{"old_prefix": "new_prefix"}``: the data moved; shard URLs of the
            committed manifests that start with an old prefix are read under the new one.
        lease_timeout: seconds after the last heartbeat of a job holding this root
            (``_lease.json``) before another job may take the root over.
        takeover: take the root over from the job that holds its lease even if that job
            looks alive (only when you know it is dead: two live jobs would mix their data).
        storage_options: passed to fsspec.
        progress: show a tqdm bar when reading many files (``None``: when > 16 files).
        retry: how filesystem calls are retried after transient errors (a reset
            connection, a timeout): an :class:`es_pipe.Retry`, an int number of attempts
            (``1``: no retry) or ``None`` for ``Retry()`` (3 attempts, 0.2 s then 0.4 s of
            backoff, with jitter). Every retry counts in :attr:`retries`. A call that keeps
            failing raises :class:`ManifestError`; errors that another try cannot fix
            (a missing file, a permission error, a full disk) propagate at once. Either
            way a failed ``write_shard``, ``finish`` or ``commit`` leaves the committed
            epochs as they were, and calling it again once the storage is back completes it.

    Attributes:
        retries: filesystem calls retried so far by this object.
    """

    def __init__(
        self,
        root: str,
        *,
        rank: int = 0,
        attempt: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        progress: bool | None = False,
        retry: Retry | int | None = None,
        relocate: Mapping[str, str] | None = None,
        lease_timeout: float = 600.0,
        takeover: bool = False,
    ) -> None:
        if not isinstance(root, str) or not root:
            raise ConfigError(f"manifests={root!r} must be a directory path or fsspec URL")
        self.url = root
        try:
            self.fs, path = storage.url_to_fs(root, storage.check_options(storage_options))
        except (ValueError, ImportError) as exc:  # an unknown protocol, a missing backend
            raise ConfigError(f"manifests={root!r}: {exc}; give a folder or fsspec URL") from None
        self.root = path.rstrip("/") or "/"
        self.rank = int(rank)
        self._attempt = attempt or _default_attempt()
        self.relocate = _check_relocate(relocate)
        if isinstance(lease_timeout, bool) or not isinstance(lease_timeout, (int, float)):
            raise ConfigError(f"lease_timeout={lease_timeout!r} must be a number of seconds")
        if not lease_timeout > 0:
            raise ConfigError(f"lease_timeout={lease_timeout!r} must be > 0 seconds")
        self.lease_timeout = float(lease_timeout)
        self.takeover = bool(takeover)
        self._lease_stop: threading.Event | None = None
        self.progress = progress
        self._token = secrets.token_hex(4)
        self.retry = Retry.of(retry)
        self.retries = 0
        self._retry_lock = threading.Lock()
        self._written: dict[int, list[dict[str, Any]]] = {}
        self._markers: dict[int, dict[str, Any]] = {}
        self._by_shard: dict[int, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}
        try:  # refused now, not after an epoch of training when the first write fails
            kind = self._io(f"info {self.root}", self.fs.info, self.root).get("type")
        except (FileNotFoundError, NotADirectoryError):
            kind = None  # created on the first write (object stores have no folders)
        if kind not in (None, "directory"):
            raise ConfigError(
                f"manifests={root!r} is a {kind}, not a folder; give a folder (es_pipe "
                "creates it) or the fsspec URL of one"
            )

    def __repr__(self) -> str:
        return f"Manifests({self.url!r}, rank={self.rank}, attempt={self.attempt!r})"

    @property
    def attempt(self) -> str:
        """This launch's attempt id (see the class docstring)."""
        return self._attempt or _PROCESS_TOKEN

    def _stage(self, epoch: int, *parts: str) -> str:
        """Relative path in this attempt's staging folder of ``epoch``: attempts never
        share a staged file or a done-file."""
        return "/".join([STAGING, f"epoch={int(epoch)}", attempt_folder(self.attempt), *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _io(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, a filesystem call retried under :attr:`retry`."""

        def count(_: int, __: BaseException) -> None:
            with self._retry_lock:
                self.retries += 1

        def give_up(exc: BaseException, attempts: int) -> ManifestError:
            return ManifestError(
                f"{what} failed {attempts} times in a row ({type(exc).__name__}: {exc}); the "
                f"storage of {self.url} kept failing. Check it (or the network) and call again "
                "(a failed commit leaves the previous epoch committed), or allow more attempts "
                "with retry=es_pipe.Retry(attempts=...)"
            )

        try:
            return self.retry.call(fn, *args, what=what, on_retry=count, exhausted=give_up)
        except Exception as exc:  # no credentials, no bucket...: StorageError with the fix
            storage.raise_storage_error(exc, self.url)
            raise

    def _exists(self, path: str) -> bool:
        # not fs.exists: it answers False for any error, a transient one included
        try:
            self._io(f"info {path}", self.fs.info, path)
        except (FileNotFoundError, NotADirectoryError):  # under a file: not there either
            return False
        return True

    def _rm(self, path: str, *, recursive: bool = False) -> None:
        """Remove ``path``; already gone is fine (a retried remove may find it so)."""
        with contextlib.suppress(FileNotFoundError):
            self._io(f"rm {path}", self.fs.rm, path, recursive)

    # ------------------------------------------------------------------ writing

    def write_shard(
        self,
        epoch: int,
        shard: str,
        columns: Mapping[str, np.ndarray],
        *,
        keys: pa.Array | None = None,
        factor: float = 1.0,
        fingerprint: dict[str, Any] | None = None,
        hyper: Mapping[str, Any] | None = None,
        fallback: bool = False,
    ) -> dict[str, Any]:
        """Stage one shard's manifest for ``epoch``. ``columns`` holds per-ordinal
        ``score, loss, visits, step`` and the uint8 pruning ``state`` (see
        :mod:`es_pipe.pruning`); ``keys`` the samples' keys by ordinal (or None).

        ``fallback`` marks a copy written only in case no rank that read the shard this
        epoch writes it (a shard inherited from a checkpoint of another topology): the
        commit prefers any other rank's file of the shard."""
        table = build_table(shard, columns, keys=keys, factor=factor)
        meta = {
            "schema_version": schema_version(),
            "es_pipe_version": _version(),
            "epoch": int(epoch),
            "shard": shard,
            "rows": table.num_rows,
            "fingerprint": fingerprint,
            "factor": float(factor),
            "hyper": dict(hyper or {}),
            "rank": self.rank,
            "attempt": self.attempt,
        }
        data = encode_table(table, meta)
        name = safe_name(shard)
        staged = self._stage(epoch, f"{name}.r{self.rank}-{self._token}.parquet.part")
        self._put(self._path(staged), data, atomic=False)
        entry = {
            "shard": shard,
            "staged": staged,
            "path": f"epoch={int(epoch)}/{name}.parquet",
            "rows": table.num_rows,
            "pruned": int(pc.sum(table.column("pruned")).as_py() or 0),
            # pruned again: left out of this epoch too (streak >= 2); for `inspect`
            "repruned": int(pc.sum(pc.greater_equal(table.column("streak"), 2)).as_py() or 0),
            "size": data.size,
            "crc32": _crc(data),
            "fallback": bool(fallback),
        }
        self._written.setdefault(int(epoch), []).append(entry)
        return entry

    def write_shards(
        self, epoch: int, items: Iterable[Mapping[str, Any]], *, threads: int | None = None
    ) -> list[dict[str, Any]]:
        """``write_shard`` for many shards, encoded and written by a thread pool (Arrow and
        the file systems release the GIL). Each item holds ``write_shard``'s arguments:
        ``shard``, ``columns`` and optionally ``keys``, ``factor``, ``fingerprint``,
        ``hyper``."""
        items = list(items)
        threads = threads or min(8, os.cpu_count() or 1)
        if threads <= 1 or len(items) <= 1:
            return [self.write_shard(epoch, **item) for item in items]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda item: self.write_shard(epoch, **item), items))

    def finish(self, epoch: int) -> str:
        """Write this rank's done-file for ``epoch`` (after all its ``write_shard``)."""
        entries = sorted(self._written.pop(int(epoch), []), key=lambda e: e["path"])
        done = {
            "format": DONE_FORMAT,
            "schema_version": schema_version(),
            "epoch": int(epoch),
            "rank": self.rank,
            "attempt": self.attempt,
            "written": _now(),
            "files": entries,
        }
        path = self._path(self._stage(epoch, "_done", f"rank={self.rank}.json"))
        self._put(path, json.dumps(done, indent=1).encode(), atomic=True)
        return path

    def commit(
        self,
        epoch: int,
        *,
        expected_ranks: int | Iterable[int] = 1,
        timeout: float = 300.0,
        poll: float = 0.2,
        hyper: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Make ``epoch`` visible: wait for every expected rank's done-file of this
        attempt, publish the files, write the marker last. Returns the marker.

        Touches only what es_pipe wrote: a symlink on the way out of the root is refused
        before anything changes, and a file in ``epoch=N/`` that es_pipe did not write is
        left there (with a warning). ``run`` is the run identity recorded in the marker
        (see :meth:`begin`). A full disk raises :class:`ManifestStorageError`; the previous
        epoch stays committed."""
        epoch = int(epoch)
        ranks = sorted(range(expected_ranks) if isinstance(expected_ranks, int) else expected_ranks)
        self._refuse_links(f"epoch={epoch}", COMMITS, STAGING)
        dones = self._wait_for_ranks(epoch, ranks, timeout, poll)
        files = _pick_files(epoch, dones)
        self._check_lease_held()
        try:
            marker = self._publish_epoch(epoch, ranks, files, hyper, run)
        except OSError as exc:
            raise _storage_error(exc, f"committing epoch {epoch} of {self.url}") from exc
        # best effort: a leftover staging folder is ignored by every reader. The lease is
        # this attempt's (or nobody's), so other attempts' staged files are leftovers of
        # dead launches; a folder linked out of the root is not followed (rmtree refuses)
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.rm(self._path(STAGING, f"epoch={epoch}"), recursive=True)
        return marker

    def _publish_epoch(
        self,
        epoch: int,
        ranks: list[int],
        files: list[dict[str, Any]],
        hyper: Mapping[str, Any] | None,
        run: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Steps 1-3 of the commit protocol (module docstring)."""
        # 1. later and equal markers become stale: the epoch is re-run from here.
        for stale in sorted((e for e in self.committed(refresh=True) if e >= epoch), reverse=True):
            warnings.warn(
                f"re-committing epoch {epoch} of {self.url}: removing the commit of epoch "
                f"{stale} (the run went back to an earlier checkpoint)",
                stacklevel=3,
            )
            self._rm(self._marker_path(stale))
            self._markers.pop(stale, None)
        # every later epoch=M/ is now uncommitted: an abandoned run's files, which plain
        # readers of ROOT/**/*.parquet would take for data
        self._remove_abandoned(epoch)
        # 2. publish: every named file to its committed place; remove our stale ones.
        for entry in files:
            self._publish(entry)
        self._remove_unnamed(epoch, {entry["path"].rsplit("/", 1)[-1] for entry in files})
        self._check_lease_held()  # again: the folder may have been taken while publishing
        # 3. the marker, last.
        marker = {
            "format": MARKER_FORMAT,
            "schema_version": schema_version(),
            "es_pipe_version": _version(),
            "epoch": epoch,
            "attempt": self.attempt,
            "ranks": ranks,
            "committed": _now(),
            "hyper": dict(hyper or {}),
            "rows": int(sum(entry["rows"] for entry in files)),
            "files": [
                {k: entry[k] for k in MARKER_FIELDS if k in entry}
                for entry in sorted(files, key=lambda e: e["path"])
            ],
        }
        if run is not None:
            marker["run"] = {**run, "shards": shard_set_digest(e["shard"] for e in files)}
        self._put(self._marker_path(epoch), json.dumps(marker, indent=1).encode(), atomic=True)
        self._markers[epoch] = marker
        return marker

    def _remove_abandoned(self, epoch: int) -> None:
        """Remove es_pipe's files from ``epoch=M/`` folders with ``M > epoch`` (no marker
        names them once step 1 ran: files of a run that went back to an earlier
        checkpoint, or of a publication that crashed before its marker); a folder left
        empty goes too. A linked folder is not followed, and anything es_pipe did not
        write is left in place (with a warning)."""
        try:
            self.fs.invalidate_cache(self.root)
            entries = self._io(f"ls {self.root}", self.fs.ls, self.root, True)
        except (FileNotFoundError, NotADirectoryError):
            return
        for info in entries:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            match = re.fullmatch(r"epoch=(\d+)", name)
            if not match or int(match.group(1)) <= epoch:
                continue
            path = self._path(name)
            if info.get("islink") or (
                isinstance(self.fs, LocalFileSystem) and os.path.islink(path)
            ):
                warnings.warn(
                    f"{path} is a symlink; es_pipe never follows a link out of the manifests "
                    "folder and leaves it alone. Plain readers of the root may read what it "
                    "points to: remove it",
                    stacklevel=4,
                )
                continue
            if info.get("type") != "directory":
                continue
            self._remove_unnamed(int(match.group(1)), set())
            with contextlib.suppress(Exception):  # best effort: not empty, or no folders
                if not self._io(f"ls {path}", self.fs.ls, path, False):
                    self.fs.rmdir(path)

    def _remove_unnamed(self, epoch: int, keep: set[str]) -> None:
        """Remove files of ``epoch=N/`` that this commit does not name, if es_pipe wrote
        them (a manifest file of an earlier commit of the epoch); leave anything else."""
        epoch_dir = self._path(f"epoch={epoch}")
        try:
            self.fs.invalidate_cache(epoch_dir)  # object stores cache listings
            present = self._io(f"ls {epoch_dir}", self.fs.ls, epoch_dir, True)
        except FileNotFoundError:
            present = []
        foreign = []
        for info in present:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if name in keep:
                continue
            if info.get("type") == "file" and not info.get("islink") and _OURS_RE.match(name):
                self._rm(info["name"])
            else:
                foreign.append(name)
        if foreign:
            warnings.warn(
                f"{epoch_dir} holds {len(foreign)} entries es_pipe did not write "
                f"({', '.join(sorted(foreign)[:5])}); left in place. Plain readers of the root "
                "will see them: move them out of the manifests folder",
                stacklevel=4,
            )

    def _refuse_links(self, *parts: str) -> None:
        """Refuse (before writing or removing anything) a folder of the root that is a
        symlink, or any path that resolves outside the root: the commit would move or
        delete files that are not es_pipe's."""
        if not isinstance(self.fs, LocalFileSystem):
            return  # object stores have no links
        real_root = os.path.realpath(self.root)
        for part in parts:
            path = self._path(part)
            real = os.path.realpath(path)
            inside = real == real_root or real.startswith(real_root.rstrip("/") + "/")
            if os.path.islink(path) or not inside:
                raise ManifestError(
                    f"{path} is a symlink (to {real}); es_pipe only writes and deletes inside "
                    f"the manifests folder {self.root}, and never follows a link out of it. "
                    "Remove the link, or give manifests= a folder of its own"
                )

    def _wait_for_ranks(
        self, epoch: int, ranks: list[int], timeout: float, poll: float
    ) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        found: dict[int, dict[str, Any]] = {}
        while True:
            for rank in ranks:
                if rank not in found:
                    done = self._read_done(epoch, rank)
                    if done is not None and done.get("attempt") == self.attempt:
                        found[rank] = done
            missing = [rank for rank in ranks if rank not in found]
            if not missing:
                return found
            if time.monotonic() >= deadline:
                raise ManifestError(
                    f"cannot commit epoch {epoch} of {self.url}: ranks {missing} of {ranks} "
                    f"have not finished their manifests (attempt {self.attempt!r}) after "
                    f"{timeout:.0f} s; the previous epoch stays the committed one. Check that "
                    "those ranks are alive and call finish(epoch), that every rank uses the "
                    "same attempt id (ES_PIPE_ATTEMPT), or raise timeout="
                )
            time.sleep(poll)

    def _read_done(self, epoch: int, rank: int) -> dict[str, Any] | None:
        """This attempt's done-file of ``rank`` for ``epoch``, checked (None: not yet)."""
        path = self._path(self._stage(epoch, "_done", f"rank={rank}.json"))
        fix = "delete it and re-run the epoch from the last checkpoint"
        try:
            raw = self._io(f"read {path}", self.fs.cat_file, path)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ManifestError(f"done-file {path} is not a file ({exc}); {fix}") from None
        done = _load_json(raw, f"done-file {path}", fix)
        if (
            not isinstance(done, dict)
            or done.get("format") != DONE_FORMAT
            or done.get("epoch") != epoch
        ):
            raise ManifestError(f"{path} is not an es_pipe done-file of epoch {epoch}; {fix}")
        _check_done(done, path, fix)
        return done

    def wait_committed(
        self, epoch: int, *, ranks: int, timeout: float, poll: float = 0.2, max_poll: float = 2.0
    ) -> None:
        """Block until ``epoch`` is committed by rank 0 of THIS attempt: the barrier a rank
        passes before it reads the next epoch's scores and pruning decisions. A marker of
        another attempt (a killed launch that committed the epoch before) does not count:
        rank 0 is about to replace it. Files, not collectives: no process group is needed,
        and a dead rank shows up as a named missing done-file. The polling interval grows
        from ``poll`` to ``max_poll``, so that thousands of waiting ranks do not flood an
        object store with listings."""
        epoch = int(epoch)
        deadline = time.monotonic() + timeout
        while not self._committed_by_me(epoch):
            if time.monotonic() >= deadline:
                raise ManifestError(self._not_committed(epoch, ranks, timeout))
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(max_poll, poll * 1.5)

    def _committed_by_me(self, epoch: int) -> bool:
        """Whether the marker of ``epoch`` is there and was written by this attempt."""
        if epoch not in self.committed():
            return False
        self._markers.pop(epoch, None)  # read it again: it may be a stale one, replaced
        try:
            marker = self.marker(epoch)
        except ManifestError:
            return False  # replaced or removed between the listing and the read
        return marker.get("attempt") == self.attempt

    def _not_committed(self, epoch: int, ranks: int, timeout: float) -> str:
        done_dir = self._path(self._stage(epoch, "_done"))
        try:
            self.fs.invalidate_cache(done_dir)
            names = self._io(f"ls {done_dir}", self.fs.ls, done_dir, False)
        except FileNotFoundError:
            names = []
        finished = {
            int(m.group(1))
            for m in (_DONE_RE.match(n.rstrip("/").rsplit("/", 1)[-1]) for n in names)
            if m
        }
        missing = [r for r in range(ranks) if r not in finished]
        who = (
            f"ranks {missing} have not written their done-files"
            if missing
            else "every rank finished; rank 0 did not commit (is it alive?)"
        )
        return (
            f"epoch {epoch} of {self.url} was not committed by this launch (attempt "
            f"{self.attempt!r}) within {timeout:.0f} s: {who}. A rank that died or fell "
            "behind stops the epoch; restart the job from its last checkpoint (the previous "
            "epoch stays the committed one), or raise commit_timeout="
        )

    def _publish(self, entry: dict[str, Any]) -> None:
        src, dst = self._path(entry["staged"]), self._path(entry["path"])
        try:
            size = self._io(f"size {src}", self.fs.size, src)
        except FileNotFoundError:
            size = None
        if size is None:  # published by an earlier, interrupted commit of this attempt?
            if self._file_ok(dst, entry):
                return
            raise ManifestError(
                f"cannot commit: {src} (shard {entry['shard']!r}) is missing; the rank that "
                "wrote it lost its files. Re-run the epoch"
            )
        if size != entry["size"]:
            raise ManifestError(
                f"cannot commit: {src} has {size} bytes, its done-file says {entry['size']}; "
                "the file is truncated. Re-run the epoch"
            )
        if isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        else:
            self._io(f"copy {src} to {dst}", self.fs.copy, src, dst)

    def _file_ok(self, path: str, entry: dict[str, Any]) -> bool:
        try:
            data = self._io(f"read {path}", self.fs.cat_file, path)
        except FileNotFoundError:
            return False
        return len(data) == entry["size"] and _crc(data) == entry["crc32"]

    def _put(self, path: str, data: bytes | pa.Buffer, *, atomic: bool) -> None:
        """Write ``data`` whole, in one PUT (object stores); on a local disk through a
        hidden temporary name and ``os.replace`` when ``atomic``. Retried after transient
        errors; a write that fails removes what it wrote (a filesystem without atomic
        writes may keep a prefix), so no half-written file is left under its name.
        A full disk (or quota, or read-only filesystem) raises
        :class:`ManifestStorageError`; a file where es_pipe needs a folder raises
        :class:`ManifestError`."""
        try:
            self._io(f"write {path}", self._put_once, path, data, atomic)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ManifestError(
                f"cannot write {path}: a file of the manifests folder {self.root} stands where "
                f"es_pipe keeps a folder ({exc}). Remove it, or give manifests= a folder of "
                "its own"
            ) from None
        except OSError as exc:
            if getattr(exc, "errno", None) in _STORAGE_ERRNOS:
                raise _storage_error(exc, f"writing {path}") from exc
            raise

    def _put_once(self, path: str, data: bytes | pa.Buffer, atomic: bool) -> None:
        if isinstance(self.fs, LocalFileSystem):
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            target = os.path.join(directory, f".{name}.{self._token}.tmp") if atomic else path
            try:
                with open(target, "wb") as handle:
                    handle.write(data)
                    if atomic:
                        handle.flush()
                        os.fsync(handle.fileno())
                if atomic:
                    os.replace(target, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(target)
                raise
        else:
            try:
                self.fs.pipe_file(
                    path, memoryview(data).tobytes() if isinstance(data, pa.Buffer) else data
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm(path)
                raise

    # ------------------------------------------------------------------ one run per root

    def begin(
        self,
        *,
        world_size: int = 1,
        identity: Mapping[str, Any] | None = None,
        resume: bool | str = True,
    ) -> int | None:
        """Start a run on this root (every rank calls it once, before training): agree on
        the attempt id, refuse a root that is not usable as a folder, take the lease
        (rank 0) and, when resuming, check that the committed epochs belong to this run.

        Returns the newest committed epoch this run continues after (``None``: start at
        epoch 0). ``identity`` is ``{"fingerprint": ..., "run_id": ...}`` (see
        :func:`run_fingerprint`); ``resume="force"`` adopts committed epochs of another
        identity on purpose (with a warning)."""
        self._agree_on_attempt(world_size)
        self._refuse_files(COMMITS, STAGING)
        self._refuse_links(COMMITS, STAGING)
        if self.rank == 0:
            self.acquire_lease(run_id=(identity or {}).get("run_id"))
        if not resume:
            return None
        latest = self.latest()
        if latest is not None and identity is not None:
            self._check_identity(latest, identity, force=resume == "force")
        return latest

    def _agree_on_attempt(self, world_size: int) -> None:
        """Ranks of one launch share one attempt id: the one given or set in the
        environment, else rank 0's random token broadcast over torch.distributed."""
        if self._attempt is not None or world_size <= 1:
            return
        try:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
        except ImportError:  # pragma: no cover - torch is a dependency
            ready = False
        if not ready:
            raise ConfigError(
                f"manifests= on {world_size} ranks: the ranks of one launch must share an "
                "attempt id, new for every launch. Initialise torch.distributed before "
                "creating the sampler (es_pipe then broadcasts rank 0's id), launch with "
                "torchrun, or set ES_PIPE_ATTEMPT to the same fresh value on every rank"
            )
        token = [_PROCESS_TOKEN if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        self._attempt = str(token[0])

    def _refuse_files(self, *parts: str) -> None:
        """A file where es_pipe keeps a folder fails now, not after an epoch of training."""
        for part in parts:
            path = self._path(part)
            try:
                kind = self._io(f"info {path}", self.fs.info, path).get("type")
            except (FileNotFoundError, NotADirectoryError):
                continue
            if kind != "directory":
                raise ManifestError(
                    f"{path} is a {kind}, where es_pipe keeps the folder {part}/ of the "
                    f"manifests root {self.url}. Remove it, or give manifests= a folder of "
                    "its own"
                )

    def _check_identity(self, latest: int, identity: Mapping[str, Any], *, force: bool) -> None:
        """Refuse to continue the committed epochs of another run."""
        marker = self.marker(latest)
        stored = marker.get("run")
        if not isinstance(stored, dict):
            warnings.warn(
                f"the commit of epoch {latest} under {self.url} has no run identity (written "
                "by an older es_pipe); continuing it without checking that it is this run's",
                stacklevel=4,
            )
            return
        diffs = [
            f"{k} {stored.get(k)!r} (now {identity.get(k)!r})"
            for k in ("run_id", "fingerprint")
            if stored.get(k) != identity.get(k)
        ]
        if not diffs:
            return
        what = (
            f"the committed epochs under {self.url} (newest {latest}, step "
            f"{marker.get('hyper', {}).get('step')!r}) were written by another run: "
            + "; ".join(diffs)
        )
        if force:
            warnings.warn(what + "; adopting them anyway (resume='force')", stacklevel=4)
            return
        raise ManifestError(
            what + ". The fingerprint covers the policy, B, b, scoring and pruning rule. "
            "Start over with resume=False (replaces those epochs as it commits), give "
            "manifests= a new folder, or pass resume='force' to adopt them deliberately"
        )

    def acquire_lease(self, *, run_id: str | None = None) -> dict[str, Any]:
        """Claim the root for this attempt (``_lease.json``): a live lease of another
        attempt raises :class:`ManifestError` at once; a stale one is taken over. A
        daemon thread renews the heartbeat until the process exits."""
        mine = {
            "format": LEASE_FORMAT,
            "attempt": self.attempt,
            "run_id": run_id,
            "launch": _launch_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": time.time(),
            "heartbeat": time.time(),
            "timeout": self.lease_timeout,
        }
        held = self.read_lease()
        if held is not None and held.get("attempt") != self.attempt:
            reason = _stale_reason(held, mine)
            if reason is None and not self.takeover:
                raise ManifestError(self._lease_refusal(held))
            warnings.warn(
                f"taking over {self._path(LEASE)} from attempt {held.get('attempt')!r} "
                f"({reason or 'takeover=True'})",
                stacklevel=3,
            )
        self._put(self._path(LEASE), json.dumps(mine, indent=1).encode(), atomic=True)
        time.sleep(0.05)  # two jobs racing for a free root: the last writer wins
        self._check_lease_held()
        self._renew_in_background(mine)
        return mine

    def read_lease(self) -> dict[str, Any] | None:
        """The lease of the root (``None``: no job holds it)."""
        path = self._path(LEASE)
        try:
            raw = self._io(f"read {path}", self.fs.cat_file, path)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ManifestError(f"{path} is not a file ({exc}); remove it") from None
        lease = _load_json(raw, f"lease {path}", "delete it (no job holds the root then)")
        if not isinstance(lease, dict) or lease.get("format") != LEASE_FORMAT:
            raise ManifestError(f"{path} is not an es_pipe lease; delete it")
        return lease

    def _lease_refusal(self, held: Mapping[str, Any]) -> str:
        age = time.time() - float(held.get("heartbeat") or 0)
        return (
            f"{self.url} is in use by another job: attempt {held.get('attempt')!r} on host "
            f"{held.get('host')!r} (pid {held.get('pid')}) renewed its lease {age:.0f} s ago "
            f"(taken over after {held.get('timeout')} s without renewal). Two jobs on one "
            "manifests folder would commit each other's data. Give this job a folder of its "
            "own (manifests=...), wait for the other job to end, or, if it is dead, pass "
            "es_pipe.Manifests(url, takeover=True)"
        )

    def _check_lease_held(self) -> None:
        """Before committing: the lease is still this attempt's. A job that took the lease
        (:meth:`acquire_lease`) and finds none lost it: another job took it over and has
        since ended (releasing it), or it was removed; committing now would replace that
        job's epochs. Without :meth:`acquire_lease` (the plain API), only another
        attempt's lease refuses."""
        held = self.read_lease()
        if held is None and self._lease_stop is not None:
            raise ManifestError(
                f"not committing to {self.url}: this job (attempt {self.attempt!r}) took its "
                "lease, and the lease is gone: another job took the folder over and ended, or "
                "the lease file was removed. Its committed epochs would be replaced. Restart "
                "this job from its last checkpoint (it takes the folder again), or give each "
                "job a folder of its own"
            )
        if held is not None and held.get("attempt") != self.attempt:
            raise ManifestError(
                f"not committing to {self.url}: its lease was taken over by attempt "
                f"{held.get('attempt')!r} (host {held.get('host')!r}, pid {held.get('pid')}); "
                "another job now writes this folder, and an epoch never mixes two runs. Stop "
                "one of the jobs, or give each a folder of its own"
            )

    def _renew_in_background(self, lease: dict[str, Any]) -> None:
        """A daemon thread renews the heartbeat every ``lease_timeout / 4`` seconds while
        this object lives (weakly held: a dropped sampler does not keep it alive), and the
        lease is released at exit."""
        if self._lease_stop is not None:
            return
        stop = self._lease_stop = threading.Event()
        period = max(0.05, self.lease_timeout / 4)
        ref = weakref.ref(self)

        def renew() -> None:
            while not stop.wait(period):
                owner = ref()
                if owner is None or not owner._renew_once(lease):
                    return

        def release() -> None:
            owner = ref()
            if owner is not None:
                owner.release_lease()

        threading.Thread(target=renew, name="es_pipe-lease", daemon=True).start()
        atexit.register(release)

    def _renew_once(self, lease: dict[str, Any]) -> bool:
        """One heartbeat; ``False`` once the lease is no longer this attempt's."""
        try:
            held = self.read_lease()
            if held is None or held.get("attempt") != self.attempt:
                return False  # taken over: the commit refuses, see _check_lease_held
            lease["heartbeat"] = time.time()
            self._put(self._path(LEASE), json.dumps(lease, indent=1).encode(), atomic=True)
        except Exception:  # a missed heartbeat is retried at the next one
            pass
        return True

    def release_lease(self) -> None:
        """Give the root back (at exit): remove the lease if it is still this attempt's."""
        if self._lease_stop is not None:
            self._lease_stop.set()
        with contextlib.suppress(Exception):
            held = self.read_lease()
            if held is not None and held.get("attempt") == self.attempt:
                self.fs.rm(self._path(LEASE))

    # ------------------------------------------------------------------ reading

    def _marker_path(self, epoch: int) -> str:
        return self._path(COMMITS, f"epoch={epoch:08d}.json")

    def committed(self, *, refresh: bool = True) -> list[int]:
        """Committed epochs, oldest first."""
        try:
            # another rank writes the markers: s3fs/gcsfs would answer from a cached listing
            self.fs.invalidate_cache(self._path(COMMITS))
            names = self._io("list the commit markers", self.fs.ls, self._path(COMMITS), False)
        except (FileNotFoundError, NotADirectoryError):  # nothing committed (or a file)
            return []
        epochs = []
        for name in names:
            match = _MARKER_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
            if match and int(match.group(1)) >= MAX_INT32:
                raise ManifestError(
                    f"{name}: epoch {match.group(1)} is out of range (at most {MAX_INT32 - 1}); "
                    "the marker was not written by es_pipe. Delete it"
                )
            if match:
                epochs.append(int(match.group(1)))
        if refresh:
            self._markers = {e: m for e, m in self._markers.items() if e in epochs}
        return sorted(epochs)

    def latest(self, *, required: bool = False) -> int | None:
        """The newest committed epoch (``None``, or ``ManifestError`` when ``required``)."""
        epochs = self.committed()
        if epochs:
            return epochs[-1]
        if required:
            raise ManifestError(self._no_epochs())
        return None

    def _no_epochs(self) -> str:
        staged = self._exists(self._path(STAGING))
        hint = (
            " (there are uncommitted files in _staging/: a run crashed or is still writing "
            "its first epoch)"
            if staged
            else ""
        )
        return (
            f"no committed epoch under {self.url}{hint}; point at the manifests= folder of a "
            "run that finished at least one epoch"
        )

    def marker(self, epoch: int) -> dict[str, Any]:
        """The commit marker of ``epoch`` (``ManifestError`` if not committed)."""
        epoch = int(epoch)
        if epoch in self._markers:
            return self._markers[epoch]
        path = self._marker_path(epoch)
        try:
            raw = self._io(f"read {path}", self.fs.cat_file, path)
        except FileNotFoundError:
            committed = self.committed()
            if not committed:
                raise ManifestError(self._no_epochs()) from None
            staged = self._exists(self._path(STAGING, f"epoch={epoch}"))
            raise ManifestError(
                f"epoch {epoch} of {self.url} is not committed"
                + (" (its files are staged, but no commit marker was written)" if staged else "")
                + f"; committed epochs: {_ranges(committed)}. Read one of those (the newest "
                f"is {committed[-1]})"
            ) from None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ManifestError(
                f"commit marker {path} is not a file ({exc}); it was not written by es_pipe. "
                "Delete it to fall back to the previous epoch"
            ) from None
        marker = _load_json(
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
        _check_version(marker.get("schema_version"), path)
        _check_marker(marker, epoch, path)
        for entry in marker["files"]:
            _check_entry(entry, epoch, f"commit marker {path}")
        self._markers[epoch] = marker
        return marker

    def shards(self, epoch: int) -> dict[str, dict[str, Any]]:
        """``shard -> file entry`` of a committed epoch."""
        marker = self.marker(epoch)
        cached = self._by_shard.get(epoch)
        if cached is None or cached[0] is not marker:  # built once per marker read
            cached = (
                marker,
                {relocated(entry["shard"], self.relocate): entry for entry in marker["files"]},
            )
            self._by_shard[epoch] = cached
        return cached[1]

    def find(
        self, shard: str, *, before: int | None = None, epochs: list[int] | None = None
    ) -> int | None:
        """The newest committed epoch (``< before`` if given) that has ``shard``. Pass
        ``epochs`` (from :meth:`committed`) to look up many shards with one listing."""
        for epoch in reversed(self.committed(refresh=False) if epochs is None else epochs):
            if before is not None and epoch >= before:
                continue
            if shard in self.shards(epoch):
                return epoch
        return None

    def read_shard(self, shard: str, epoch: int | None = None) -> ShardManifest:
        """One shard's manifest of ``epoch`` (default: the newest committed that has it)."""
        if epoch is None:
            epoch = self.find(shard)
            if epoch is None:
                raise ManifestError(
                    f"no committed manifest of shard {shard!r} under {self.url}"
                    if self.committed()
                    else self._no_epochs()
                )
        entry = self.shards(epoch).get(shard)
        if entry is None:
            raise ManifestError(
                f"epoch {epoch} of {self.url} has no manifest of shard {shard!r} (no rank read it "
                "that epoch); leave epoch= out to get the newest epoch that has it"
            )
        table, meta, path = self._read_entry(epoch, entry)
        shard = relocated(entry["shard"], self.relocate)
        columns = {
            "score": table.column("score").to_numpy(),
            "loss": table.column("loss").to_numpy(),
            "visits": table.column("visits").to_numpy(),
            "step": table.column("step").to_numpy(),
            "pruned": table.column("pruned").to_numpy(zero_copy_only=False),
            "streak": table.column("streak").to_numpy(),
            "weight": table.column("weight").to_numpy(),
        }
        rows = table.column("row").to_numpy()
        if len(rows) and not (rows[0] == 0 and rows[-1] == len(rows) - 1):
            raise ManifestError(
                f"{path}: rows are not 0..n-1 in order; not an es_pipe manifest. Restore the file, "
                "or delete its epoch's commit marker to fall back to the previous epoch"
            )
        keys = table.column("key").combine_chunks()
        return ShardManifest(shard, int(epoch), path, columns, keys, meta)

    def read_shards(
        self, shards: Iterable[str], epoch: int | None = None, *, threads: int | None = None
    ) -> list[ShardManifest]:
        """``read_shard`` for many shards, by a thread pool."""
        shards = list(shards)
        threads = threads or min(8, os.cpu_count() or 1)
        if threads <= 1 or len(shards) <= 1:
            return [self.read_shard(s, epoch) for s in shards]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda s: self.read_shard(s, epoch), shards))

    def _read_entry(
        self, epoch: int, entry: Mapping[str, Any], columns: list[str] | None = None
    ) -> tuple[pa.Table, dict[str, Any], str]:
        path = self._path(entry["path"])
        try:
            data = self._io(f"read {path}", self.fs.cat_file, path)
        except FileNotFoundError:
            raise ManifestError(
                f"{path} is named by the commit of epoch {epoch} but missing; the manifest "
                "root was edited. Restore the file or delete the marker "
                f"{self._marker_path(epoch)} to fall back to the previous epoch"
            ) from None
        if len(data) != entry["size"] or _crc(data) != entry["crc32"]:
            raise ManifestError(
                f"{path} is corrupt or truncated ({len(data)} bytes, the commit says "
                f"{entry['size']}; crc32 {'differs' if len(data) == entry['size'] else 'n/a'})"
                f". Restore it, or delete {self._marker_path(epoch)} to fall back to the "
                "previous epoch"
            )
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
            table = parquet.read(columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(
                f"{path} is not a readable Parquet file ({exc}); restore it, or delete its epoch's "
                "commit marker to fall back to the previous epoch"
            ) from exc
        meta = file_meta(parquet.schema_arrow, path)
        if meta.get("shard") != entry["shard"] or meta.get("epoch") != epoch:
            raise ManifestError(
                f"{path} holds shard {meta.get('shard')!r} of epoch {meta.get('epoch')}, the "
                f"commit says shard {entry['shard']!r} of epoch {epoch}"
            )
        return table, meta, path

    def read_epoch(self, epoch: int | None = None, *, columns: list[str] | None = None) -> pa.Table:
        """Every shard of a committed epoch (default: the newest) as one table, with an
        ``epoch`` column."""
        if epoch is None:
            epoch = self.latest(required=True)
        entries = self.marker(epoch)["files"]
        tables = []
        for entry in _progress(entries, f"epoch {epoch}", self.progress):
            table, _, _ = self._read_entry(epoch, entry, columns)
            tables.append(table)
        if not tables:
            table = arrow_schema().empty_table()
            if columns is not None:
                table = table.select(columns)
        else:
            table = pa.concat_tables(tables).unify_dictionaries()
        return table.append_column(
            "epoch", pa.array(np.full(table.num_rows, epoch, np.int32), pa.int32())
        )

    def dataset(self, epochs: Iterable[int] | None = None) -> pyarrow.dataset.Dataset:
        """The committed epochs (default: all; else those of ``epochs``) as one
        ``pyarrow.dataset.Dataset`` with an ``epoch`` column: exactly the files their
        commit markers name, so that DuckDB, pandas or Polars read committed rows only
        (never an epoch being published, nor one a crash or a re-run abandoned).
        ``ManifestError`` when nothing is committed or an epoch asked for is not."""
        import pyarrow.dataset as ds

        wanted = self.committed() if epochs is None else sorted({int(e) for e in epochs})
        if not wanted:
            raise ManifestError(self._no_epochs())
        paths = [self._path(f["path"]) for e in wanted for f in self.marker(e)["files"]]
        schema = arrow_schema().append(pa.field("epoch", pa.int32(), nullable=False))
        return ds.dataset(
            paths,
            schema=schema,
            format="parquet",
            filesystem=self.fs,
            partitioning=ds.partitioning(pa.schema([("epoch", pa.int32())]), flavor="hive"),
            partition_base_dir=self.root,
        )


def manifests_dataset(
    root: str,
    epochs: Iterable[int] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> pyarrow.dataset.Dataset:
    """The committed manifests under ``root`` as a ``pyarrow.dataset.Dataset`` (see
    :meth:`Manifests.dataset`): the one line other engines need, e.g.
    ``duckdb.sql("select epoch, avg(pruned::int) from m group by 1")`` after
    ``m = es_pipe.manifests_dataset(root)``."""
    return Manifests(root, storage_options=storage_options).dataset(epochs)


# --------------------------------------------------------------------------- encoding


def build_table(
    shard: str,
    columns: Mapping[str, np.ndarray],
    *,
    keys: pa.Array | None = None,
    factor: float = 1.0,
) -> pa.Table:
    """The manifest table of one shard (schema: :func:`arrow_schema`)."""
    from es_pipe.pruning import STREAK, UPWEIGHT

    rows = len(columns["score"])
    state = np.asarray(columns.get("state", np.zeros(rows, np.uint8)), np.uint8)
    if len(state) < rows:
        state = np.concatenate([state, np.zeros(rows - len(state), np.uint8)])
    state = state[:rows]
    streak = state & STREAK
    weight = np.where(state & UPWEIGHT, np.float32(factor), np.float32(1.0)).astype(np.float32)
    if keys is None:
        keys = pa.nulls(rows, pa.string())
    if len(keys) != rows:
        raise ConfigError(f"shard {shard!r}: {len(keys)} keys for {rows} rows")
    shard_col = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(rows, np.int32)), pa.array([shard], pa.string())
    )
    arrays = [
        shard_col,
        keys.cast(pa.string()),
        pa.array(np.arange(rows, dtype=np.int64)),
        pa.array(np.asarray(columns["score"], np.float32)),
        pa.array(np.asarray(columns["loss"], np.float32)),
        pa.array(np.asarray(columns["visits"], np.uint32)),
        pa.array(np.asarray(columns["step"], np.int32)),
        pa.array(streak > 0),
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
        write_statistics=["row", "pruned"],
    )
    return sink.getvalue()


def file_meta(schema: pa.Schema, path: str) -> dict[str, Any]:
    """es_pipe's metadata of a manifest file, checked for its schema version and fields."""
    key = schema_spec()["metadata_key"].encode()
    raw = (schema.metadata or {}).get(key)
    if raw is None:
        raise ManifestError(
            f"{path} has no es_pipe metadata; it was not written by es_pipe. Point manifests= at "
            "the folder es_pipe writes, or remove the file"
        )
    meta = _load_json(
        raw,
        f"{path}: es_pipe metadata",
        "the file was edited or damaged: restore it, or delete its epoch's commit marker to "
        "fall back to the previous epoch",
    )
    if not isinstance(meta, dict):
        raise ManifestError(f"{path}: es_pipe metadata is not a mapping; the file was edited")
    _check_version(meta.get("schema_version"), path)
    expected = arrow_schema()
    if not schema.remove_metadata().equals(expected):
        raise ManifestError(
            f"{path} has schema {schema.remove_metadata()} but manifest schema version "
            f"{schema_version()} is {expected}; the file was edited or not written by es_pipe"
        )
    return meta


_ENTRY_TYPES = {"shard": str, "path": str, "size": int, "crc32": int}


def _check_marker(marker: dict[str, Any], epoch: int, path: str) -> None:
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
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool)
                for k, t in _ENTRY_TYPES.items()
            ):
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


def _check_version(version: Any, path: str) -> None:
    if version != schema_version():
        raise ManifestError(
            f"{path} has manifest schema version {version!r}; this es_pipe "
            f"({_version()}) reads version {schema_version()}. Use the es_pipe version that "
            "wrote it, or start the run with a fresh manifests= folder"
        )


# --------------------------------------------------------------------------- helpers


def _pick_files(epoch: int, dones: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One file per shard from the ranks' done-files: a rank's regular file wins over
    another rank's fallback copy; two regular files of one shard are an error."""
    chosen: dict[str, tuple[int, dict[str, Any]]] = {}
    for rank in sorted(dones):
        for entry in dones[rank]["files"]:
            _check_entry(entry, epoch, f"the done-file of rank {rank}")
            shard = entry["shard"]
            if shard not in chosen:
                chosen[shard] = (rank, entry)
                continue
            other_rank, other = chosen[shard]
            if other.get("fallback") and not entry.get("fallback"):
                chosen[shard] = (rank, entry)
            elif not other.get("fallback") and not entry.get("fallback"):
                raise ManifestError(
                    f"epoch {epoch}: ranks {other_rank} and {rank} both wrote a manifest for "
                    f"shard {shard!r}; each shard must be read by one rank per epoch (check "
                    "the sources' rank split)"
                )
    return [entry for _, entry in chosen.values()]


def _version() -> str:
    from es_pipe import __version__

    return __version__


def _default_attempt() -> str | None:
    """The attempt id the launcher gives every rank alike (``None``: none; then a random
    token of this process, or rank 0's broadcast, see :meth:`Manifests.begin`)."""
    explicit = os.environ.get("ES_PIPE_ATTEMPT")
    if explicit:
        return explicit
    run = _launch_id()
    if run:
        return f"{run}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return None


def _launch_id() -> str | None:
    """torchelastic's run id, shared by the ranks and restarts of one launch ("none", its
    default without rendezvous id, is not unique: ignored)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return run if run and run != "none" else None


def attempt_folder(attempt: str) -> str:
    """The staging folder name of an attempt: safe characters plus a hash."""
    tail = _SAFE_RE.sub("_", attempt)[:40]
    return f"a-{tail}-{hashlib.sha1(attempt.encode('utf-8')).hexdigest()[:8]}"


def _stale_reason(held: Mapping[str, Any], mine: Mapping[str, Any]) -> str | None:
    """Why a lease of another attempt may be taken over (``None``: it is live)."""
    age = time.time() - float(held.get("heartbeat") or 0)
    if age > float(held.get("timeout") or 0):
        return f"no heartbeat for {age:.0f} s"
    if held.get("host") == mine["host"] and not _alive(held.get("pid")):
        return f"its process {held.get('pid')} on this host is gone"
    if mine["launch"] is not None and held.get("launch") == mine["launch"]:
        return "an earlier restart of this launch"
    if mine["run_id"] is not None and held.get("run_id") == mine["run_id"]:
        return f"the same run_id {mine['run_id']!r}, restarted"
    return None


def _alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _load_json(raw: bytes, what: str, fix: str) -> Any:
    """JSON of an es_pipe file; a damaged one (invalid, not UTF-8, absurdly nested) is a
    :class:`ManifestError` that says ``fix``."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ManifestError(f"{what} is not valid JSON ({detail}); {fix}") from None


_DONE_TYPES = {"shard": str, "path": str, "staged": str, "rows": int, "size": int, "crc32": int}


def _check_done(done: Mapping[str, Any], path: str, fix: str) -> None:
    """The fields of a done-file the commit relies on, with their types."""
    files = done.get("files")
    if not isinstance(files, list):
        raise ManifestError(f"done-file {path} has no list of 'files'; {fix}")
    for entry in files:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool)
            for k, t in _DONE_TYPES.items()
        ):
            raise ManifestError(
                f"done-file {path} has a damaged file entry ({str(entry)[:200]}); {fix}"
            )


def _storage_error(exc: OSError, what: str) -> ManifestStorageError:
    return ManifestStorageError(
        getattr(exc, "errno", None) or errno.EIO,
        f"{what} failed: the storage refused the write ({type(exc).__name__}: {exc}). The "
        "previous epoch stays the committed one; free space (or fix the storage) and call "
        "again, or restart from the last checkpoint",
    )


def _check_relocate(relocate: Mapping[str, str] | None) -> dict[str, str]:
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


def shard_set_digest(shards: Iterable[str]) -> dict[str, Any]:
    """The shard set of a commit: count and a SHA-1 of the sorted names."""
    names = sorted(set(shards))
    digest = hashlib.sha1("\n".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return {"count": len(names), "sha1": digest}


def run_fingerprint(hyper: Mapping[str, Any]) -> str:
    """A fingerprint of the hyper-parameters that change what the scores mean (policy
    and its betas, B, b, scoring, pruning rule, ...): 16 hex digits."""
    text = json.dumps(hyper, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _ranges(epochs: list[int]) -> str:
    if not epochs:
        return "none"
    if epochs == list(range(epochs[0], epochs[-1] + 1)) and len(epochs) > 2:
        return f"{epochs[0]}..{epochs[-1]}"
    return ", ".join(map(str, epochs))


def _progress(items: list[Any], label: str, progress: bool | None) -> Iterable[Any]:
    show = len(items) > 16 if progress is None else progress
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"reading {label}", unit="file", leave=False)
