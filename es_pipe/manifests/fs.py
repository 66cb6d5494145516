"""The retrying filesystem of a manifest root: every fsspec call retried, counted, and
every file written whole.

Every filesystem call (``cat_file``, ``pipe_file``, ``ls``, ``info``, ``copy``, ``rm``) is
retried after transient errors under the root's ``retry=`` policy (:class:`es_pipe.Retry`)
and counted in :attr:`ManifestFS.retries`. A write that fails for good removes what it may
have left half-written (a filesystem without atomic writes can leave a prefix), so a failed
commit never leaves a truncated marker behind. Single objects are written whole: object
stores guarantee it for one PUT; on a local disk es_pipe writes to a hidden temporary name
and ``os.replace``-s it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import threading
import zlib
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from es_pipe import storage
from es_pipe.errors import ConfigError, ManifestError, ManifestStorageError
from es_pipe.retry import Retry, gave_up

STORAGE_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n)
)


class ManifestFS:
    """The fsspec filesystem of one manifest root, its calls retried under ``retry``.

    Args:
        url: the root, a directory or fsspec URL; refused (``ConfigError``) when it names
            a file, an unknown protocol or a backend that is not installed.
        storage_options: passed to fsspec.
        retry: an :class:`es_pipe.Retry`, an int number of attempts or ``None`` for
            ``Retry()``.

    Attributes:
        retries: calls retried so far through this object.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        retry: Retry | int | None = None,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"manifests={url!r} must be a directory path or fsspec URL")
        self.url = url
        try:
            self.fs, path = storage.url_to_fs(url, storage.check_options(storage_options))
        except (ValueError, ImportError) as exc:  # an unknown protocol, a missing backend
            raise ConfigError(f"manifests={url!r}: {exc}; give a folder or fsspec URL") from None
        self.root = path.rstrip("/") or "/"
        self.retry = Retry.of(retry)
        self.retries = 0
        self.token = secrets.token_hex(4)  # names this object's temporary files
        self._lock = threading.Lock()
        try:  # refused now, not after an epoch of training when the first write fails
            kind = self.io(f"info {self.root}", self.fs.info, self.root).get("type")
        except (FileNotFoundError, NotADirectoryError):
            kind = None  # created on the first write (object stores have no folders)
        if kind not in (None, "directory"):
            raise ConfigError(
                f"manifests={url!r} is a {kind}, not a folder; give a folder (es_pipe "
                "creates it) or the fsspec URL of one"
            )

    @property
    def local(self) -> bool:
        """Whether the root is on a local disk (links and ``os.replace`` exist there)."""
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` (relative to the root)."""
        return "/".join([self.root, *parts])

    def io(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, a filesystem call retried under :attr:`retry`."""

        def count(_: int, __: BaseException) -> None:
            with self._lock:
                self.retries += 1

        give_up = gave_up(
            ManifestError,
            what,
            f"the storage of {self.url} kept failing. Check it (or the network) and call again "
            "(a failed commit leaves the previous epoch committed), or allow more attempts "
            "with retry=es_pipe.Retry(attempts=...)",
        )
        with storage.named_errors(self.url):  # no credentials, no bucket...: the fix named
            return self.retry.call(fn, *args, what=what, on_retry=count, exhausted=give_up)

    def read(self, path: str) -> bytes:
        """The bytes of ``path`` (``FileNotFoundError`` propagates)."""
        return self.io(f"read {path}", self.fs.cat_file, path)

    def ls(self, path: str, detail: bool) -> list[Any]:
        """A fresh listing of ``path``: another rank writes here, and s3fs/gcsfs would
        answer from a cached one."""
        self.fs.invalidate_cache(path)
        return self.io(f"ls {path}", self.fs.ls, path, detail)

    def exists(self, path: str) -> bool:
        # not fs.exists: it answers False for any error, a transient one included
        try:
            self.io(f"info {path}", self.fs.info, path)
        except (FileNotFoundError, NotADirectoryError):  # under a file: not there either
            return False
        return True

    def rm(self, path: str, *, recursive: bool = False) -> None:
        """Remove ``path``; already gone is fine (a retried remove may find it so)."""
        with contextlib.suppress(FileNotFoundError):
            self.io(f"rm {path}", self.fs.rm, path, recursive)

    def put(self, path: str, data: bytes | pa.Buffer, *, atomic: bool) -> None:
        """Write ``data`` whole, in one PUT (object stores); on a local disk through a
        hidden temporary name and ``os.replace`` when ``atomic``. Retried after transient
        errors; a write that fails removes what it wrote (a filesystem without atomic
        writes may keep a prefix), so no half-written file is left under its name.
        A full disk (or quota, or read-only filesystem) raises
        :class:`ManifestStorageError`; a file where es_pipe needs a folder raises
        :class:`ManifestError`."""
        try:
            self.io(f"write {path}", self._put_once, path, data, atomic)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ManifestError(
                f"cannot write {path}: a file of the manifests folder {self.root} stands where "
                f"es_pipe keeps a folder ({exc}). Remove it, or give manifests= a folder of "
                "its own"
            ) from None
        except OSError as exc:
            if getattr(exc, "errno", None) in STORAGE_ERRNOS:
                raise storage_error(exc, f"writing {path}") from exc
            raise

    def _put_once(self, path: str, data: bytes | pa.Buffer, atomic: bool) -> None:
        if self.local:
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            target = os.path.join(directory, f".{name}.{self.token}.tmp") if atomic else path
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


def crc(data: bytes | memoryview | pa.Buffer) -> int:
    """The crc32 that markers and done-files record for a file's bytes."""
    return zlib.crc32(memoryview(data)) & 0xFFFFFFFF


def load_json(raw: bytes, what: str, fix: str) -> Any:
    """JSON of an es_pipe file; a damaged one (invalid, not UTF-8, absurdly nested) is a
    :class:`ManifestError` that says ``fix``."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ManifestError(f"{what} is not valid JSON ({detail}); {fix}") from None


def storage_error(exc: OSError, what: str) -> ManifestStorageError:
    """The error of a write the storage refused for good (full disk, quota, read-only)."""
    return ManifestStorageError(
        getattr(exc, "errno", None) or errno.EIO,
        f"{what} failed: the storage refused the write ({type(exc).__name__}: {exc}). The "
        "previous epoch stays the committed one; free space (or fix the storage) and call "
        "again, or restart from the last checkpoint",
    )
