"""Retries of filesystem calls: a bounded policy with exponential backoff and jitter.

Remote filesystems (object stores, HTTP) fail now and then for reasons that go away: a
reset connection, a timeout, a throttled request. es_pipe retries such *transient* errors
a few times, waiting ``backoff * 2**k`` seconds (at most ``max_delay``, shortened by a
random fraction of up to ``jitter``) before retry ``k + 1``, and counts every retry.

What is transient (:meth:`Retry.is_transient`): an instance of ``retry_on`` (default
``OSError``, which covers ``ConnectionError`` and ``TimeoutError``, and asyncio's
timeouts), except errors that another try cannot fix: ``FileNotFoundError``,
``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``, ``FileExistsError``,
a full disk or quota (``ENOSPC``, ``EDQUOT``), a read-only filesystem, and every es_pipe
error. Data-format errors (a corrupt Parquet page, a bad tar header) are never retried:
retries wrap only the filesystem calls themselves, never the decoding of their bytes.

Two ways in:

* :meth:`Retry.call` runs one whole, idempotent operation (``cat_file``, ``pipe_file``,
  ``ls``, ``info``, ``copy``) again after a transient error: what the manifests do.
* :class:`RetryingFile` is a read-only file whose reads are retried in place: after a
  transient error it reopens the file and seeks back to the position of the failed read,
  so the bytes a reader sees are exactly the bytes of the file, none twice, none missing
  (shards are immutable). What the shard readers use.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from es_pipe.errors import ConfigError, EsPipeError, ShardError

__all__ = ["Retry", "RetryingFile"]

log = logging.getLogger("es_pipe")
T = TypeVar("T")

_NEVER = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    EsPipeError,
)
_NEVER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOENT",
        "EACCES",
        "EPERM",
        "EISDIR",
        "ENOTDIR",
        "EEXIST",
        "ENOSPC",
        "EDQUOT",
        "EROFS",
        "EFBIG",
        "ENAMETOOLONG",
        "EINVAL",
        "EBADF",
    )
    if hasattr(errno, name)
)


class Retry:
    """A retry policy for filesystem calls.

    Args:
        attempts: tries in all, the first included (``1``: no retry). Default 3.
        backoff: the wait before the first retry, in seconds; it doubles for each further
            retry. Default 0.2.
        max_delay: the longest wait between two tries, in seconds. Default 5.
        jitter: each wait is shortened by a random fraction in ``[0, jitter)`` so that
            many ranks retrying at once do not hit the storage in step. Default 0.5.
        retry_on: exception types that may be transient (default ``OSError`` and asyncio's
            ``TimeoutError``); the exclusions listed in the module docstring always apply.
            Add your filesystem's own transient error types here (e.g. an HTTP client's).
        seed: seed of the jitter; ``None`` draws one from the system.

    Pass one wherever es_pipe takes ``retry=`` (the sources, :class:`~es_pipe.Manifests`);
    an ``int`` there means ``Retry(attempts=that)``.
    """

    def __init__(
        self,
        attempts: int = 3,
        *,
        backoff: float = 0.2,
        max_delay: float = 5.0,
        jitter: float = 0.5,
        retry_on: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError),
        seed: int | None = None,
    ) -> None:
        if not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(f"Retry(attempts={attempts!r}): need an int >= 1 (1 = no retry)")
        if backoff < 0 or max_delay < 0 or not 0 <= jitter <= 1:
            raise ConfigError(
                f"Retry(backoff={backoff}, max_delay={max_delay}, jitter={jitter}): need "
                "backoff >= 0, max_delay >= 0 and 0 <= jitter <= 1"
            )
        self.attempts = attempts
        self.backoff = float(backoff)
        self.max_delay = float(max_delay)
        self.jitter = float(jitter)
        self.retry_on = tuple(retry_on)
        self.seed = seed
        self._rng = random.Random(seed)

    @classmethod
    def of(cls, spec: Retry | int | None) -> Retry:
        """The policy a ``retry=`` option names: a :class:`Retry`, an int (attempts) or
        ``None`` (the default policy)."""
        if spec is None:
            return cls()
        if isinstance(spec, Retry):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls(spec)
        raise ConfigError(
            f"retry={spec!r}: pass es_pipe.Retry(attempts=..., backoff=...), an int number of "
            "attempts (1 = no retry), or None for the default"
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy sent to a DataLoader worker draws its own jitter unless a seed was given.
        self.__dict__.update(state)
        if self.seed is None:
            self._rng = random.Random()

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self.attempts}, backoff={self.backoff}, "
            f"max_delay={self.max_delay}, jitter={self.jitter})"
        )

    def is_transient(self, exc: BaseException) -> bool:
        """Whether another try may succeed where ``exc`` was raised."""
        if isinstance(exc, _NEVER) or not isinstance(exc, self.retry_on):
            return False
        return getattr(exc, "errno", None) not in _NEVER_ERRNOS

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        base = min(self.max_delay, self.backoff * 2.0 ** (retry - 1))
        return base * (1.0 - self.jitter * self._rng.random())

    def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        what: str | None = None,
        on_retry: Callable[[int, BaseException], None] | None = None,
        exhausted: Callable[[BaseException, int], BaseException] | None = None,
        failed: BaseException | None = None,
    ) -> T:
        """``fn(*args)``, tried up to ``attempts`` times while it raises transient errors.

        ``on_retry(k, exc)`` is called before retry ``k``; when the tries run out, the error
        that ``exhausted(last_exc, attempts)`` builds is raised (default: the last error
        itself). Other errors propagate at once, unchanged. ``what`` names the call in the
        log message of each retry (logger ``es_pipe``, level WARNING). ``failed``: the
        error the first try already raised (a caller's fast path made it): only the
        retries are left."""
        exc, attempt = failed, 1 if failed is not None else 0
        while True:
            if exc is not None:
                if not self.is_transient(exc):
                    raise exc
                if attempt >= self.attempts:
                    if exhausted is None:
                        raise exc
                    raise exhausted(exc, attempt) from exc
                if on_retry is not None:
                    on_retry(attempt, exc)
                wait = self.delay(attempt)
                log.warning(
                    "es_pipe: %s: %s; retry %d of %d in %.2f s",
                    what or getattr(fn, "__name__", "call"),
                    _describe(exc),
                    attempt,
                    self.attempts - 1,
                    wait,
                )
                time.sleep(wait)
            attempt += 1
            try:
                return fn(*args)
            except BaseException as error:  # judged at the top of the loop
                exc = error


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def gave_up(
    error: Callable[[str], BaseException], what: str, advice: str
) -> Callable[[BaseException, int], BaseException]:
    """An ``exhausted=`` for :meth:`Retry.call`: ``error("WHAT failed N times in a row
    (the last error); ADVICE")``, the one form of every "the retries ran out" message."""

    def build(exc: BaseException, attempts: int) -> BaseException:
        return error(f"{what} failed {attempts} times in a row ({_describe(exc)}); {advice}")

    return build


class RetryingFile:
    """A read-only binary file over an fsspec filesystem whose reads are retried.

    ``read`` and ``seek`` that raise a transient error (see :meth:`Retry.is_transient`)
    are retried under ``retry``: the file is reopened and positioned where the failed
    call started, so the stream of bytes is exactly the file's. A file that cannot seek
    (a plain HTTP stream) is only retried before its first byte was read. When the tries
    run out, :class:`~es_pipe.ShardError` names the shard, the number of attempts and the
    fix. ``on_retry()`` is called once per retry (the sources count them in ``stats``).

    Opening is retried the same way; a missing file raises ``FileNotFoundError`` at once.
    """

    def __init__(
        self,
        fs: Any,
        path: str,
        *,
        url: str,
        retry: Retry,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.fs, self.path, self.url, self.retry = fs, path, url, retry
        self._on_retry = on_retry
        self._pos = 0
        self._f: Any = None
        self._f = self._call("open", lambda: self._f)
        self._seekable = bool(getattr(self._f, "seekable", lambda: False)())

    def _call(self, what: str, fn: Callable[[], T], failed: BaseException | None = None) -> T:
        """``fn()`` on the open file, retried: a failed try closes the file, the next one
        reopens it at the position where the failed call began. ``failed``: the error of
        a first try already made."""

        def again(_: int, exc: BaseException) -> None:
            if self._on_retry is not None:
                self._on_retry()
            old, self._f = self._f, None
            if old is not None:
                try:
                    old.close()
                except Exception:  # a broken handle may fail to close: it is dropped anyway
                    log.debug("es_pipe: closing %s after %s failed", self.url, _describe(exc))

        def attempt() -> T:
            if self._f is None:
                if self._pos and not self._seekable:
                    raise ShardError(
                        f"shard {self.url!r}: a read at byte {self._pos} failed and the file "
                        "cannot seek back to retry it; pass on_error='skip' to skip it"
                    )
                f = self.fs.open(self.path, "rb")
                if self._pos:
                    f.seek(self._pos)
                self._f = f
            return fn()

        give_up = gave_up(
            ShardError,
            f"shard {self.url!r}: {what}",
            "the filesystem kept failing. Check the storage or the network, allow more "
            "attempts with retry=es_pipe.Retry(attempts=...), or pass on_error='skip' to skip "
            "such shards",
        )
        return self.retry.call(
            attempt, what=f"{what} {self.url}", on_retry=again, exhausted=give_up, failed=failed
        )

    # -- the file protocol (what tarfile, pyarrow and fsspec's decompressors use) -------
    def read(self, n: int = -1) -> bytes:
        try:  # the fast path: one plain read
            data = self._f.read(n)
        except Exception as exc:
            data = self._call("read", lambda: self._f.read(n), failed=exc)
        self._pos += len(data)
        return cast(bytes, data)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            self._pos = self._f.seek(offset, whence)
        except Exception as exc:
            self._pos = self._call("seek", lambda: self._f.seek(offset, whence), failed=exc)
        if self._pos is None:  # some file objects return None
            self._pos = self._f.tell()
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return self._seekable

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._f is None or bool(getattr(self._f, "closed", False))

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()

    def __enter__(self) -> RetryingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
