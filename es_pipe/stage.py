"""The Evolved Sampling stage: buffer a meta-batch, take its losses back, emit the selection.

It runs in the trainer's process, last in the pipeline: the feedback must be current and
prefetching workers cannot see it. Everything upstream stays parallel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torchdata.nodes as tn
from torch.utils.data import default_collate as torch_collate

from es_pipe.batch import MetaBatch, SubBatch, check_rows
from es_pipe.errors import ConfigError, FeedbackError
from es_pipe.sampler import Identity, Sampler

LossFn = Callable[[Any], Any]


def default_collate(samples: list[Any]) -> Any:
    """torch's ``default_collate``, quiet about read-only numpy views: sources hand out
    zero-copy views of Arrow buffers, and collation copies them anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch_collate(samples)


class EvolvedSampling(tn.BaseNode):
    """A ``torchdata.nodes`` node that emits meta-batches to score, or, given ``loss_fn``,
    the selected sub-batches directly.

    Args:
        source: a ``BaseNode`` (or any iterable) of sample dicts that carry a stable
            ``"__key__"``, and ideally ``"__shard__"`` and ``"__index__"`` (es_pipe's
            sources add all three).
        sampler: the ``Sampler`` holding the policy and the scores.
        loss_fn: ``loss_fn(meta_batch_data) -> per-sample losses``, called (under your
            ``torch.no_grad``) when the meta-batch needs losses; the node then yields
            ``SubBatch`` instead of ``MetaBatch``.
        collate_fn: turns the list of samples into the batch (default: torch's
            ``default_collate``).

    A short final meta-batch of an epoch is not dropped: ``b`` shrinks pro rata.

    State (``state_dict``/``reset``): the source's state, the sampler's position and RNG
    (seed, step) and the epoch flags. A meta-batch emitted but not yet answered is not
    consumed: a checkpoint taken before ``select`` restores to emit it again. The score
    table is checkpointed with ``sampler.state_dict()``, like an optimizer's state.
    """

    def __init__(
        self,
        source: tn.BaseNode | Iterable[Any],
        sampler: Sampler,
        *,
        loss_fn: LossFn | None = None,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
    ) -> None:
        super().__init__()
        if not isinstance(sampler, Sampler):
            raise ConfigError(f"sampler must be an es_pipe Sampler, got {type(sampler).__name__}")
        if not isinstance(source, (tn.BaseNode, Iterable)):
            raise ConfigError(
                f"source must be a torchdata node or an iterable of sample dicts, got "
                f"{type(source).__name__}"
            )
        for label, fn in (("loss_fn", loss_fn), ("collate_fn", collate_fn)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{label}={fn!r} must be a function (or None)")
        self.source = source if isinstance(source, tn.BaseNode) else tn.IterableWrapper(source)
        self.sampler = sampler
        self.loss_fn = loss_fn
        self.collate_fn = collate_fn
        self._current: MetaBatch | None = None
        self._position: dict[str, Any] = {}  # stage state just before the current meta-batch
        self._exhausted = False  # the source ran out; the epoch ends at the next call
        self._done = False  # the epoch has ended
        self.pruned_by_stage = 0  # pruned samples the source handed over anyway (this run)

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._retire()
        if initial_state is None:
            self.source.reset(None)
            self._exhausted = self._done = False
        else:
            self.source.reset(initial_state["source"])
            self.sampler.load_state(initial_state["sampler"])
            self._exhausted = initial_state["exhausted"]
            self._done = initial_state["done"]

    def next(self) -> MetaBatch | SubBatch:
        current = self._current
        if current is not None and not current.answered:
            raise FeedbackError(
                f"the meta-batch emitted at step {self.sampler.step} was never answered: "
                "call meta.select(losses) before asking for the next one"
            )
        self._retire()
        if self._done:
            raise StopIteration
        if self._exhausted:
            self._end_epoch()
        position = self._snapshot()
        samples, parts = [], []
        while len(samples) < self.sampler.meta_batch_size and not self._exhausted:
            fresh = self._pull(self.sampler.meta_batch_size - len(samples))
            if fresh:
                fresh, who = self._unpruned(fresh, identify(fresh))
                samples += fresh
                parts.append(who)
        if not samples:
            self._end_epoch()
        try:
            data = self.collate_fn(samples)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"collate_fn could not batch the {len(samples)} samples of this meta-batch "
                f"({type(exc).__name__}: {exc}); give every sample the same fields, of equal "
                "shapes and collatable types (tensors, arrays, numbers, str), or pass a "
                "collate_fn that handles them"
            ) from exc
        check_rows(data, len(samples))  # before any score changes, not in select()
        meta = MetaBatch(data, Identity.concat(parts), self.sampler)
        self._current, self._position = meta, position
        if self.loss_fn is None:
            return meta
        return meta.select(self.loss_fn(meta.data) if meta.needs_losses else None)

    def get_state(self) -> dict[str, Any]:
        if self._current is not None and not self._current.answered:
            return {**self._position, "sampler": self.sampler.get_state()}
        return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "source": self.source.state_dict(),
            "sampler": self.sampler.get_state(),
            "exhausted": self._exhausted,
            "done": self._done,
        }

    def _pull(self, n: int) -> list[Any]:
        """Up to ``n`` samples from the source; fewer when it runs out."""
        pulled = []
        for _ in range(n):
            try:
                pulled.append(next(self.source))
            except StopIteration:
                self._exhausted = True
                break
        return pulled

    def _unpruned(self, samples: list[Any], who: Identity) -> tuple[list[Any], Identity]:
        """Leave out samples the sampler prunes this epoch that the source did not skip
        (a source without the ``pruned=sampler.pruned`` hook); counted in
        ``pruned_by_stage``."""
        boundary = self.sampler.boundary
        if boundary is None or boundary.prune is None or who.ordinals is None:
            return samples, who
        keep = boundary.drop_pruned(who.shards, who.ordinals)
        if keep.all():
            return samples, who
        self.pruned_by_stage += int((~keep).sum())
        kept = np.flatnonzero(keep)
        return [samples[i] for i in kept.tolist()], who.take(kept)

    def _end_epoch(self) -> None:
        self.sampler.end_epoch()
        self._done = True
        raise StopIteration

    def _retire(self) -> None:
        if self._current is not None:
            self._current.retire()
            self._current = None


