"""This epoch's book: the pruning decisions that apply to the epoch being read, which
shards this rank reads in it, and their keys. In memory only; the manifests are the
:mod:`es_pipe.eswp.restore` and :mod:`es_pipe.eswp.commit` side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from es_pipe.eswp.keys import KeyBook
from es_pipe.eswp.rule import Decision, Pruning
from es_pipe.scores import ShardCodes


class EpochBook:
    """The decisions, the shards read and the key book of one rank's current epoch."""

    def __init__(self) -> None:
        # the epoch the decisions apply to (the one being read), also as a tensor that
        # share_epoch() moves to shared memory for DataLoader workers' hooks (prune_hook)
        self.epoch_cell = torch.zeros(1, dtype=torch.int64)
        self.epoch = 0
        self.decisions: dict[str, Decision] = {}
        self.keys = KeyBook()
        self.touched: set[str] = set()  # shards read this epoch by this rank
        self.inherited: set[str] = set()  # held from a merged checkpoint, see rewind
        self.read: set[str] | None = None  # shards read this epoch, from a checkpoint
        self.written: dict[str, int] = {}  # shard -> last epoch this rank wrote it

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
        self, shards: ShardCodes, ordinals: np.ndarray, see: Callable[[str], None]
    ) -> np.ndarray:
        """Mask of the samples to keep (those this epoch does not prune)."""
        keep = np.ones(len(shards), dtype=bool)
        for name in shards.names:
            see(name)
            decision = self.decisions.get(name)
            if decision is not None and len(decision.pruned):
                mask = shards.mask(name)
                keep[mask] = ~decision.is_pruned(ordinals[mask])
        return keep

    def weights(
        self, prune: Pruning | None, shards: ShardCodes, ordinals: np.ndarray | None
    ) -> np.ndarray | None:
        """1/keep loss weights of the given samples (``None``: all 1)."""
        if prune is None or not prune.rescale or ordinals is None:
            return None
        names = [n for n in shards.names if n in self.decisions]
        if not any(self.decisions[n].factor != 1.0 for n in names):
            return None
        out = np.ones(len(shards), dtype=np.float32)
        for name in names:
            mask = shards.mask(name)
            out[mask] = self.decisions[name].weights(ordinals[mask])
        return out
