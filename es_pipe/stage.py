"""The Evolved Sampling stage, ``SelectStage``: buffer a meta-batch, take its losses back,
emit the selection.

It runs in the trainer's process, last in the pipeline: the feedback must be current and
prefetching workers cannot see it. Everything upstream stays parallel.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np
import torch
import torchdata.nodes as tn
from torch.utils.data import default_collate as torch_collate

from es_pipe.batch import MetaBatch, SubBatch, check_rows
from es_pipe.columns import collate_columns
from es_pipe.errors import ConfigError, FeedbackError
from es_pipe.identity import ArrayIdentity, EpochRepeats, check_unique
from es_pipe.intake import Intake
from es_pipe.sampler import Identity, Selector
from es_pipe.sources.base import ShardedSource

LossFn = Callable[[Any], Any]
_dtype = attrgetter("dtype")
log = logging.getLogger(__name__)


def default_collate(samples: list[Any]) -> Any:
    """torch's ``default_collate``, quiet about read-only numpy views: sources hand out
    zero-copy views of Arrow buffers, and collation copies them anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch_collate(samples)


def collate_dicts(samples: list[Any], who: Identity) -> Any:
    """``default_collate(samples)``, without its per-sample work where the result is known
    to be the same:

    * ``__key__``, ``__index__`` and ``__shard__`` are taken from the identity the stage
      has already read (as arrays) rather than collated again: the same values and types
      (a list of str, an int64 tensor, a list of str) where the first sample's are a
      ``str``, an ``int`` and a non-empty ``str``;
    * a field whose values are all numpy arrays of one numeric dtype and shape is one
      ``np.stack`` and ``torch.from_numpy`` (``default_collate`` makes a tensor of every
      row first, then stacks them: the same tensor, 10-20x slower at B = 4096);
    * a field of Python ints (or floats) is one ``np.array`` and ``torch.from_numpy``
      (``torch.tensor`` of a list: the same int64 / float64 tensor, ~10x slower);

    every other field (and other types) as ``default_collate`` batches them."""
    first = samples[0] if samples else None
    if type(first) is not dict:
        return default_collate(samples)
    out: dict[str, Any] = {}
    for name, value in first.items():
        if name == "__key__" and type(value) is str:
            out[name] = list(who.keys)
        elif name == "__index__" and type(value) is int and who.ordinals is not None:
            out[name] = torch.from_numpy(np.array(who.ordinals, dtype=np.int64))
        elif name == "__shard__" and isinstance(who, ArrayIdentity) and who.shard_field == name:
            out[name] = who.shard_names()
        else:
            column = list(map(itemgetter(name), samples))  # C-level, no frame per sample
            fast = _FAST.get(type(value))
            batched = fast(column) if fast is not None else None
            out[name] = batched if batched is not None else default_collate(column)
    return out


def _numbers(column: list[Any]) -> torch.Tensor | None:
    """``default_collate`` of Python ints (an int64 tensor) or floats (float64) through
    one numpy conversion, where every value has the first one's type exactly (``bool`` is
    not ``int`` here: ``default_collate`` makes a bool tensor of bools). ``None``
    otherwise (``default_collate`` decides)."""
    kind = type(column[0])
    if set(map(type, column)) != {kind}:
        return None
    try:
        return torch.from_numpy(np.array(column, dtype=np.int64 if kind is int else np.float64))
    except OverflowError:  # beyond int64: default_collate raises its own error
        return None


def _stack_arrays(column: list[Any]) -> torch.Tensor | None:
    """``default_collate`` of numpy arrays as one ``np.stack``, where that is its result
    exactly: every value a plain ``np.ndarray`` of one native-order bool, integer or float
    dtype and one shape. ``None`` otherwise (``default_collate`` decides, and raises
    where it must)."""
    first = column[0]
    dtype = first.dtype
    if dtype.kind not in "biuf" or not dtype.isnative:
        return None
    if set(map(type, column)) != {np.ndarray} or set(map(_dtype, column)) != {dtype}:
        return None
    try:
        stacked = np.stack(column)
    except ValueError:  # shapes differ: default_collate raises its own error
        return None
    return torch.from_numpy(stacked)


