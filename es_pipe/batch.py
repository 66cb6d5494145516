"""What the stage hands the trainer: a meta-batch to score, then the sub-batch to train.

``MetaBatch.select(losses)`` is the feedback channel: it takes one loss per member, in
meta-batch order, on any device, and returns the ``SubBatch``. Each meta-batch is answered
exactly once, while it is the stage's current one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np
from torch import Tensor

from es_pipe.errors import ConfigError, FeedbackError
from es_pipe.sampler import Identity, Selection, Selector


def take_list(values: Sequence[Any], positions: np.ndarray) -> list[Any]:
    """``[values[i] for i in positions]`` in one C-level ``itemgetter`` call."""
    picked = positions.tolist()
    if len(picked) == 1:
        return [values[picked[0]]]
    return list(itemgetter(*picked)(values)) if picked else []


def take(data: Any, indices: Tensor) -> Any:
    """Rows ``indices`` of a collated batch: tensors, arrays, lists, tuples and dicts."""
    if isinstance(data, Tensor):
        return data.index_select(0, indices.to(data.device))
    positions = indices.cpu().numpy()
    if isinstance(data, np.ndarray):
        return data[positions]
    if isinstance(data, Mapping):
        return {name: take(value, indices) for name, value in data.items()}
    if isinstance(data, tuple):
        return tuple(take(value, indices) for value in data)
    if isinstance(data, list):
        return take_list(data, positions)
    raise TypeError(
        f"cannot select rows of a {type(data).__name__}; collate to tensors, "
        "arrays, lists, tuples or dicts of them"
    )


def move(data: Any, device: Any, non_blocking: bool = False) -> Any:
    """A collated batch with its tensors on ``device`` (dicts, tuples, named tuples and
    lists of them; other leaves, such as numpy arrays and strings, as they are)."""
    if isinstance(data, Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, Mapping):
        return {name: move(value, device, non_blocking) for name, value in data.items()}
    if isinstance(data, tuple):
        moved = [move(v, device, non_blocking) for v in data]
        return type(data)(*moved) if hasattr(type(data), "_fields") else tuple(moved)
    if isinstance(data, list):
        return [move(v, device, non_blocking) for v in data]
    return data


def check_rows(data: Any, n: int, where: str = "batch") -> None:
    """Raise ``ConfigError`` unless every tensor, array, list and tuple entry of a collated
    batch has ``n`` rows (``take`` selects rows of each)."""
    if isinstance(data, Mapping):
        for name, value in data.items():
            check_rows(value, n, f"{where}[{name!r}]")
    elif isinstance(data, tuple):
        for i, value in enumerate(data):
            check_rows(value, n, f"{where}[{i}]")
    elif isinstance(data, (Tensor, np.ndarray, list)):
        rows = len(data) if isinstance(data, list) or data.ndim else None
        if rows != n:
            raise ConfigError(
                f"the collated {where} has {rows} rows for a meta-batch of {n} samples; give "
                "every sample the same fields with the same structure, or pass a collate_fn "
                "whose output has one row per sample"
            )
    else:
        raise ConfigError(
            f"cannot select rows of the collated {where}, a {type(data).__name__}; collate to "
            "tensors, arrays, lists, tuples or dicts of them"
        )


@dataclass
class SubBatch:
    """The selected members: train on ``data``; ``weights`` (when the sampler reweights)
    multiply the per-sample losses. With history scoring, ``report`` the training
    losses back before asking the stage for the next meta-batch (a ``FeedbackError``
    otherwise, like a meta-batch never answered)."""

    data: Any
    indices: Tensor
    weights: Tensor | None
    phase: str
    step: int
    who: Identity
    _sampler: Selector = field(repr=False)
    _reported: bool = field(default=False, repr=False)

    @property
    def keys(self) -> list[str]:
        return list(self.who.keys)

    def __len__(self) -> int:
        return len(self.who.keys)

    def to(self, device: Any, *, non_blocking: bool = False, **_: Any) -> SubBatch:
        """Move ``data`` and ``weights`` to ``device``, in place, and return this sub-batch
        (the same object: the stage checks that it is reported). Frameworks that move a
        batch with ``batch.to(device)`` (Lightning's batch transfer) move it like any
        other."""
        self.data = move(self.data, device, non_blocking)
        if self.weights is not None:
            self.weights = self.weights.to(device, non_blocking=non_blocking)
        return self

    def report(self, losses: Any) -> None:
        """Feed back the per-sample training losses of this sub-batch (history scoring)."""
        if self._sampler.scoring != "history":
            raise FeedbackError(
                "report() feeds training losses to a sampler with scoring='history'; this "
                "one scores with a forward pass, which already updated the scores"
            )
        if self._reported:
            raise FeedbackError(
                f"the sub-batch of step {self.step} was already reported: call report(losses) once "
                "per sub-batch"
            )
        self._sampler.observe(self.who, losses, self.step)
        self._reported = True


class MetaBatch:
    """``B`` buffered samples, collated. Score them, then ``select(losses)``."""

    def __init__(
        self,
        data: Any,
        who: Identity,
        sampler: Selector,
    ) -> None:
        self.data = data
        self.who = who
        self._sampler = sampler
        self._answered = False
        self._current = True
        self._sub: SubBatch | None = None

    def __len__(self) -> int:
        return len(self.who.keys)

    @property
    def keys(self) -> list[str]:
        return list(self.who.keys)

    def to(self, device: Any, *, non_blocking: bool = False, **_: Any) -> MetaBatch:
        """Move the collated ``data`` to ``device``, in place, and return this meta-batch
        (the same object: it is the one the stage waits to see answered). Frameworks that
        move a batch with ``batch.to(device)`` (Lightning's batch transfer) move it like any
        other; ``select`` then returns a sub-batch on that device."""
        self.data = move(self.data, device, non_blocking)
        return self

    @property
    def needs_losses(self) -> bool:
        """False where ``select()`` needs no losses (annealing, history scoring, policies
        that ignore them): the scoring forward pass can be skipped."""
        return self._sampler.needs_losses

    @property
    def batch_size(self) -> int:
        """How many members ``select`` will return."""
        return self._sampler.sub_batch_size(len(self))

    def select(self, losses: Any | None = None) -> SubBatch:
        """Choose the sub-batch from per-member losses (meta-batch order, any device)."""
        if self._answered:
            raise FeedbackError(
                "this meta-batch was already answered: select() once per meta-batch"
            )
        if not self._current:
            raise FeedbackError(
                "this meta-batch is no longer current (the stage has moved on, or was reset "
                "or restored); select on the meta-batch the stage emitted last"
            )
        chosen: Selection = self._sampler.select(self.who, losses, len(self))
        self._answered = True
        positions = chosen.indices.cpu().numpy()
        self._sub = SubBatch(
            data=take(self.data, chosen.indices),
            indices=chosen.indices,
            weights=chosen.weights,
            phase=chosen.phase,
            step=chosen.step,
            who=self.who.take(positions),
            _sampler=self._sampler,
        )
        return self._sub

    @property
    def answered(self) -> bool:
        return self._answered

    @property
    def unreported(self) -> SubBatch | None:
        """The sub-batch selected from this meta-batch while its training losses are still
        owed: under history scoring they are the only losses the scores get."""
        sub = self._sub
        if sub is None or sub._reported or self._sampler.scoring != "history":
            return None
        return sub

    def retire(self) -> None:
        """Called by the stage when this meta-batch stops being current."""
        self._current = False
