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
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
from torchdata.nodes import BaseNode

from es_pipe import storage
from es_pipe.checks import is_int
from es_pipe.errors import ConfigError, EsPipeError, ShardError
from es_pipe.retry import Retry
from es_pipe.sources.equalize import Equalize, Equalizer
from es_pipe.sources.plan import EpochPlan, plan_state, read_state
from es_pipe.sources.plan import merge_states as merge_states  # its old home
from es_pipe.sources.pruned import Pruned, PrunedSpec
from es_pipe.sources.reader import ReadContext, ShardSizes
from es_pipe.sources.shards import ShardList, epoch_order, url_seed
from es_pipe.sources.stats import OnError, StreamStats
from es_pipe.sources.world import World

__all__ = ["PrunedSpec", "ShardedSource", "SourceOptions", "merge_states"]

log = logging.getLogger(__name__)


class SourceOptions(TypedDict, total=False):
    """The options every source takes (see :class:`ShardedSource` for their meaning)."""

    shuffle: bool
    seed: int
    epoch: int
    rank: int | None
    world_size: int | None
    worker: int | None
    num_workers: int | None
    equalize: Literal["drop", "pad"] | None
    on_error: Literal["raise", "skip"]
    pruned: PrunedSpec
    num_samples: Mapping[str, int] | None
    retry: Retry | int | None
    storage_options: Mapping[str, Any] | None


def _with_counts(shards: ShardList, num_samples: Mapping[str, int] | None) -> ShardList:
    """``shards`` with the sample counts of ``num_samples=`` (checked), if given."""
    if num_samples is None:
        return shards
    counts = tuple(
        num_samples.get(u, -1) if isinstance(num_samples, Mapping) else None for u in shards.urls
    )
    if not all(is_int(c, numpy=True) for c in counts):
        raise ConfigError(
            "num_samples must be a mapping shard URL -> int sample count, got "
            f"{str(num_samples)[:200]}"
        )
    return ShardList(shards.urls, tuple(int(c) for c in counts), shards.storage_options)