_FAST: dict[type, Callable[[list[Any]], torch.Tensor | None]] = {
    np.ndarray: _stack_arrays,
    int: _numbers,
    float: _numbers,
}


def identity_fields(who: Identity) -> dict[str, Any]:
    """``__key__``, ``__shard__`` and ``__index__`` of a columnar meta-batch, as the dict
    path's ``default_collate`` gives them (a list of str, a list of str, an int64 tensor),
    made from the identity arrays in one C-level step each, never collated."""
    keys = who.keys
    out: dict[str, Any] = {
        "__key__": keys.tolist() if isinstance(keys, np.ndarray) else list(keys),
        "__shard__": (
            who.shard_names()
            if isinstance(who, ArrayIdentity)
            else [who.shards.names[c] for c in who.shards.codes.tolist()]
        ),
    }
    if who.ordinals is not None:
        out["__index__"] = torch.from_numpy(np.array(who.ordinals, dtype=np.int64))
    return out


def auto_columnar(source: tn.BaseNode, collate_fn: Any) -> None:
    """Switch a Parquet, Arrow or WebDataset tar source left at ``columnar=None`` (the
    default) to the columnar path where that cannot change what the stage emits: the stage reads the
    source directly (or through ``tn.Prefetcher``, which passes items on unchanged) and
    batches with its default collate. Anything in between (a ``tn.Mapper`` written for
    sample dicts, a DataLoader) or a custom ``collate_fn`` keeps the dict path."""
    from es_pipe.sources.columnar import ColumnarOption

    node: Any = source
    while type(node) is tn.Prefetcher:
        node = node.source
    if isinstance(node, ColumnarOption) and collate_fn is default_collate:
        node.prefer_columnar()


