"""The node logic every shard reader shares: epochs, splitting, state, skip policy, pruning.

A concrete reader (:class:`~es_pipe.sources.WebDatasetSource`,
:class:`~es_pipe.sources.ParquetSource`, :class:`~es_pipe.sources.ArrowSource`) only knows
how to stream the samples of *one* shard in its *shard order*, starting after ``start``
samples of that order and leaving out the pruned ordinals. Everything else lives here.

State and resume
----------------
``get_state()`` returns, for the stream (one rank x one worker) that owns this node::

    {"version": 1, "seed": 0, "epoch": 3, "shuffle": true, "digest": "1a2b3c4d",
     "n_shards": 64, "stream": [s, S], "done": [[0, 5], [9, 10]],
     "cursors": {"s3://b/train-007.tar": 120}, "yielded": 4242, "padded": 0}

``done`` holds listed-order indices (as ``[start, stop)`` ranges) of shards this stream
finished this epoch; ``cursors`` maps a started shard to the number of its samples (in
shard order, pruned ones not counted) already delivered. Nothing in it counts items
globally, so the same facts describe the progress on any topology.

Rule for who reads what after a restore:

* Same topology (the state's ``S`` equals the current number of streams): stream ``s``
  keeps its own shards ``order[s::S]`` minus ``done``; a started shard resumes at its cursor.
  The remaining stream is exactly the stream the run would have produced.
* Different topology: merge the states of *all* old streams with :func:`merge_states`
  (a single stream cannot know what the others read) and pass the merged state to every
  new stream. The shards not yet done, in epoch order, are dealt round-robin to the new
  streams (``remaining[s::S]``); a partly read shard resumes at its cursor on whichever
  stream it lands. Every sample of the epoch is still delivered exactly once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
from torchdata.nodes import BaseNode

from es_pipe import storage
from es_pipe.errors import ConfigError, EsPipeError, ShardError
from es_pipe.retry import Retry, RetryingFile
from es_pipe.sources.shards import (
    ShardList,
    epoch_order,
    indices_of,
    ranges_of,
    resolve_rank,
    resolve_worker,
    url_seed,
)

__all__ = ["PrunedSpec", "ShardedSource", "merge_states"]

log = logging.getLogger(__name__)
PrunedSpec = Mapping[str, np.ndarray] | Callable[[str, int], "np.ndarray | None"] | None
STATE_VERSION = 1
_MAX_ERRORS_KEPT = 20


def _empty_stats() -> dict[str, Any]:
    return {
        "epoch": None,
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


class ShardedSource(BaseNode[dict]):
    """Base node: a list of shards read by one stream (rank x worker) per epoch.

    Subclasses implement :meth:`_iter_shard` and may implement :meth:`_count`.

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
        equalize: Literal["drop", "pad"] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        pruned: PrunedSpec = None,
        num_samples: Mapping[str, int] | None = None,
        retry: Retry | int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if equalize not in (None, "drop", "pad"):
            raise ConfigError(f"equalize must be None, 'drop' or 'pad', got {equalize!r}")
        if pruned is not None and not (callable(pruned) or isinstance(pruned, Mapping)):
            raise ConfigError("pruned must be None, a mapping url -> ordinals, or a callable")
        for name, value in (("seed", seed), ("epoch", epoch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative int")
        self.shards = ShardList.from_spec(urls, storage_options=storage_options)
        self.storage_options = self.shards.storage_options
        if num_samples is not None:
            counts = tuple(
                num_samples.get(u, -1) if isinstance(num_samples, Mapping) else None
                for u in self.shards.urls
            )
            if not all(isinstance(c, (int, np.integer)) and type(c) is not bool for c in counts):
                raise ConfigError(
                    "num_samples must be a mapping shard URL -> int sample count, got "
                    f"{str(num_samples)[:200]}"
                )
            self.shards = ShardList(
                self.shards.urls, tuple(int(c) for c in counts), self.storage_options
            )
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self._worker_args = (worker, num_workers)
        self.equalize = equalize
        self.on_error = on_error
        self.pruned = pruned
        self.retry = Retry.of(retry)
        self._index = {u: i for i, u in enumerate(self.shards.urls)}
        self._sizes: list[int] = list(self.shards.num_samples)
        self._epoch = int(epoch)
        self._next_epoch: int | None = None
        self._started = False
        self._consumed = False
        self._gen: Iterator[dict] | None = None
        self._pending_state: dict | None = None
        self._stats: dict[str, Any] = _empty_stats()
        self._chunk: list[dict] = []
        self._chunk_pos = 0
        self._cur_count = 0
        self._in_pad = False
        self._yielded0 = 0
        self._padded0 = 0
        self._epoch_reported = False
        self.last_epoch_stats: dict[str, Any] | None = None
        self._plan: list[int] = []
        self._pos = 0
        self._done: set[int] = set()
        self._cursors: dict[int, int] = {}
        self._cur: int | None = None
        self._yielded = 0
        self._padded = 0
        self._limit: int | None = None
        self._stream = (0, 1)
        self._own: list[int] = []
        self._pad_url: str | None = None
        self._pad_cycle = 0
        self._pad_mark = -1

    # ------------------------------------------------------------------ subclass API
    def _iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[dict]]:
        """Yield the samples of one shard in shard order, after the first ``start`` ones,
        as lists (chunks) of sample dicts: the node hands them out one by one without a
        generator round-trip per sample.

        ``pruned`` is a sorted int64 array of ordinals to leave out; they do not count in
        ``start``. Raise :class:`ShardError` for a shard-level problem; report a bad sample
        with :meth:`_bad_sample` (which raises or counts according to ``on_error``).
        """
        raise NotImplementedError

    def _count(self, url: str) -> int | None:
        """Number of samples of a shard if it can be known cheaply, else None."""
        return None

    def _open_file(self, url: str) -> RetryingFile:
        """Open a shard for binary reading on its fsspec filesystem, with reads retried
        under :attr:`retry` and counted in ``stats["retries"]``. A missing file raises
        ``FileNotFoundError``."""
        fs, path = storage.url_to_fs(url, self.storage_options)
        try:
            return RetryingFile(fs, path, url=url, retry=self.retry, on_retry=self._count_retry)
        except Exception as exc:  # no credentials, no bucket...: StorageError with the fix
            storage.raise_storage_error(exc, url)
            raise

    def _count_retry(self) -> None:
        self._stats["retries"] += 1

    # ------------------------------------------------------------------ public API
    @property
    def epoch(self) -> int:
        """The epoch being read (or about to be read)."""
        return self._epoch

    @property
    def stream(self) -> tuple[int, int]:
        """``(s, S)``: this node's stream id and the number of streams (ranks x workers)."""
        return self._stream

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
        stream, n_streams = self._resolve_stream()
        order = epoch_order(len(self.shards), self.seed, epoch, self.shuffle)
        per_shards = [len(order[t::n_streams]) for t in range(n_streams)]
        report: dict[str, Any] = {
            "epoch": epoch,
            "stream": stream,
            "streams": n_streams,
            "shards_per_stream": per_shards,
        }
        counts = self._maybe_kept_sizes(epoch)
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
        self._stream = self._resolve_stream()
        if initial_state is None:
            if self._next_epoch is not None:
                self._epoch, self._next_epoch = self._next_epoch, None
            elif self._started and self._consumed:
                self._epoch += 1
            self._start_epoch(done=set(), cursors={}, yielded=0, padded=0, remaining_only=False)
        else:
            self._restore(initial_state)
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

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of the current epoch on this stream.

        ``samples`` delivered, ``shards`` opened, ``pruned`` ordinals given to the hook for
        the shards opened, ``skipped_samples``/``skipped_shards`` (``on_error='skip'``),
        ``padded`` repeats and ``dropped`` surplus (``equalize``), ``retries`` of reads
        after transient filesystem errors (``retry=``), ``errors`` (first 20).
        """
        st = dict(self._stats)
        st["errors"] = list(self._stats["errors"])
        st["samples"] = self._yielded - self._yielded0
        st["padded"] = self._padded_now() - self._padded0
        return st

    def _padded_now(self) -> int:
        return self._cur_count if self._in_pad else self._padded

    def get_state(self) -> dict[str, Any]:
        if self._pending_state is not None:
            return dict(self._pending_state)
        s, n_streams = self._stream
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self._epoch,
            "shuffle": self.shuffle,
            "digest": self.shards.digest,
            "n_shards": len(self.shards),
            "stream": [s, n_streams],
            "done": ranges_of(self._done),
            "cursors": {
                self.shards.urls[i]: int(k) for i, k in sorted(self._live_cursors().items())
            },
            "yielded": int(self._yielded),
            "padded": int(self._padded_now()),
        }

    def _live_cursors(self) -> dict[int, int]:
        cursors = dict(self._cursors)
        if self._cur is not None and self._cur_count:
            cursors[self._cur] = self._cur_count
        return cursors

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
    def _resolve_stream(self) -> tuple[int, int]:
        worker, num_workers = resolve_worker(*self._worker_args)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def _cur_url(self) -> str:
        if self._cur is not None:
            return self.shards.urls[self._cur]
        return self._pad_url or "?"

    def _pruned_for(self, url: str, epoch: int | None = None) -> np.ndarray:
        spec = self.pruned
        if spec is None:
            return np.empty(0, dtype=np.int64)
        epoch = self._epoch if epoch is None else epoch
        arr = spec(url, epoch) if callable(spec) else spec.get(url)
        if arr is None:
            return np.empty(0, dtype=np.int64)
        arr = np.asarray(arr)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ConfigError(f"pruned ordinals of {url!r} must be a 1-D integer array")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr[0] < 0 or np.any(np.diff(arr) <= 0)):
            raise ConfigError(
                f"pruned ordinals of {url!r} must be sorted, unique and non-negative "
                "(np.unique gives that)"
            )
        return arr

    def _maybe_kept_sizes(self, epoch: int | None = None) -> list[int] | None:
        for i, n in enumerate(self._sizes):
            if n < 0:
                counted = self._count(self.shards.urls[i])
                if counted is None:
                    return None
                self._sizes[i] = int(counted)
        epoch = self._epoch if epoch is None else epoch
        count = getattr(self.pruned, "count", None)
        kept = []
        for url, n in zip(self.shards.urls, self._sizes, strict=True):
            if count is not None:  # no need to load the pruning of shards others read
                kept.append(n - min(n, int(count(url, epoch))))
            else:
                kept.append(n - int(np.searchsorted(self._pruned_for(url, epoch), n)))
        return kept

    def _start_epoch(
        self,
        done: set[int],
        cursors: dict[int, int],
        yielded: int,
        padded: int,
        remaining_only: bool,
    ) -> None:
        s, n_streams = self._stream
        order = epoch_order(len(self.shards), self.seed, self._epoch, self.shuffle)
        if remaining_only:
            order = np.array([i for i in order if i not in done], dtype=np.int64)
        self._own = [int(i) for i in order[s::n_streams]]
        self._plan = [i for i in self._own if i not in done]
        self._pos = 0
        self._done = set(done)
        self._cursors = dict(cursors)
        self._cur = None
        self._pad_url = None
        self._yielded = self._yielded0 = yielded
        self._padded = self._padded0 = padded
        self._chunk, self._chunk_pos, self._cur_count, self._in_pad = [], 0, 0, False
        self._stats = _empty_stats()
        self._stats["epoch"] = self._epoch
        self._epoch_reported = False
        self._limit = None
        if self.equalize is not None:
            kept = self._maybe_kept_sizes()
            if kept is None:
                raise ConfigError(
                    f"equalize={self.equalize!r} needs the sample count of every shard: "
                    "count them with `es-pipe index SHARDS... --out index.txt` (shards "
                    "written by webdataset or pyarrow included) and pass "
                    "urls=ShardList.from_index('index.txt'); write_shards and "
                    "es-pipe shard write one; or pass num_samples={url: count}, or use "
                    "equalize=None"
                )
            # Same topology: the lengths of the whole epoch (yielded counts from its start).
            # Re-split: the lengths of what remains (yielded restarts at 0).
            skip = cursors if remaining_only else {}
            per = []
            for t in range(n_streams):
                mine = order[t::n_streams]
                per.append(sum(kept[i] - skip.get(int(i), 0) for i in mine))
            mine_total = per[s]
            if self.equalize == "drop" and not remaining_only:
                self._refuse_empty_drop(order, per, kept)
            self._limit = min(per) if self.equalize == "drop" else max(per)
            if self.equalize == "drop":
                self._stats["dropped"] = mine_total - min(per)
        if not self._own and self.equalize is None:
            warnings.warn(
                f"stream {s} of {n_streams} (rank x worker) has no shard to read in epoch "
                f"{self._epoch}: {len(self.shards)} shards for {n_streams} streams; use more "
                "shards than streams, or equalize='pad' so that every stream yields as many "
                "samples as the longest",
                stacklevel=3,
            )
        self._pad_cycle = 0
        if self._padded and self.equalize == "pad":
            self._resume_padding()

    def _refuse_empty_drop(self, order: np.ndarray, per: list[int], kept: list[int]) -> None:
        """``equalize='drop'`` cuts every stream to the shortest one: when that one is
        empty while others are not, every stream would yield nothing, every epoch."""
        if min(per) > 0 or max(per) == 0:
            return
        n_streams = len(per)
        t = per.index(0)
        mine = order[t::n_streams]
        if len(mine) == 0:
            why = (
                f"{len(self.shards)} shards for {n_streams} streams (ranks x workers): "
                f"stream {t} has no shard to read"
            )
        else:
            why = (
                f"the {len(mine)} shard(s) of stream {t} of {n_streams} (ranks x workers) "
                f"hold no sample this epoch (sample counts {[kept[i] for i in mine][:8]}, "
                "after pruning)"
            )
        raise ConfigError(
            f"equalize='drop' would yield 0 samples on every rank in epoch {self._epoch}, "
            f"although the epoch holds {sum(per)}: {why}. Use fewer ranks or DataLoader "
            "workers, more (smaller) shards than streams, or equalize='pad' (short streams "
            "re-read their own samples) or equalize=None"
        )

    def _restore(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"not a shard-source state of version {STATE_VERSION}: {str(state)[:200]}; pass "
                "what the source's state_dict() (or merge_states) returned"
            )
        if state["digest"] != self.shards.digest or state["n_shards"] != len(self.shards):
            raise ConfigError(
                "this state was saved for a different shard list "
                f"({state['n_shards']} shards, digest {state['digest']}; now {len(self.shards)} "
                f"shards, digest {self.shards.digest}); restore with the same shard list"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self._epoch = int(state["epoch"])
        self._next_epoch = None
        old_s, old_n = state["stream"]
        s, n_streams = self._stream
        done = indices_of(state["done"])
        cursors = {self._index[u]: int(k) for u, k in state["cursors"].items()}
        yielded = state["yielded"]
        padded = state["padded"]
        if old_s is not None and (old_s, old_n) != (s, n_streams):
            raise ConfigError(
                f"this state was saved by stream {old_s} of {old_n} but is restored on stream "
                f"{s} of {n_streams}; to resume on another topology merge the states of all "
                "old streams with es_pipe.sources.merge_states(states) and restore the merged "
                "state on every new stream"
            )
        if old_n == n_streams:
            if isinstance(yielded, dict):
                yielded, padded = yielded.get(str(s), 0), padded.get(str(s), 0)
            self._start_epoch(done, cursors, int(yielded), int(padded), remaining_only=False)
        else:
            self._start_epoch(done, cursors, 0, 0, remaining_only=True)

    def _open_next(self) -> bool:
        """Open the next shard of the plan (or of the padding cycle); False at the end."""
        while self._pos < len(self._plan):
            i = self._plan[self._pos]
            self._pos += 1
            url = self.shards.urls[i]
            start = self._cursors.get(i, 0)
            pruned = self._pruned_for(url)
            if start == 0:
                self._stats["pruned"] += int(pruned.size)
            if pruned.size:
                log.debug("shard %s: %d pruned samples skipped unread", url, pruned.size)
            self._stats["shards"] += 1
            self._cur = i
            self._cur_count = start
            self._gen = self._iter_shard(url, start, pruned, url_seed(self.seed, self._epoch, url))
            return True
        if self.equalize == "pad" and self._limit is not None and self._yielded < self._limit:
            return self._open_pad()
        return False

    def _pad_list(self) -> list[int]:
        if self._own:
            return self._own
        s, _ = self._stream
        order = epoch_order(len(self.shards), self.seed, self._epoch, self.shuffle)
        return [int(order[s % len(order)])]

    def _open_pad(self, start: int = 0) -> bool:
        pads = self._pad_list()
        k = self._pad_cycle
        if k % len(pads) == 0:
            if k > 0 and self._pad_mark == self._yielded:
                warnings.warn("equalize='pad': nothing left to pad with (all pruned)", stacklevel=3)
                return False
            self._pad_mark = self._yielded
        url = self.shards.urls[pads[k % len(pads)]]
        self._pad_cycle += 1
        if not self._in_pad:
            self._in_pad, self._cur_count = True, self._padded
        self._cur = None
        self._pad_url = url
        self._gen = self._iter_shard(
            url, start, self._pruned_for(url), url_seed(self.seed, self._epoch, url)
        )
        return True

    def _resume_padding(self) -> None:
        # Replay the padding cycle without yielding: cheap, samples are skipped unread.
        self._pos = len(self._plan)
        kept = self._maybe_kept_sizes() or []
        pads = self._pad_list()
        rest = self._padded
        k = 0
        while rest > 0 and any(kept[i] for i in pads):
            n = kept[pads[k % len(pads)]]
            if rest < n:
                break
            rest -= n
            k += 1
        self._pad_cycle = k
        self._pad_mark = -1
        self._open_pad(start=rest)

    def _finish_current(self) -> None:
        self._close_current()
        if self._cur is not None:
            self._done.add(self._cur)
            self._cursors.pop(self._cur, None)
            self._cur_count = 0
        self._cur = None

    def _close_current(self) -> None:
        self._chunk, self._chunk_pos = [], 0
        gen = getattr(self, "_gen", None)
        if gen is not None:
            self._gen = None
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    def _shard_failed(self, exc: EsPipeError) -> None:
        found = storage.storage_error(exc, self._cur_url())
        if found is not None:  # configuration, not a bad shard: raised under "skip" too
            self._close_current()
            if found is exc:
                raise exc
            raise found from exc
        if self.on_error == "raise" or not isinstance(exc, ShardError):
            self._close_current()
            raise exc
        warnings.warn(f"skipping the rest of a shard: {exc}", stacklevel=3)
        log.info("skipping the rest of shard %s: %s", self._cur_url(), exc)
        self._stats["skipped_shards"] += 1
        self._remember(str(exc))
        self._finish_current()

    def _bad_sample(self, message: str) -> None:
        """Report one bad sample: raise (on_error='raise') or warn and count ('skip')."""
        if self.on_error == "raise":
            raise ShardError(message + "; or pass on_error='skip' to skip such samples")
        warnings.warn(f"skipping a sample: {message}", stacklevel=3)
        log.info("skipping a sample: %s", message)
        self._stats["skipped_samples"] += 1
        self._remember(message)

    def _bad_samples(self, message: str, count: int) -> None:
        """Report ``count`` bad samples of one shard at once (vectorised readers)."""
        if self.on_error == "raise":
            raise ShardError(message + "; or pass on_error='skip' to skip such samples")
        warnings.warn(f"skipping {count} samples: {message}", stacklevel=3)
        log.info("skipping %d samples: %s", count, message)
        self._stats["skipped_samples"] += int(count)
        self._remember(message)

    def _check_count(self, url: str, found: int, unit: str = "samples", why: str = "") -> None:
        """Raise :class:`ShardError` when a shard holds another number of samples than its
        index file (or ``num_samples=``) says: the split and ``equalize`` rely on those
        counts (a wrong one makes ranks yield different numbers of samples: a DDP hang)."""
        known = self._sizes[self._index[url]] if url in self._index else -1
        if known >= 0 and found != known:
            raise ShardError(
                f"shard {url!r} has {found} {unit}, but its index file (or num_samples=) "
                f"says {known}: the shard was changed or is corrupt{why}, or the index is "
                "stale; re-create or re-download the shard, or rewrite the index"
            )

    def _remember(self, message: str) -> None:
        if len(self._stats["errors"]) < _MAX_ERRORS_KEPT:
            self._stats["errors"].append(message)

    def _end_epoch(self) -> None:
        self._close_current()
        if not self._epoch_reported:
            self._epoch_reported = True
            st = self.last_epoch_stats = self.stats
            log.info(
                "epoch %s, stream %d of %d: %d samples read, %d pruned samples skipped, %d shards",
                st["epoch"],
                self._stream[0],
                self._stream[1],
                st["samples"],
                st["pruned"],
                st["shards"],
            )
            if st["skipped_samples"] or st["skipped_shards"]:
                warnings.warn(
                    f"epoch {st['epoch']}, stream {self._stream[0]} of {self._stream[1]}: "
                    f"skipped {st['skipped_samples']} bad samples and the rest of "
                    f"{st['skipped_shards']} bad shards (on_error='skip'); first errors: "
                    f"{st['errors'][:3]}",
                    stacklevel=3,
                )
        raise StopIteration


def merge_states(states: Sequence[dict]) -> dict[str, Any]:
    """Merge the states of all streams of one run into a topology-free state.

    Pass the result to ``reset()`` / ``load_state_dict()`` of every stream of the new
    topology (any number of ranks x workers). Raises :class:`ConfigError` when the states
    disagree (seed, epoch, shard list) or when some stream's state is missing.
    """
    if not states:
        raise ConfigError("merge_states needs the states of all streams, got none")
    first = states[0]
    keys = ("version", "seed", "epoch", "shuffle", "digest", "n_shards")
    for st in states:
        if any(st[k] != first[k] for k in keys):
            raise ConfigError(
                "states disagree on seed/epoch/shard list; merge states saved at the same "
                f"checkpoint: {[{k: st[k] for k in keys} for st in states][:4]}"
            )
    n_streams = first["stream"][1]
    ids = sorted(st["stream"][0] for st in states)
    if any(st["stream"][1] != n_streams for st in states) or ids != list(range(n_streams)):
        raise ConfigError(
            f"merge_states needs exactly one state per stream 0..{n_streams - 1}, got streams "
            f"{ids}; collect the state of every rank and worker"
        )
    done: set[int] = set()
    cursors: dict[str, int] = {}
    for st in states:
        done |= indices_of(st["done"])
        cursors.update(st["cursors"])
    return {
        **{k: first[k] for k in keys},
        "stream": [None, n_streams],
        "done": ranges_of(done),
        "cursors": dict(sorted(cursors.items())),
        "yielded": {str(st["stream"][0]): st["yielded"] for st in states},
        "padded": {str(st["stream"][0]): st["padded"] for st in states},
    }