def identify(samples: list[Any]) -> Identity:
    """The identities of buffered samples: ``__shard__`` (default ``""``), ``__key__`` and,
    when every sample has one, ``__index__``."""
    try:
        keys = [sample["__key__"] for sample in samples]
    except (KeyError, TypeError, IndexError):
        raise ConfigError(
            "every sample must be a dict with a stable '__key__' (and ideally '__shard__' and "
            "'__index__') so that scores follow samples across epochs; es_pipe's sources "
            "add them, webdataset adds '__key__', or add them in your map step"
        ) from None
    shards = [sample.get("__shard__", "") for sample in samples]
    ordinals = [sample.get("__index__") for sample in samples]
    if None in keys or not all(isinstance(shard, str) for shard in shards):
        raise ConfigError(
            "a sample has '__key__' None or a '__shard__' that is not a str: give every sample "
            "a stable, non-None '__key__' and the shard's name as '__shard__'"
        )
    if None in ordinals:
        return Identity.of(shards, keys, None)
    try:
        array = np.asarray(ordinals)
    except ValueError:  # ragged sequences
        array = np.asarray(ordinals, dtype=object)
    if (
        array.ndim != 1
        or array.dtype.kind not in "iu"
        or (array.size and not 0 <= array.min() <= array.max() < 2**31)
    ):
        raise ConfigError(
            "'__index__' must be the sample's position in its shard: an int in [0, 2**31), "
            f"got {ordinals[:3]}"
        )
    return Identity.of(shards, keys, array)


def evolve(
    iterable: Iterable[Any],
    sampler: Sampler,
    *,
    loss_fn: LossFn | None = None,
    collate_fn: Callable[[list[Any]], Any] = default_collate,
) -> tn.Loader:
    """The stage over any iterable of samples (a DataLoader, a webdataset pipeline).

    Each ``iter()`` of the result is one epoch; it has ``state_dict``/``load_state_dict``.
    In a webdataset pipeline: ``wds.DataPipeline(..., partial(es_pipe.evolve, sampler=s))``.
    """
    return tn.Loader(EvolvedSampling(iterable, sampler, loss_fn=loss_fn, collate_fn=collate_fn))
