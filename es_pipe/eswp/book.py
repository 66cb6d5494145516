"""This epoch's book: the pruning decisions that apply to the epoch being read, which
shards this rank reads in it, and their keys. In memory only; the manifests are the
:mod:`es_pipe.eswp.restore` and :mod:`es_pipe.eswp.commit` side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np
import torch

from es_pipe.eswp.keys import KeyBook
from es_pipe.eswp.rule import UPWEIGHT, Decision, Pruning
from es_pipe.scores import ShardCodes


class DecisionTable:
    """The decisions held, as flat arrays: what a meta-batch needs from them (is a sample
    pruned, its loss weight) in a few array operations, with no loop over its shards.

    Entry ``j`` (a shard with a decision) owns ``[base[j], base[j] + size[j]]`` of the
    per-ordinal arrays ``pruned`` (its ``Decision.pruned`` ordinals as flags) and
    ``weight`` (``float32(factor)`` where ``Decision.state`` has the up-weight bit, else
    1), plus one spare position at the end (not pruned, weight 1) where ordinals past the
    decision's land; entry 0 stands for "no decision" (size 0, its spare at position 0).
    Built once when an epoch's decisions are set, and kept in step as single decisions
    come and go (a shard restored from the manifests mid-epoch): appended at the end
    (capacity doubles), the space of replaced ones reclaimed by a rebuild (``Decisions``)
    once it is over half of the arrays.
    """

    def __init__(self, decisions: Mapping[str, Decision] | None = None) -> None:
        self.index: dict[str, int] = {}  # shard -> entry (>= 1)
        self.base = np.zeros(16, np.int64)
        self.size = np.zeros(16, np.int64)
        self.factor = np.ones(16, np.float64)
        self.pruned = np.zeros(16, bool)
        self.weight = np.ones(16, np.float32)
        self.entries = 1  # entry 0: no decision
        self.end = 1  # used length of pruned/weight (position 0: entry 0's spare)
        self.dead = 0  # of which belongs to replaced or removed decisions
        for name, decision in (decisions or {}).items():
            self.put(name, decision)

    def put(self, name: str, decision: Decision) -> None:
        """Hold ``decision`` for ``name`` (replacing any)."""
        self.remove(name)
        state = np.asarray(decision.state, np.uint8)
        ordinals = np.asarray(decision.pruned, np.int64)
        size = max(len(state), int(ordinals.max()) + 1 if len(ordinals) else 0)
        if self.entries == len(self.base):
            for attr in ("base", "size", "factor"):
                old = getattr(self, attr)
                grown = np.zeros(2 * len(old), old.dtype)
                grown[: len(old)] = old
                setattr(self, attr, grown)
        if self.end + size + 1 > len(self.weight):
            capacity = max(2 * len(self.weight), self.end + size + 1)
            for attr in ("pruned", "weight"):
                old = getattr(self, attr)
                grown = np.zeros(capacity, old.dtype)
                grown[: self.end] = old[: self.end]
                setattr(self, attr, grown)
        start = self.end
        pruned = self.pruned[start : start + size + 1]
        pruned[:] = False
        pruned[ordinals] = True
        weight = self.weight[start : start + size + 1]
        weight[:] = 1.0
        weight[: len(state)][(state & UPWEIGHT) != 0] = np.float32(decision.factor)
        j = self.entries
        self.base[j], self.size[j], self.factor[j] = start, size, decision.factor
        self.index[name] = j
        self.entries, self.end = j + 1, start + size + 1

    def remove(self, name: str) -> None:
        j = self.index.pop(name, None)
        if j is not None:
            self.dead += int(self.size[j]) + 1

    def of_names(self, names: Sequence[str]) -> np.ndarray:
        """Entry of each shard name (0: no decision)."""
        if len(names) > 1:
            try:
                return np.fromiter(itemgetter(*names)(self.index), np.int64, len(names))
            except KeyError:
                pass
        return np.fromiter(map(self.index.get, names, repeat(0)), np.int64, len(names))

    def positions(self, shards: ShardCodes, ordinals: np.ndarray, entry: np.ndarray) -> np.ndarray:
        """Per sample (``entry``: of its shard name), its position in ``pruned``/``weight``:
        its entry's spare where it has no decision or its ordinal is past the decision's."""
        codes = shards.codes
        return self.base[entry][codes] + np.minimum(ordinals, self.size[entry][codes])


class Decisions(dict[str, Decision]):
    """The decisions held, by shard: a dict that keeps its :class:`DecisionTable` in step
    with every change."""

    def __init__(self, decisions: Mapping[str, Decision] | None = None) -> None:
        super().__init__(decisions or {})
        self.table = DecisionTable(self)

    def _rebuilt(self) -> None:
        if self.table.dead * 2 > self.table.end:
            self.table = DecisionTable(self)

    def __setitem__(self, name: str, decision: Decision) -> None:
        super().__setitem__(name, decision)
        self.table.put(name, decision)
        self._rebuilt()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self.table.remove(name)
        self._rebuilt()

    def pop(self, name: str, *default: Any) -> Any:
        if name in self:
            self.table.remove(name)
        value = super().pop(name, *default)
        self._rebuilt()
        return value

    def popitem(self) -> tuple[str, Decision]:
        name, decision = super().popitem()
        self.table.remove(name)
        self._rebuilt()
        return name, decision

    def setdefault(self, name: str, default: Decision) -> Decision:
        if name not in self:
            self[name] = default
        return self[name]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for name, decision in dict(*args, **kwargs).items():
            self[name] = decision

    def clear(self) -> None:
        super().clear()
        self.table = DecisionTable()

    def __ior__(self, other: Iterable[Any]) -> Decisions:  # type: ignore[override,misc]
        self.update(other)
        return self


class EpochBook:
    """The decisions, the shards read and the key book of one rank's current epoch."""

    def __init__(self) -> None:
        # the epoch the decisions apply to (the one being read), also as a tensor that
        # share_epoch() moves to shared memory for DataLoader workers' hooks (prune_hook)
        self.epoch_cell = torch.zeros(1, dtype=torch.int64)
        self.epoch = 0
        self.decisions = {}
        self.keys = KeyBook()
        self.touched: set[str] = set()  # shards read this epoch by this rank
        self.inherited: set[str] = set()  # held from a merged checkpoint, see rewind
        self.read: set[str] | None = None  # shards read this epoch, from a checkpoint
        self.written: dict[str, int] = {}  # shard -> last epoch this rank wrote it

    @property
    def decisions(self) -> Decisions:
        """The decisions that apply to this epoch, by shard (a dict, with flat arrays)."""
        return self._decisions

    @decisions.setter
    def decisions(self, value: Mapping[str, Decision]) -> None:
        self._decisions = Decisions(value)

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)
        self.epoch_cell[0] = self._epoch

    def share_epoch(self) -> None:
        """Put the epoch in shared memory (in place), before DataLoader workers start: their
        copies of the ``pruned=`` hook then see every later epoch."""
        if not self.epoch_cell.is_shared():
            self.epoch_cell.share_memory_()

    def turn(self, nxt: int, decisions: dict[str, Decision]) -> None:
        """Start epoch ``nxt`` with its decisions (only those that change something)."""
        self.decisions = {n: d for n, d in decisions.items() if len(d.pruned) or d.factor != 1}
        self.touched, self.inherited, self.read = set(), set(), None
        self.keys.new_epoch()
        self.epoch = nxt

    def rewind(self, epoch: int, held: set[str], *, merged: bool, forget: bool) -> None:
        """Restored to ``epoch`` holding ``held`` shards (see ``ESWP.rewind``)."""
        if forget:
            self.decisions = {}
        self.epoch = int(epoch)
        self.keys.new_epoch()
        read = held if self.read is None else held & self.read
        self.touched, self.inherited = (set(), held) if merged else (read, set())
        self.written = {}

    def read_state(self) -> list[str]:
        """The shards this rank read in the current epoch so far, for a checkpoint."""
        return sorted(self.touched)

    def load_read(self, names: Sequence[str] | None, held: set[str]) -> None:
        """The shards read in the checkpoint's epoch up to it (``None``: unknown, every
        shard held counts); applied now and by the ``rewind`` of the position restore."""
        self.read = None if names is None else set(names)
        if self.inherited:  # a merged position was restored already
            return
        self.touched = held if self.read is None else held & self.read

    def keep_mask(
        self,
        shards: ShardCodes,
        ordinals: np.ndarray,
        see: Callable[[str], None] | None = None,
    ) -> np.ndarray:
        """Mask of the samples to keep (those this epoch does not prune). ``see`` is
        called with each shard first (its restore from the manifests), unless the caller
        did that."""
        if see is not None:
            for name in shards.names:
                see(name)
        table = self.decisions.table
        if table.entries == 1:
            return np.ones(len(shards), dtype=bool)
        entry = table.of_names(shards.names)
        return ~table.pruned[table.positions(shards, np.asarray(ordinals, np.int64), entry)]

    def weights(
        self, prune: Pruning | None, shards: ShardCodes, ordinals: np.ndarray | None
    ) -> np.ndarray | None:
        """1/keep loss weights of the given samples (``None``: all 1): the factor of their
        shard's decision where they are up-weighted kept candidates."""
        if prune is None or not prune.rescale or ordinals is None:
            return None
        table = self.decisions.table
        if table.entries == 1:
            return None
        entry = table.of_names(shards.names)
        if not (table.factor[entry] != 1.0).any():
            return None
        return table.weight[table.positions(shards, np.asarray(ordinals, np.int64), entry)]
