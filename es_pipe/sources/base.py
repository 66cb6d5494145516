"""The node every shard reader shares: a list of shards read by one stream per epoch.

A concrete reader (:class:`~es_pipe.sources.WebDatasetSource`,
:class:`~es_pipe.sources.ParquetSource`, :class:`~es_pipe.sources.ArrowSource`) only knows
how to stream the samples of *one* shard in its *shard order*, starting after ``start``
samples of that order and leaving out the pruned ordinals
(:class:`~es_pipe.sources.reader.ShardReader`). :class:`ShardedSource` drives it through
an epoch: the plan (:mod:`~es_pipe.sources.plan`, where the state format and the restore
rule are described), ``equalize`` (:mod:`~es_pipe.sources.equalize`), the split across
ranks and workers (:mod:`~es_pipe.sources.world`), ``on_error`` and the counters
(:mod:`~es_pipe.sources.stats`), ``pruned=`` (:mod:`~es_pipe.sources.pruned`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from es_pipe import storage
from es_pipe.checks import is_int
from es_pipe.errors import ConfigError, EsPipeError, ShardError
from es_pipe.forward import Forward
from es_pipe.retry import Retry
from es_pipe.sources.equalize import Equalize, Equalizer
from es_pipe.sources.options import SourceOptions as SourceOptions  # its old home
from es_pipe.sources.options import with_counts
from es_pipe.sources.plan import EpochPlan, plan_state, read_state
from es_pipe.sources.plan import merge_states as merge_states  # its old home
from es_pipe.sources.pruned import Pruned, PrunedSpec
from es_pipe.sources.reader import ReadContext, ShardSizes
from es_pipe.sources.shards import ShardList, url_seed
from es_pipe.sources.stats import OnError, StreamStats
from es_pipe.sources.world import World

__all__ = ["PrunedSpec", "ShardedSource", "SourceOptions", "merge_states"]

log = logging.getLogger(__name__)


class ShardedSource(BaseNode[dict[str, Any]]):
    """Base node: a list of shards read by one stream (rank x worker) per epoch.

    The node composes the parts of a source, one module each: the epoch plan
    (:mod:`~es_pipe.sources.plan`: order, own shards, done set, cursors, state), the
    equalizer (:mod:`~es_pipe.sources.equalize`), the rank/worker world
    (:mod:`~es_pipe.sources.world`), the error policy and stats
    (:mod:`~es_pipe.sources.stats`) and the ``pruned=`` adapter
    (:mod:`~es_pipe.sources.pruned`). What is left here is the delivery loop: open the
    plan's next shard, hand out its chunks sample by sample, count, checkpoint.

    Why it is long (about 380 lines, over the ~250 of the others): it is the torchdata
    node contract (``reset``/``next``/``get_state``), one property per option it
    forwards, and the delivery loop (sample by sample, or block by block with
    :meth:`take_block`); the per-sample fast path (:meth:`next`) reads plain attributes
    of the node itself, so the delivery cursor cannot move to another object without a
    call per sample.

    Subclasses are the readers: they implement :class:`~es_pipe.sources.reader.ShardReader`
    (:meth:`iter_shard`, optionally :meth:`count_samples`) and reach the node only
    through :attr:`ctx`, a :class:`~es_pipe.sources.reader.ReadContext`.

    Args:
        urls: brace pattern, glob, URL, list of those, or a :class:`ShardList`.
        **options: ``shuffle``, ``seed``, ``epoch``, ``rank``, ``world_size``, ``worker``,
            ``num_workers``, ``equalize``, ``on_error``, ``pruned``, ``num_samples``,
            ``retry``, ``storage_options``: see :class:`~es_pipe.sources.options.SourceOptions`.
    """

    def __init__(
        self,
        urls: str | Sequence[str] | ShardList,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        worker: int | None = None,
        num_workers: int | None = None,
        equalize: Equalize = None,
        on_error: OnError = "raise",
        pruned: PrunedSpec = None,
        num_samples: Mapping[str, int] | None = None,
        retry: Retry | int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._stats = StreamStats(on_error)
        self._equalizer = Equalizer(equalize)
        self._pruned = Pruned(pruned)
        for name, value in (("seed", seed), ("epoch", epoch)):
            if not is_int(value, at_least=0, numpy=True):
                raise ConfigError(f"{name}={value!r} must be a non-negative int")
        self.retry = Retry.of(retry)  # also for listing the shards
        shards = ShardList.from_spec(urls, storage_options=storage_options, retry=self.retry)
        self.shards = with_counts(shards, num_samples)
        self.storage_options = self.shards.storage_options
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._world = World.of(rank, world_size, worker, num_workers)
        self._sizes = ShardSizes(self.shards.urls, self.shards.num_samples)
        self.ctx = ReadContext(self.storage_options, self.retry, self._sizes, self._stats)
        """The reader's way to the node (:class:`~es_pipe.sources.reader.ReadContext`)."""
        self._epoch = int(epoch)
        self._next_epoch: int | None = None
        self._started = self._consumed = False
        self._pending_state: dict[str, Any] | None = None
        self._plan = EpochPlan.start(0, self.seed, self._epoch, False, (0, 1))
        self._gen: Iterator[list[dict[str, Any]]] | None = None
        # The delivery cursor, read per sample by next(): plain attributes, no indirection.
        self._chunk: list[dict[str, Any]] = []
        self._chunk_pos = 0
        self._cur_count = 0  # delivered samples of the current shard (or padded ones)
        self._yielded = 0  # delivered samples of the epoch (from its start)
        self._limit: int | None = None  # the equalizer's stop count

    # ------------------------------------------------------------------ the reader interface
    def iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[dict[str, Any]]]:
        """Chunks of one shard's samples (see :meth:`ShardReader.iter_shard
        <es_pipe.sources.reader.ShardReader.iter_shard>`): what a reader implements."""
        raise NotImplementedError

    def count_samples(self, url: str) -> int | None:
        """Number of samples of a shard if it can be known cheaply, else None."""
        return None

    # ------------------------------------------------------------------ public API
    epoch = Forward[int]("_epoch", "The epoch being read (or about to be read).")
    stream = Forward[tuple[int, int]](
        "_plan.stream",
        "``(s, S)``: this node's stream id and the number of streams (ranks x workers).",
    )
    rank = Forward[int]("_world.rank")
    world_size = Forward[int]("_world.world_size")
    equalize = Forward[Equalize]("_equalizer.mode")
    on_error = Forward[OnError]("_stats.on_error")
    last_epoch_stats = Forward[dict[str, Any] | None](
        "_stats.last_epoch", ":attr:`stats` as they were when the last epoch ended (None before)."
    )

    @property
    def pruned(self) -> PrunedSpec:
        """The ``pruned=`` argument (assignable: checked like the argument)."""
        return self._pruned.spec

    @pruned.setter
    def pruned(self, spec: PrunedSpec) -> None:
        self._pruned = Pruned(spec)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of the current epoch on this stream (see :mod:`es_pipe.sources.stats`)."""
        return self._stats.snapshot(self._yielded, self._padded_now())

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``reset(None)`` start epoch ``epoch`` (like ``DistributedSampler``)."""
        self._next_epoch = int(epoch)

    def split_report(self, epoch: int | None = None) -> dict[str, Any]:
        """How ``epoch``'s shards (and samples, where counts are known) split across
        streams; default the epoch being read. Pruned samples are left out of the counts,
        so after an epoch ends, ``split_report(epoch + 1)`` tells the next epoch's length
        before it starts (what a learning-rate schedule needs).

        ``imbalance`` is ``max / mean - 1`` of the per-stream sample counts (or shard counts
        when sample counts are unknown): the fraction of an epoch the slowest stream reads
        beyond the average one.
        """
        epoch = self._epoch if epoch is None else int(epoch)
        plan = EpochPlan.start(
            len(self.shards), self.seed, epoch, self.shuffle, self._world.stream()
        )
        return plan.split_report(epoch, self._kept_sizes(epoch))

    # ------------------------------------------------------------------ BaseNode
    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        # Check first: a refused state (or worker arguments) leaves the node as it was,
        # its open shard included.
        stream = self._world.stream()
        got = None if initial_state is None else read_state(initial_state, self.shards, stream)
        super().reset(initial_state)
        self._close_current()
        self._pending_state = None
        if got is None:
            if self._next_epoch is not None:
                self._epoch, self._next_epoch = self._next_epoch, None
            elif self._started and self._consumed:
                self._epoch += 1
            self._start_epoch(EpochPlan.start(*self._order_args(), stream), 0, 0)
        else:
            self.seed, self.shuffle, self._epoch = got.seed, got.shuffle, got.epoch
            self._next_epoch = None
            plan = EpochPlan.start(
                *self._order_args(), stream, got.done, got.cursors, got.remaining_only
            )
            self._start_epoch(plan, got.yielded, got.padded)
        self._started = True
        self._consumed = False

    def __next__(self) -> dict[str, Any]:
        # Fast path: a chunk exists only after reset(), so BaseNode's lazy initialisation
        # is needed only when the chunk is used up.
        sample = self._from_chunk()
        return sample if sample is not None else super().__next__()

    def next(self) -> dict[str, Any]:
        sample = self._from_chunk()
        return sample if sample is not None else self._next_slow()

    def _from_chunk(self) -> dict[str, Any] | None:
        """The next sample of the chunk the reader produced last, if any is left."""
        pos = self._chunk_pos
        if pos < len(self._chunk) and (self._limit is None or self._yielded < self._limit):
            self._chunk_pos = pos + 1
            self._yielded += 1
            self._cur_count += 1
            return self._chunk[pos]
        return None

    def take_block(self) -> Any:
        """Reader interface, for readers whose chunk items are *blocks* of samples (e.g.
        columns of several rows: ``len(block)`` samples, ``block.slice(0, n)`` the first
        ``n``): the next block of the current chunk, handed out whole and counted as its
        samples, cut where ``equalize`` ends the stream, so cursors, counts and states
        stay those of sample-by-sample delivery. None when the chunk is used up or the
        stream is at its limit. Such a reader delivers with it in place of the per-sample
        ``_from_chunk``."""
        pos = self._chunk_pos
        if pos >= len(self._chunk):
            return None
        block: Any = self._chunk[pos]
        n = len(block)
        if self._limit is not None:
            room = self._limit - self._yielded
            if room <= 0:
                return None
            if n > room:
                block, n = block.slice(0, room), room
        self._chunk_pos = pos + 1
        self._yielded += n
        self._cur_count += n
        return block

    def _next_slow(self) -> dict[str, Any]:
        if self._pending_state is not None:
            self.reset(self._pending_state)
        self._consumed = True
        while True:
            if self._limit is not None and self._yielded >= self._limit:
                self._end_epoch()
            if self._chunk_pos < len(self._chunk):
                return self.next()
            if self._gen is None and not self._open_next():
                self._end_epoch()
            assert self._gen is not None
            try:
                self._chunk = next(self._gen)
                self._chunk_pos = 0
            except StopIteration:
                self._finish_current()
                continue
            except EsPipeError as exc:
                self._shard_failed(exc)
                continue
            except Exception as exc:  # a reader or filesystem error: name the shard
                storage.raise_storage_error(exc, self._cur_url())
                self._shard_failed(
                    ShardError(
                        f"shard {self._cur_url()!r} could not be read: "
                        f"{type(exc).__name__}: {exc}; check that the file is intact and "
                        "readable, or pass on_error='skip' to skip it"
                    ).with_traceback(exc.__traceback__)
                )
                continue

    def get_state(self) -> dict[str, Any]:
        if self._pending_state is not None:
            return dict(self._pending_state)
        return plan_state(
            self._plan,
            self.shards,
            seed=self.seed,
            epoch=self._epoch,
            shuffle=self.shuffle,
            current_count=self._cur_count,
            yielded=self._yielded,
            padded=self._padded_now(),
        )

    def __getstate__(self) -> dict[str, Any]:
        # An open shard cannot travel to another process: send the position instead.
        d = self.__dict__.copy()
        if self._gen is not None:
            d["_pending_state"] = self.get_state()
        d["_gen"] = None
        d["_chunk"] = []
        d["_chunk_pos"] = 0
        return d

    def __del__(self) -> None:
        self._close_current()

    # ------------------------------------------------------------------ internals
    def _order_args(self) -> tuple[int, int, int, bool]:
        return len(self.shards), self.seed, self._epoch, self.shuffle

    def _padded_now(self) -> int:
        return self._equalizer.padded_now(self._cur_count)

    def _cur_url(self) -> str:
        if self._plan.current is not None:
            return self.shards.urls[self._plan.current]
        return self._equalizer.url or "?"

    def _kept_sizes(self, epoch: int | None = None) -> list[int] | None:
        """Every shard's samples left after pruning in ``epoch`` (default: this one);
        None when some shard's count is unknown and cannot be counted cheaply."""
        sizes = self._sizes.complete(self.count_samples)
        if sizes is None:
            return None
        return self._pruned.kept(self.shards.urls, sizes, self._epoch if epoch is None else epoch)

    def _start_epoch(self, plan: EpochPlan, yielded: int, padded: int) -> None:
        self._plan = plan
        self._yielded = yielded
        self._chunk, self._chunk_pos, self._cur_count = [], 0, 0
        self._equalizer.start_epoch(padded)
        self._stats.start_epoch(self._epoch, yielded, padded)
        self._limit = None
        if self.equalize is not None:
            kept = self._equalizer.needs_counts(self._kept_sizes())
            self._limit, self._stats.counts["dropped"] = self._equalizer.limit(
                plan, kept, self._epoch
            )
            if padded and self.equalize == "pad":  # restored while padding: replay the cycle
                plan.skip_to_end()
                self._open_pad(start=self._equalizer.replay(plan, kept))
        elif not plan.own:
            plan.warn_idle(self._epoch)

    def _read(self, url: str, start: int, pruned: np.ndarray) -> None:
        self._gen = self.iter_shard(url, start, pruned, url_seed(self.seed, self._epoch, url))

    def _open_next(self) -> bool:
        """Open the next shard of the plan (or of the padding cycle); False at the end."""
        nxt = self._plan.next_shard()
        if nxt is not None:
            i, start = nxt
            url = self.shards.urls[i]
            pruned = self._pruned.ordinals(url, self._epoch)
            if start == 0:
                self._stats.counts["pruned"] += int(pruned.size)
            if pruned.size:
                log.debug("shard %s: %d pruned samples skipped unread", url, pruned.size)
            self._stats.counts["shards"] += 1
            self._cur_count = start
            self._read(url, start, pruned)
            return True
        if self.equalize == "pad" and self._limit is not None and self._yielded < self._limit:
            return self._open_pad()
        return False

    def _open_pad(self, start: int = 0) -> bool:
        """Open the next shard of the padding cycle, ``start`` samples in."""
        step = self._equalizer.next_pad(self._plan, self._yielded, self._cur_count)
        if step is None:
            return False
        i, self._cur_count = step
        self._plan.current = None
        url = self._equalizer.url = self.shards.urls[i]
        self._read(url, start, self._pruned.ordinals(url, self._epoch))
        return True

    def _finish_current(self) -> None:
        self._close_current()
        if self._plan.current is not None:
            self._cur_count = 0
        self._plan.finish_current()

    def _close_current(self) -> None:
        self._chunk, self._chunk_pos = [], 0
        gen = getattr(self, "_gen", None)
        if gen is not None:
            self._gen = None
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    def _shard_failed(self, exc: EsPipeError) -> None:
        try:
            self._stats.shard_failed(exc, self._cur_url())
        except BaseException:
            self._close_current()
            raise
        self._finish_current()

    def _end_epoch(self) -> None:
        self._close_current()
        self._stats.end_epoch(self._yielded, self._padded_now(), self._plan.stream)
        raise StopIteration