class SelectStage(tn.BaseNode):
    """A ``torchdata.nodes`` node that emits meta-batches to score, or, given ``loss_fn``,
    the selected sub-batches directly. Over any iterable (a DataLoader, a webdataset
    pipeline, a list) as well as a node: ``tn.Loader(SelectStage(iterable, selector))``.

    Args:
        source: a ``BaseNode`` (or any iterable) of single sample dicts (not batches)
            that carry a stable ``"__key__"``, and ideally ``"__shard__"`` (webdataset's
            ``"__url__"`` is taken when it is absent) and ``"__index__"`` (es_pipe's sources
            add all three).
        sampler: the :class:`~es_pipe.Selector` holding the policy and the scores.
        loss_fn: ``loss_fn(meta_batch_data) -> per-sample losses``, called (under your
            ``torch.no_grad``) when the meta-batch needs losses; the node then yields
            ``SubBatch`` instead of ``MetaBatch``.
        collate_fn: turns the list of samples into the batch (default: torch's
            ``default_collate``).

    A short final meta-batch of an epoch is not dropped: ``b`` shrinks pro rata.

    One epoch clock, the sampler's: before every epoch the stage sets the epoch of its
    source to ``sampler.epoch`` (``set_epoch``), so a source needs no ``epoch=`` and
    follows the sampler across restarts, resumes from manifests and end-of-epoch
    checkpoints. The stage finds the source's ``set_epoch`` through torchdata nodes
    (``tn.Mapper``, ``tn.ParallelMapper``, ``tn.Prefetcher``, ...), ``tn.IterableWrapper``
    and a ``DataLoader`` over :class:`~es_pipe.sources.SourceDataset`. A restored
    checkpoint whose source epoch disagrees with the sampler's is refused
    (``ConfigError``). Sources without ``set_epoch`` (a webdataset pipeline, a list) keep
    their own epoch count. DataLoader workers with
    ``persistent_workers=True`` keep their copy of a :class:`~es_pipe.sources.SourceDataset`
    for the whole run; its epoch reaches them through shared memory, and their pruning
    hook reads each epoch's decisions from the sampler's manifests (see
    :mod:`es_pipe.prune_hook`). Pruned samples a source hands over anyway are dropped by
    the stage, counted in ``pruned_by_stage`` and warned once.

    Identity (:mod:`es_pipe.identity`): a meta-batch holding one ``(shard, key)`` twice is
    refused (``ConfigError`` naming both samples); samples seen again within an epoch are
    counted in ``repeats`` and warned at the epoch's end. Samples repeated on purpose by
    ``equalize="pad"`` are exempt.

    Where the work happens: the first ``reset()`` (the first ``iter(loader)``) starts the
    sampler's run (``sampler.start()``: with ESWP manifests, the folder is claimed and a
    resume finds its epoch; nothing is read or written before). The epoch's end
    (``sampler.end_epoch()``: ESWP's decisions, manifest writes, the commit and the wait
    for the other ranks, up to ``commit_timeout``) runs in the epoch's last ``next()``, the
    one that ends ``for meta in loader``; ``sampler.last_commit`` has its figures.

    State (``state_dict``/``reset``): the source's state, the sampler's position and RNG
    (seed, step) and the epoch flags. A meta-batch emitted but not yet answered is not
    consumed: a checkpoint taken before ``select`` restores to emit it again. The score
    table is checkpointed with ``sampler.state_dict()``, like an optimizer's state.

    Intake (:mod:`es_pipe.intake`): what the stage reads with, single samples or column
    chunks, pruned rows left out; its position (the source's state, the rows of a held
    chunk to skip) is the ``"source"`` and ``"skip"`` of the stage's state.

    Why over 250 lines: about 70 of them are this docstring; the rest is one concept, the
    node's contract (``reset``/``next``/``get_state``, the epoch clock and its refusals,
    ``epoch_plan``), with the intake and the collation in modules of their own.
    """

    def __init__(
        self,
        source: tn.BaseNode | Iterable[Any],
        sampler: Selector,
        *,
        loss_fn: LossFn | None = None,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
    ) -> None:
        super().__init__()
        if not isinstance(sampler, Selector):
            raise ConfigError(f"sampler must be an es_pipe.Selector, got {type(sampler).__name__}")
        if not isinstance(source, (tn.BaseNode, Iterable)):
            raise ConfigError(
                f"source must be a torchdata node or an iterable of sample dicts, got "
                f"{type(source).__name__}"
            )
        for label, fn in (("loss_fn", loss_fn), ("collate_fn", collate_fn)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{label}={fn!r} must be a function (or None)")
        self.source = source if isinstance(source, tn.BaseNode) else tn.IterableWrapper(source)
        self._intake = Intake(self.source)  # what the stage reads with (es_pipe.intake)
        self._clock, self._clocked = epoch_clock(self.source)
        self.sampler = sampler
        self.loss_fn = loss_fn
        self.collate_fn = collate_fn
        auto_columnar(self.source, collate_fn)
        self._current: MetaBatch | None = None
        self._position: dict[str, Any] = {}  # stage state just before the current meta-batch
        self._done = False  # the epoch has ended
        self._restored = False  # restored from a state, nothing emitted since
        self.repeats = EpochRepeats()  # samples seen again within the epoch (see identity)
        self._sharded = find_source(self.source)
        # equalize="pad" repeats samples on purpose
        self._pads = self._sharded is not None and self._sharded.equalize == "pad"

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.sampler.start()  # the run's I/O (manifests claimed, resumed), once, here
        self._retire()
        self.repeats.clear()
        self._intake.drop_held()
        self._restored = initial_state is not None
        if initial_state is None:
            self._start_epoch()
        else:
            state = check_state(initial_state)
            self.sampler.check_state(state["sampler"])  # before anything changes
            # the epoch the source reads: the sampler's, or, once the epoch has ended
            # (``done``: sampler.end_epoch() ran), the one before it
            expected = state["sampler"]["epoch"] - int(state["done"])
            if self._clocked is not None:
                for found in source_states(state["source"]):
                    refuse_epoch(found.get("epoch"), expected, restored=True)
            self._intake.restore(state["source"], state.get("skip", 0))
            self.sampler.load_state(state["sampler"])
            self._intake.exhausted = state["exhausted"]
            self._done = state["done"]
            self._check_epoch(expected, restored=True)
            ended = self._done or self._intake.exhausted
            log.info(
                "stage restored in epoch %d at step %d%s",
                expected,
                self.sampler.step,
                " (the epoch's end)" if ended else "",
            )
            if ended:  # restored at the end of an epoch
                self._next_epoch()

    def _start_epoch(self) -> None:
        """Start reading ``sampler.epoch`` from its beginning."""
        if self._clock is not None:  # one epoch clock: the sampler's
            self._clock.set_epoch(self.sampler.epoch)
        self._intake.start()
        self.repeats.clear()
        self._done = False
        self._check_epoch(self.sampler.epoch)

    def _next_epoch(self) -> None:
        """A stage restored at the end of an epoch starts the next one right away (closing
        the ended one first, where the checkpoint came before ``end_epoch``). torchdata's
        ``Loader`` looks one item ahead after a restore and caches the state it restored
        from: had the look-ahead met the epoch's end, that stale state would be the
        ``state_dict()`` of the whole next epoch, and a checkpoint taken in it would send
        a restart back to the end of the previous one."""
        self._restored = False
        if not self._done:
            self.sampler.end_epoch()
        self._start_epoch()

    def next(self) -> MetaBatch | SubBatch:
        current = self._current
        if current is not None and not current.answered:
            raise FeedbackError(
                f"the meta-batch emitted at step {self.sampler.step} was never answered: "
                "call meta.select(losses) before asking for the next one"
            )
        owed = None if current is None else current.unreported
        if owed is not None:
            raise FeedbackError(
                f"the sub-batch selected at step {owed.step} was never reported: with "
                "scoring='history' the training losses are the only losses the scores get. "
                "Call sub.report(losses) with its per-sample training losses (e.g. "
                "F.cross_entropy(logits, y, reduction='none').detach()) after training on it, "
                "before asking for the next meta-batch"
            )
        self._retire()
        if self._done:
            raise StopIteration
        if self._intake.exhausted:
            self._end_epoch()
        position = self._snapshot()
        taken = self._intake.take(
            self.sampler.meta_batch_size, self.sampler.eswp, position["source"]
        )
        samples, pieces, who, rows = taken.samples, taken.pieces, taken.who, taken.rows
        columnar = self._intake.columnar
        if who is not None and not self._pads and not taken.unique:  # before scores change
            check_unique(who)
        if not rows:
            if self._restored:  # restored where the epoch ended exactly: as in reset()
                self._next_epoch()
                return self.next()
            self._end_epoch()
        try:
            if columnar and self.collate_fn is default_collate:
                assert who is not None
                payload, ids = collate_columns(pieces), identity_fields(who)
                data = {**ids, **payload} if pieces[0].identity_first else {**payload, **ids}
            else:
                if columnar:  # a custom collate_fn takes sample dicts
                    samples = [sample for piece in pieces for sample in piece.to_dicts()]
                if self.collate_fn is default_collate and who is not None:
                    data = collate_dicts(samples, who)
                else:
                    data = self.collate_fn(samples)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"collate_fn could not batch the {rows} samples of this meta-batch "
                f"({type(exc).__name__}: {exc}); give every sample the same fields, of equal "
                "shapes and collatable types (tensors, arrays, numbers, str), or pass a "
                "collate_fn that handles them"
            ) from exc
        check_rows(data, rows)  # before any score changes, not in select()
        if who is not None and not self._pads:
            self.repeats.add(who)
        assert who is not None  # rows > 0: some part was pulled
        meta = MetaBatch(data, who, self.sampler)
        self._restored = False
        self._current, self._position = meta, position
        if self.loss_fn is None:
            return meta
        return meta.select(self.loss_fn(meta.data) if meta.needs_losses else None)

    def epoch_plan(self) -> dict[str, Any]:
        """The coming epoch (``sampler.epoch``), known before it starts: the samples this
        stream will read after ESWP's pruning, the meta-batches (= optimizer steps) they
        make, and the source's ``split_report``. Call it after an epoch's loop ends to
        re-plan a learning-rate schedule that pruning shortens (README: "Learning-rate
        schedules under pruning"). Needs an es_pipe source reached through torchdata nodes
        and its shards' sample counts (an index file, or Parquet footers)."""
        source = self._clocked
        if source is None:
            raise ConfigError(
                "epoch_plan() needs an es_pipe source (WebDatasetSource, ParquetSource, "
                "ArrowSource) reached through torchdata nodes; behind a DataLoader or a "
                "plain iterable, count the epoch's steps yourself (they are the samples "
                "read divided by meta_batch_size, rounded up)"
            )
        report = source.split_report(self.sampler.epoch)
        per = report.get("samples_per_stream")
        if per is None:
            raise ConfigError(
                "epoch_plan() needs the sample count of every shard: write an index file "
                "(es-pipe index) or use Parquet shards, whose footers hold it"
            )
        equalize = source.equalize
        own = per[report["stream"]]
        samples = min(per) if equalize == "drop" else max(per) if equalize == "pad" else own
        size = self.sampler.meta_batch_size
        return {
            "epoch": self.sampler.epoch,
            "samples": int(samples),
            "steps": -(-int(samples) // size),
            "split": report,
        }

    def get_state(self) -> dict[str, Any]:
        if self._current is not None and not self._current.answered:
            return {**self._position, "sampler": self.sampler.get_state()}
        return self._snapshot()

    def _check_epoch(self, expected: int, restored: bool = False) -> None:
        if self._clocked is not None:
            refuse_epoch(self._clocked.epoch, expected, restored)

    def _snapshot(self) -> dict[str, Any]:
        """The stage's state now: the intake's position (inside a chunk, the source's
        state before it and the rows to skip), the sampler's, and the epoch flags."""
        source, skip = self._intake.position()
        state = {
            "source": source,
            "sampler": self.sampler.get_state(),
            "exhausted": self._intake.exhausted,
            "done": self._done,
        }
        if skip is not None:
            state["skip"] = skip
        return state

    @property
    def pruned_by_stage(self) -> int:
        """Pruned samples the source handed over anyway and the stage dropped (this run)."""
        return self._intake.pruned

    def _end_epoch(self) -> None:
        if self.repeats.count:
            warnings.warn(self.repeats.message(self.sampler.epoch), stacklevel=3)
        self._intake.warn_pruned(self.sampler.epoch, hookable=self._sharded is not None)
        log.info(
            "epoch %d ended at step %d (%d samples dropped as pruned by the stage so far)",
            self.sampler.epoch,
            self.sampler.step,
            self.pruned_by_stage,
        )
        self.sampler.end_epoch()
        self._done = True
        raise StopIteration

    def _retire(self) -> None:
        if self._current is not None:
            self._current.retire()
            self._current = None


STATE_KEYS = ("source", "sampler", "exhausted", "done")
_LINKS = ("source", "iterable", "dataset")  # torchdata nodes, IterableWrapper, DataLoader


def check_state(state: Any) -> Mapping[str, Any]:
    """The stage's state, or a ``ConfigError`` naming what is wrong with it."""
    if not isinstance(state, Mapping) or not set(STATE_KEYS) <= state.keys():
        shown = [str(k) for k in state] if isinstance(state, Mapping) else type(state).__name__
        raise ConfigError(
            f"not a state of es_pipe.SelectStage (expected the entries {STATE_KEYS}, got "
            f"{str(shown)[:200]}); pass what loader.state_dict() (or the stage's "
            "state_dict()) returned"
        )
    skip = state.get("skip", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ConfigError(
            f"the stage state's 'skip' is {skip!r}, not a count of rows: the checkpoint "
            "is damaged; restore another one"
        )
    for flag in ("exhausted", "done"):
        if not isinstance(state[flag], bool):
            raise ConfigError(
                f"the stage state's {flag!r} is {state[flag]!r}, not True or False: the "
                "checkpoint is damaged; restore another one"
            )
    return state


def refuse_epoch(epoch: Any, expected: int, restored: bool) -> None:
    """Nothing where the source reads the sampler's epoch (``expected``); else a
    ``ConfigError``: for a ``restored`` checkpoint, that it does not belong together;
    otherwise, that a node between the stage and the source does not pass the epoch on."""
    if epoch == expected:
        return
    if restored:
        raise ConfigError(
            f"this checkpoint's source is in epoch {epoch} but its sampler in epoch "
            f"{expected}: the loader state and the sampler state do not belong together "
            "(saved at different times, or by es_pipe before the epoch clock was fixed, "
            "which let a source restored at the end of an epoch fall one epoch behind). "
            "Restore the loader.state_dict() saved with this sampler state; to continue "
            "such a run, resume it at its last epoch boundary from manifests= without a "
            "loader checkpoint"
        )
    raise ConfigError(
        f"the source reads epoch {epoch} but the sampler is in epoch {expected}: the "
        "stage sets the source's epoch through set_epoch(), and a node between the stage "
        "and the source does not pass it on. Give that node a set_epoch(epoch) that "
        "calls the source's, or place the source directly under the stage"
    )


def epoch_clock(node: Any) -> tuple[Any | None, ShardedSource | None]:
    """Down the source chain (torchdata nodes' ``source``, ``IterableWrapper.iterable``,
    ``DataLoader.dataset``): the first object with ``set_epoch`` (the stage drives it) and
    the es_pipe source reached through torchdata nodes only, whose epoch is read right
    after its ``reset`` (the stage checks it). Either may be ``None``."""
    driven, direct, seen = None, True, set[int]()
    while node is not None and id(node) not in seen and len(seen) < 64:
        seen.add(id(node))
        if driven is None and callable(getattr(node, "set_epoch", None)):
            driven = node
        if isinstance(node, ShardedSource):
            return driven, node if direct else None
        # past an IterableWrapper or a DataLoader the source resets lazily, maybe elsewhere
        direct = (
            direct and isinstance(node, tn.BaseNode) and not isinstance(node, tn.IterableWrapper)
        )
        node = next((getattr(node, link) for link in _LINKS if hasattr(node, link)), None)
    return driven, None


def find_source(node: Any) -> ShardedSource | None:
    """The es_pipe source that feeds the stage, through torchdata nodes, wrappers or a
    DataLoader over a :class:`~es_pipe.sources.SourceDataset`; ``None`` for other
    upstreams (a webdataset pipeline, a list)."""
    seen: set[int] = set()
    while node is not None and id(node) not in seen and len(seen) < 64:
        seen.add(id(node))
        if isinstance(node, ShardedSource):
            return node
        node = next((getattr(node, link) for link in _LINKS if hasattr(node, link)), None)
    return None


def source_states(state: Any) -> list[Mapping[str, Any]]:
    """The es_pipe source states nested in a node's state."""
    if not isinstance(state, Mapping):
        return []
    if {"version", "digest", "cursors", "stream", "epoch"} <= state.keys():
        return [state]
    return [found for value in state.values() for found in source_states(value)]


def __getattr__(name: str) -> Any:
    """The deprecated names of one release, ``EvolvedSampling`` and ``evolve``
    (:mod:`es_pipe.renamed`)."""
    if name not in ("EvolvedSampling", "evolve"):  # the deprecated names
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from es_pipe.renamed import old_name

    return old_name(__name__, name)
