"""A fault-injecting fsspec filesystem for tests: ``faulty:///abs/path`` is the local file
``/abs/path``, reached through a filesystem that fails on a seeded schedule.

It is deliberately *not* a ``LocalFileSystem`` subclass, so es_pipe treats it as a remote
store (whole-object PUTs, server-side copies, no atomic rename) - and a harsh one: a write
that fills the disk keeps the bytes written so far, as a POSIX or FUSE mount would.

Faults (one :class:`Faults` plan, shared by every instance; install it with
:func:`installed`):

* ``read_error_rate``: each read call (``read()`` of an open file, ``open`` for reading,
  ``cat_file``, ``info``, ``ls``) raises a transient error (``ConnectionResetError``,
  ``TimeoutError`` or ``OSError(EIO)``) with this probability, drawn from ``seed``; never
  more than ``max_consecutive`` times in a row on one path, so a retry policy with more
  attempts always gets through.
* ``broken``: substrings of paths whose reads always fail (``ConnectionResetError``) once
  ``broken_after`` reads of that path have succeeded: a shard that keeps failing.
* ``write_error_at=N``: the N-th mutating call (0-based; ``pipe_file``, ``cp_file``, ``rm``,
  a file opened for writing) raises ``OSError(EIO)`` without writing; with
  ``write_error_persistent`` every later one does too, until :meth:`Faults.heal`.
* ``disk_full_at=N``: the N-th mutating call writes its first ``disk_full_bytes`` bytes and
  raises ``OSError(ENOSPC)``; every later write raises ``ENOSPC`` at once (removing files
  still works) until :meth:`Faults.heal`.

``Faults.injected`` counts the faults by kind; ``reads`` and ``writes`` count the calls.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem


class Faults:
    def __init__(
        self,
        *,
        seed: int = 0,
        read_error_rate: float = 0.0,
        max_consecutive: int = 2,
        broken: tuple[str, ...] = (),
        broken_after: int = 0,
        write_error_at: int | None = None,
        write_error_persistent: bool = False,
        disk_full_at: int | None = None,
        disk_full_bytes: int = 0,
    ) -> None:
        self.rng = random.Random(seed)
        self.read_error_rate = read_error_rate
        self.max_consecutive = max_consecutive
        self.broken = broken
        self.broken_after = broken_after
        self.write_error_at = write_error_at
        self.write_error_persistent = write_error_persistent
        self.disk_full_at = disk_full_at
        self.disk_full_bytes = disk_full_bytes
        self.reads = 0
        self.writes = 0
        self.injected: Counter[str] = Counter()
        self.written: list[tuple[str, str, int]] = []  # mutating calls: (what, path, bytes)
        self._full = False
        self._dead = False
        self._streak: Counter[str] = Counter()
        self._ok_reads: Counter[str] = Counter()

    def heal(self) -> None:
        """The storage is back: no more write faults."""
        self.write_error_at = self.disk_full_at = None
        self._full = self._dead = False

    # -- called by the filesystem ---------------------------------------------------
    def read(self, path: str, *, resets: bool = True) -> None:
        """A read call on ``path``: raise a transient error, or count a success."""
        self.reads += 1
        if any(b in path for b in self.broken) and self._ok_reads[path] >= self.broken_after:
            self.injected["read_broken"] += 1
            raise ConnectionResetError(errno.ECONNRESET, f"injected: {path} keeps failing")
        if self._streak[path] < self.max_consecutive and self.rng.random() < self.read_error_rate:
            self._streak[path] += 1
            self.injected["read_transient"] += 1
            kind = self.rng.randrange(3)
            if kind == 0:
                raise ConnectionResetError(errno.ECONNRESET, f"injected: reset reading {path}")
            if kind == 1:
                raise TimeoutError(f"injected: timeout reading {path}")
            raise OSError(errno.EIO, f"injected: I/O error reading {path}")
        if resets:
            self._streak[path] = 0
        self._ok_reads[path] += 1

    def write(self, what: str, path: str, data: bytes | None, local: LocalFileSystem) -> None:
        """A mutating call: inject its fault, or do it (``data`` None: remove ``path``)."""
        n = self.writes
        self.writes += 1
        self.written.append((what, path, 0 if data is None else len(data)))
        if data is not None and self._full:
            self.injected["disk_full_again"] += 1
            raise OSError(errno.ENOSPC, f"injected: no space left writing {path}")
        if data is not None and n == self.disk_full_at:
            self._full = True
            self.injected["disk_full"] += 1
            _write(path, data[: self.disk_full_bytes])
            raise OSError(
                errno.ENOSPC, f"injected: disk full after {self.disk_full_bytes} bytes of {path}"
            )
        if self._dead or n == self.write_error_at:
            self._dead = self.write_error_persistent
            self.injected["write_error"] += 1
            raise OSError(errno.EIO, f"injected: I/O error on {what} {path}")
        if data is None:
            local.rm(path, recursive=True)
        else:
            _write(path, data)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:  # not atomic: a failure leaves what was written
        f.write(data)


_PLAN = Faults()


class _Reader(io.RawIOBase):
    """A local file whose reads consult the plan."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        _PLAN.read(self.path)
        return self._f.read(n)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


class _Writer(io.BytesIO):
    def __init__(self, fs: FaultyFileSystem, path: str) -> None:
        super().__init__()
        self._fs, self._path = fs, path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._fs.pipe_file(self._path, data)


class FaultyFileSystem(AbstractFileSystem):
    protocol = "faulty"
    root_marker = "/"
    cachable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local = LocalFileSystem()

    # reads
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        _PLAN.read(path)
        return self.local.ls(path, detail=detail)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        _PLAN.read(path)
        return self.local.info(path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any):
        path = self._strip_protocol(path)
        _PLAN.read(path)
        return self.local.cat_file(path, start=start, end=end)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            _PLAN.read(path, resets=False)  # a retry's success is the read, not the open
            return _Reader(path)
        return _Writer(self, path)

    # writes
    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        _PLAN.write("pipe", self._strip_protocol(path), bytes(value), self.local)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        data = self.cat_file(path1)
        _PLAN.write("copy", self._strip_protocol(path2), data, self.local)

    def copy(self, path1: str, path2: str, recursive: bool = False, **kwargs: Any) -> None:
        self.cp_file(path1, path2)

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        path = self._strip_protocol(path)
        if not os.path.lexists(path):
            raise FileNotFoundError(path)
        _PLAN.write("rm", path, None, self.local)

    def rm_file(self, path: str) -> None:
        self.rm(path)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


def url(path: Any) -> str:
    """The ``faulty://`` URL of a local path."""
    return "faulty://" + os.path.abspath(os.fspath(path))


@contextlib.contextmanager
def installed(plan: Faults) -> Iterator[Faults]:
    """Make ``plan`` the schedule of every faulty:// filesystem for the block."""
    global _PLAN
    old, _PLAN = _PLAN, plan
    try:
        yield plan
    finally:
        _PLAN = old


def report(name: str, summary: dict[str, Any]) -> None:
    """Add ``summary`` under ``name`` to the JSON file named by ``ES_PIPE_FAULTS_REPORT``
    (if set): the fault counts the README's reliability figures quote."""
    target = os.environ.get("ES_PIPE_FAULTS_REPORT")
    if not target:
        return
    try:
        with open(target, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        data = {}
    data[name] = summary
    with open(target, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
