"""A stream's epoch counters and the ``on_error`` policy that feeds them.

``on_error="raise"`` turns a bad sample or shard into a :class:`ShardError`;
``on_error="skip"`` warns, counts it and goes on, and the end of the epoch warns a summary.
A storage misconfiguration (no credentials, no bucket) is raised under both: it is
configuration, not bad data. Counters (what ``source.stats`` returns):

``samples`` delivered, ``shards`` opened, ``pruned`` ordinals given to the hook for the
shards opened, ``skipped_samples``/``skipped_shards`` (``on_error='skip'``), ``padded``
repeats and ``dropped`` surplus (``equalize``), ``retries`` of reads after transient
filesystem errors (``retry=``), ``errors`` (first 20 messages).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

from es_pipe import storage
from es_pipe.errors import ConfigError, EsPipeError, ShardError

__all__ = ["OnError", "StreamStats"]

log = logging.getLogger("es_pipe.sources.base")
OnError = Literal["raise", "skip"]
_MAX_ERRORS_KEPT = 20


class StreamStats:
    """The counters of one stream's epoch, the ``on_error`` policy, the epoch's summary.

    ``samples`` and ``padded`` are not counted here, per sample: the node counts its
    deliveries and hands its running totals to :meth:`snapshot`, which subtracts the
    totals the epoch started from (a restored epoch starts from the restored totals).
    """

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.last_epoch: dict[str, Any] | None = None
        self.start_epoch(None, 0, 0)

    def start_epoch(self, epoch: int | None, yielded: int, padded: int) -> None:
        """Zero the counters for ``epoch``, which starts at these delivered totals."""
        self.counts: dict[str, Any] = {
            "epoch": epoch,
            "samples": 0,
            "shards": 0,
            "pruned": 0,
            "skipped_samples": 0,
            "skipped_shards": 0,
            "padded": 0,
            "dropped": 0,
            "retries": 0,
            "errors": [],
        }
        self._start = (yielded, padded)
        self._reported = False

    def snapshot(self, yielded: int, padded: int) -> dict[str, Any]:
        """A copy of the counters, ``samples``/``padded`` from the node's running totals."""
        st = dict(self.counts)
        st["errors"] = list(self.counts["errors"])
        st["samples"] = yielded - self._start[0]
        st["padded"] = padded - self._start[1]
        return st

    def count_retry(self) -> None:
        """One read retried after a transient error (``RetryingFile``'s ``on_retry``)."""
        self.counts["retries"] += 1

    def bad_sample(self, message: str) -> None:
        """Report one bad sample: raise (on_error='raise') or warn and count ('skip')."""
        if self.on_error == "raise":
            raise ShardError(message + "; or pass on_error='skip' to skip such samples")
        warnings.warn(f"skipping a sample: {message}", stacklevel=3)
        log.info("skipping a sample: %s", message)
        self.counts["skipped_samples"] += 1
        self._remember(message)

    def bad_samples(self, message: str, count: int) -> None:
        """Report ``count`` bad samples of one shard at once (vectorised readers)."""
        if self.on_error == "raise":
            raise ShardError(message + "; or pass on_error='skip' to skip such samples")
        warnings.warn(f"skipping {count} samples: {message}", stacklevel=3)
        log.info("skipping %d samples: %s", count, message)
        self.counts["skipped_samples"] += int(count)
        self._remember(message)

    def shard_failed(self, exc: EsPipeError, url: str) -> None:
        """Raise the error a shard's read ended with, or, under ``on_error='skip'``, warn
        and count the rest of the shard as skipped (the caller then moves on)."""
        found = storage.storage_error(exc, url)
        if found is not None:  # configuration, not a bad shard: raised under "skip" too
            if found is exc:
                raise exc
            raise found from exc
        if self.on_error == "raise" or not isinstance(exc, ShardError):
            raise exc
        warnings.warn(f"skipping the rest of a shard: {exc}", stacklevel=4)
        log.info("skipping the rest of shard %s: %s", url, exc)
        self.counts["skipped_shards"] += 1
        self._remember(str(exc))

    def _remember(self, message: str) -> None:
        if len(self.counts["errors"]) < _MAX_ERRORS_KEPT:
            self.counts["errors"].append(message)

    def end_epoch(self, yielded: int, padded: int, stream: tuple[int, int]) -> None:
        """Keep the epoch's counters as :attr:`last_epoch`, log them and warn a summary of
        what ``on_error='skip'`` skipped; once per epoch, however often the end is hit."""
        if self._reported:
            return
        self._reported = True
        st = self.last_epoch = self.snapshot(yielded, padded)
        log.info(
            "epoch %s, stream %d of %d: %d samples read, %d pruned samples skipped, %d shards",
            st["epoch"],
            stream[0],
            stream[1],
            st["samples"],
            st["pruned"],
            st["shards"],
        )
        if st["skipped_samples"] or st["skipped_shards"]:
            warnings.warn(
                f"epoch {st['epoch']}, stream {stream[0]} of {stream[1]}: "
                f"skipped {st['skipped_samples']} bad samples and the rest of "
                f"{st['skipped_shards']} bad shards (on_error='skip'); first errors: "
                f"{st['errors'][:3]}",
                stacklevel=4,
            )