class ShardedSource(BaseNode[dict]):
    """Base node: a list of shards read by one stream (rank x worker) per epoch.

    The node composes the parts of a source, one module each: the epoch plan
    (:mod:`~es_pipe.sources.plan`: order, own shards, done set, cursors, state), the
    equalizer (:mod:`~es_pipe.sources.equalize`), the rank/worker world
    (:mod:`~es_pipe.sources.world`), the error policy and stats
    (:mod:`~es_pipe.sources.stats`) and the ``pruned=`` adapter
    (:mod:`~es_pipe.sources.pruned`). What is left here is the delivery loop: open the
    plan's next shard, hand out its chunks sample by sample, count, checkpoint.

    Subclasses are the readers: they implement :class:`~es_pipe.sources.reader.ShardReader`
    (:meth:`iter_shard`, optionally :meth:`count_samples`) and reach the node only
    through :attr:`ctx`, a :class:`~es_pipe.sources.reader.ReadContext`.

    Args:
        urls: brace pattern, glob, URL, list of those, or a :class:`ShardList`.
        shuffle: shuffle the shard order every epoch, from ``(seed, epoch)``.
        seed: integer seed of every random choice the source makes.
        epoch: the epoch of the first ``reset()``; later ``reset(None)`` calls advance it
            (only when the epoch was actually iterated, so an extra ``reset()`` is harmless).
            Under an ``EvolvedSampling`` stage leave it out: the stage sets the epoch from
            ``sampler.epoch`` (:meth:`set_epoch`) before every epoch.
        rank, world_size: explicit rank split; default from ``torch.distributed`` if
            initialised, else the ``RANK``/``WORLD_SIZE`` environment, else ``(0, 1)``.
        worker, num_workers: explicit worker split; default from
            ``torch.utils.data.get_worker_info()`` at ``reset`` time, else ``(0, 1)``.
        equalize: ``None`` (every sample once, streams may differ in length), ``"drop"``
            (every stream yields the length of the shortest stream; the surplus of the longer
            ones is not read this epoch) or ``"pad"`` (every stream yields the length of the
            longest; shorter streams re-read their own shards from the start). Both need the
            sample count of every shard (index file with counts, ``num_samples=`` or, for
            Parquet, the footers); a count that the shard contradicts when it is read is a
            :class:`ShardError`. ``"drop"`` refuses (:class:`ConfigError`) an epoch whose
            shortest stream is empty while others are not (more streams than shards): it
            would yield nothing on every rank.
        on_error: ``"raise"`` raises :class:`ShardError`; ``"skip"`` warns, skips the bad
            sample or the rest of the bad shard, counts it in :attr:`stats` and warns a
            summary at the end of the epoch.
        pruned: ``None``, a mapping ``url -> sorted int64 ordinals`` or a callable
            ``(url, epoch) -> ordinals | None``: samples to leave out this epoch, dropped
            before their bytes are decoded (and, where the format allows, before they are
            read). A callable with a ``count(url, epoch) -> int`` method (a sampler's
            ``sampler.pruned``) is asked only for counts of the shards other streams read.
        num_samples: optional mapping ``url -> number of samples`` (used by ``equalize``).
        retry: how reads of shards from fsspec filesystems are retried after transient
            errors (a reset connection, a timeout): an :class:`es_pipe.Retry`, an int
            number of attempts (``1``: no retry), or ``None`` for ``Retry()`` (3 attempts,
            0.2 s then 0.4 s of backoff, with jitter). A failed read is retried in place:
            the file is reopened at the byte where the read began, so no sample is lost or
            delivered twice. Retries are counted in ``stats["retries"]``; a shard that
            keeps failing raises :class:`ShardError` (naming the shard and the attempts)
            or, with ``on_error="skip"``, is skipped. Missing files, permission errors,
            a full disk and corrupt data are never retried. Local Parquet and Arrow files
            are read natively (memory-mapped), without retries.
        storage_options: fsspec filesystem arguments for the shards' storage, e.g. for S3
            ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}`` (see
            :mod:`es_pipe.storage`); default: those of a :class:`ShardList` passed as
            ``urls``, else the backend's own configuration (``AWS_*`` variables...).
            Missing or invalid credentials, access denied, a bucket that does not exist and
            an unreachable endpoint raise :class:`~es_pipe.StorageError` naming the fix,
            also under ``on_error="skip"``: they are configuration, not bad shards.
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
        shards = ShardList.from_spec(urls, storage_options=storage_options)
        self.shards = _with_counts(shards, num_samples)
        self.storage_options = self.shards.storage_options
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._world = World.of(rank, world_size, worker, num_workers)
        self.retry = Retry.of(retry)
        self._sizes = ShardSizes(self.shards.urls, self.shards.num_samples)
        self.ctx = ReadContext(
            storage_options=self.storage_options,
            retry=self.retry,
            sizes=self._sizes,
            bad_sample=self._stats.bad_sample,
            bad_samples=self._stats.bad_samples,
            on_retry=self._stats.count_retry,
        )
        """The reader's way to the node (:class:`~es_pipe.sources.reader.ReadContext`)."""
        self._epoch = int(epoch)
        self._next_epoch: int | None = None
        self._started = self._consumed = False
        self._pending_state: dict | None = None
        self._plan = EpochPlan.start(0, self.seed, self._epoch, False, (0, 1))
        self._gen: Iterator[list[dict]] | None = None
        # The delivery cursor, read per sample by next(): plain attributes, no indirection.
        self._chunk: list[dict] = []
        self._chunk_pos = 0
        self._cur_count = 0  # delivered samples of the current shard (or padded ones)
        self._yielded = 0  # delivered samples of the epoch (from its start)
        self._limit: int | None = None  # the equalizer's stop count

    # ------------------------------------------------------------------ the reader interface
    def iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[dict]]:
        """Chunks of one shard's samples (see :meth:`ShardReader.iter_shard
        <es_pipe.sources.reader.ShardReader.iter_shard>`): what a reader implements."""
        raise NotImplementedError

    def count_samples(self, url: str) -> int | None:
        """Number of samples of a shard if it can be known cheaply, else None."""
        return None

    # ------------------------------------------------------------------ public API
    @property
    def epoch(self) -> int:
        """The epoch being read (or about to be read)."""
        return self._epoch

    @property
    def stream(self) -> tuple[int, int]:
        """``(s, S)``: this node's stream id and the number of streams (ranks x workers)."""
        return self._plan.stream

    @property
    def rank(self) -> int:
        return self._world.rank

    @property
    def world_size(self) -> int:
        return self._world.world_size

    @property
    def equalize(self) -> Equalize:
        return self._equalizer.mode

    @property
    def on_error(self) -> OnError:
        return self._stats.on_error

    @property
    def pruned(self) -> PrunedSpec:
        """The ``pruned=`` argument (assignable: checked like the argument)."""
        return self._pruned.spec

    @pruned.setter
    def pruned(self, spec: PrunedSpec) -> None:
        self._pruned = Pruned(spec)

    @property
    def last_epoch_stats(self) -> dict[str, Any] | None:
        """:attr:`stats` as they were when the last epoch ended (None before)."""
        return self._stats.last_epoch

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
        stream, n_streams = self._world.stream()
        order = epoch_order(len(self.shards), self.seed, epoch, self.shuffle)
        per_shards = [len(order[t::n_streams]) for t in range(n_streams)]
        report: dict[str, Any] = {
            "epoch": epoch,
            "stream": stream,
            "streams": n_streams,
            "shards_per_stream": per_shards,
        }
        counts = self._kept_sizes(epoch)
        if counts is not None:
            per = [int(sum(counts[i] for i in order[t::n_streams])) for t in range(n_streams)]
            report["samples_per_stream"] = per
        else:
            per = per_shards
        mean = float(np.mean(per))
        report["imbalance"] = (max(per) / mean - 1.0) if mean > 0 else 0.0
        return report

    # ------------------------------------------------------------------ BaseNode
    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._close_current()
        self._pending_state = None
        stream = self._world.stream()
        if initial_state is None:
            if self._next_epoch is not None:
                self._epoch, self._next_epoch = self._next_epoch, None
            elif self._started and self._consumed:
                self._epoch += 1
            self._start_epoch(EpochPlan.start(*self._order_args(), stream), 0, 0)
        else:
            got = read_state(initial_state, self.shards, stream)  # checks; changes nothing
            self.seed, self.shuffle, self._epoch = got.seed, got.shuffle, got.epoch
            self._next_epoch = None
            plan = EpochPlan.start(
                *self._order_args(), stream, got.done, got.cursors, got.remaining_only
            )
            self._start_epoch(plan, got.yielded, got.padded)
        self._started = True
        self._consumed = False

    def __next__(self) -> dict:
        # Fast path: a chunk exists only after reset(), so BaseNode's lazy initialisation
        # is needed only when the chunk is used up.
        sample = self._from_chunk()
        return sample if sample is not None else super().__next__()

    def next(self) -> dict:
        sample = self._from_chunk()
        return sample if sample is not None else self._next_slow()

    def _from_chunk(self) -> dict | None:
        """The next sample of the chunk the reader produced last, if any is left."""
        pos = self._chunk_pos
        if pos < len(self._chunk) and (self._limit is None or self._yielded < self._limit):
            self._chunk_pos = pos + 1
            self._yielded += 1
            self._cur_count += 1
            return self._chunk[pos]
        return None

    def _next_slow(self) -> dict:
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

    def __getstate__(self) -> dict:
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
        s, n_streams = plan.stream
        if self.equalize is not None:
            kept = self._kept_sizes()
            if kept is None:
                raise ConfigError(
                    f"equalize={self.equalize!r} needs the sample count of every shard: "
                    "count them with `es-pipe index SHARDS... --out index.txt` (shards "
                    "written by webdataset or pyarrow included) and pass "
                    "urls=ShardList.from_index('index.txt'); write_shards and "
                    "es-pipe shard write one; or pass num_samples={url: count}, or use "
                    "equalize=None"
                )
            self._limit, self._stats.counts["dropped"] = self._equalizer.limit(
                plan, kept, self._epoch
            )
            if padded and self.equalize == "pad":  # restored while padding: replay the cycle
                plan.skip_to_end()
                self._open_pad(start=self._equalizer.replay(plan, kept))
        elif not plan.own:
            warnings.warn(
                f"stream {s} of {n_streams} (rank x worker) has no shard to read in epoch "
                f"{self._epoch}: {len(self.shards)} shards for {n_streams} streams; use more "
                "shards than streams, or equalize='pad' so that every stream yields as many "
                "samples as the longest",
                stacklevel=4,
            )

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
