"""The reader interface: what a shard format implements, and what the node gives it.

A format (WebDataset tar in :mod:`~es_pipe.sources.webdataset`, Parquet and Arrow IPC in
:mod:`~es_pipe.sources.arrow`) is a :class:`~es_pipe.sources.ShardedSource` subclass that
implements :class:`ShardReader`: stream the samples of *one* shard in its shard order,
and optionally count them. Everything else (epochs, the split across ranks and workers,
state, equalize, pruning, the error policy) is the node's. A reader reaches the node
only through its :class:`ReadContext` (``self.ctx``): opening files, reporting bad
samples, checking a shard's count. It never touches the node's private fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from es_pipe import storage
from es_pipe.errors import ShardError
from es_pipe.retry import Retry, RetryingFile
from es_pipe.sources.stats import StreamStats

__all__ = ["ReadContext", "ShardReader", "ShardSizes"]


class ShardReader(Protocol):
    """What a shard format implements."""

    def iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield the samples of one shard in shard order, after the first ``start`` ones,
        as lists (chunks) of sample dicts: the node hands them out one by one without a
        generator round-trip per sample.

        ``pruned`` is a sorted int64 array of ordinals to leave out; they do not count in
        ``start``. ``rng_seed`` seeds any within-shard shuffle (a function of seed, epoch
        and URL, so a resumed shard replays its order). Raise :class:`ShardError` for a
        shard-level problem; report a bad sample with :meth:`ReadContext.bad_sample`
        (which raises or counts according to ``on_error``); check the shard's sample count
        with :meth:`ReadContext.check_count` as soon as it is known.
        """
        ...

    def count_samples(self, url: str) -> int | None:
        """Number of samples of a shard if it can be known cheaply (a footer), else None."""
        ...


class ShardSizes:
    """The sample count of every listed shard, where known: from the index file or
    ``num_samples=``, else counted by the reader when a count is needed (``equalize``,
    ``split_report``). ``-1`` stands for unknown."""

    def __init__(self, urls: tuple[str, ...], counts: tuple[int, ...]) -> None:
        self.urls = urls
        self.counts = list(counts)
        self._index = {u: i for i, u in enumerate(urls)}

    def known(self, url: str) -> int:
        """The count of ``url`` if known, else -1."""
        i = self._index.get(url)
        return -1 if i is None else self.counts[i]

    def complete(self, count: Callable[[str], int | None]) -> list[int] | None:
        """Every shard's count, asking ``count(url)`` for the unknown ones (and keeping the
        answers); None when some shard cannot be counted cheaply."""
        for i, n in enumerate(self.counts):
            if n < 0:
                counted = count(self.urls[i])
                if counted is None:
                    return None
                self.counts[i] = int(counted)
        return self.counts


@dataclass(eq=False)
class ReadContext:
    """What the node gives its reader: the storage to open shards on, the error policy,
    the known sample counts. One per source; it travels with the source to workers."""

    storage_options: Mapping[str, Any] | None
    retry: Retry
    sizes: ShardSizes
    stats: StreamStats

    @property
    def bad_sample(self) -> Callable[[str], None]:
        """Report one bad sample: raise (``on_error='raise'``) or warn and count."""
        return self.stats.bad_sample

    @property
    def bad_samples(self) -> Callable[[str, int], None]:
        """Report ``count`` bad samples of one shard at once (vectorised readers)."""
        return self.stats.bad_samples

    def open_file(self, url: str) -> RetryingFile:
        """Open a shard for binary reading on its fsspec filesystem, with reads retried
        under the source's ``retry=`` and counted in ``stats["retries"]``. A missing file
        raises ``FileNotFoundError``; a storage misconfiguration a ``StorageError``."""
        fs, path = storage.url_to_fs(url, self.storage_options)
        with storage.named_errors(url):  # no credentials, no bucket...: the fix named
            return RetryingFile(
                fs, path, url=url, retry=self.retry, on_retry=self.stats.count_retry
            )

    def check_count(self, url: str, found: int, unit: str = "samples", why: str = "") -> None:
        """Raise :class:`ShardError` when a shard holds another number of samples than its
        index file (or ``num_samples=``) says: the split and ``equalize`` rely on those
        counts (a wrong one makes ranks yield different numbers of samples: a DDP hang)."""
        known = self.sizes.known(url)
        if known >= 0 and found != known:
            raise ShardError(
                f"shard {url!r} has {found} {unit}, but its index file (or num_samples=) "
                f"says {known}: the shard was changed or is corrupt{why}, or the index is "
                "stale; re-create or re-download the shard, or rewrite the index"
            )
