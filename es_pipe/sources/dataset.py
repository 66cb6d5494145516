"""A ``torch.utils.data.IterableDataset`` view of a source, for (Stateful)DataLoader.

DataLoader worker processes each get a copy of the dataset; the copy finds its worker id
with ``get_worker_info()`` at the start of each epoch and reads its share of the shards.
``state_dict``/``load_state_dict`` are what ``torchdata.stateful_dataloader
.StatefulDataLoader`` calls in every worker, so mid-epoch checkpoints resume exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from es_pipe.sources.base import ShardedSource
from es_pipe.sources.plan import merge_states

__all__ = ["SourceDataset"]


class SourceDataset(IterableDataset):
    """Wrap a source node so that DataLoader workers split it and checkpoint it.

    Example::

        ds = SourceDataset(WebDatasetSource("data/train-{000..063}.tar", shuffle=True))
        loader = StatefulDataLoader(ds, batch_size=None, num_workers=3)
        for epoch in range(10):
            ds.set_epoch(epoch)  # with workers (the SelectStage stage calls it)
            for sample in loader:
                ...
        state = loader.state_dict()  # per-worker source states inside

    To resume on a different number of workers (StatefulDataLoader refuses to), take the
    per-worker states out with :meth:`states_from_loader`, merge them, and give the merged
    state to a fresh dataset: ``ds.load_state_dict(merge_states(states))`` before creating
    the new loader.

    The wrapped node must not have been given explicit ``worker=``/``num_workers=``.

    Persistent workers (``persistent_workers=True``) keep their copy of the dataset for the
    whole run, out of reach of later ``set_epoch`` calls on this object; so the epoch also
    travels through a one-number tensor in shared memory, which every worker's copy shares
    and reads when its next epoch starts. Their ``pruned=sampler.pruned`` hook reads later
    epochs' decisions from the sampler's committed manifests (:mod:`es_pipe.prune_hook`).
    """

    def __init__(self, source: ShardedSource) -> None:
        super().__init__()
        self.source = source
        self._pending: dict | None = None
        self._need_reset = True
        # the epoch set last (-1: none), shared with every worker, persistent ones included
        self._epoch = torch.full((1,), -1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (call before each epoch with workers).

        A state given to :meth:`load_state_dict` and not used yet is kept when it is a
        state of ``epoch`` (the epoch resumes there) and forgotten otherwise: a resumed
        epoch is followed by a fresh one. The ``SelectStage`` stage calls this before
        every epoch with the sampler's epoch.
        """
        if self._pending is not None and self._pending.get("epoch") != epoch:
            self._pending = None
        self._epoch[0] = int(epoch)
        self.source.set_epoch(epoch)

    def __iter__(self) -> SourceDataset:
        self._need_reset = True
        return self

    def _ensure(self) -> None:
        if self._need_reset:
            self._need_reset = False
            state, self._pending = self._pending, None
            epoch = int(self._epoch[0])
            if state is None and epoch >= 0 and get_worker_info() is not None:
                self.source.set_epoch(epoch)  # a persistent worker: set_epoch did not reach it
            self.source.reset(state)

    def __next__(self) -> dict:
        self._ensure()
        return next(self.source)

    def state_dict(self) -> dict[str, Any]:
        self._ensure()
        return self.source.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict
        self._need_reset = True

    @property
    def stats(self) -> dict[str, Any]:
        """The wrapped source's counters for the current epoch (of this process)."""
        return self.source.stats

    @staticmethod
    def states_from_loader(loader_state: dict[str, Any]) -> list[dict[str, Any]]:
        """The source states of every worker inside a ``StatefulDataLoader.state_dict()``."""
        found: list[dict[str, Any]] = []

        def walk(x: Any) -> None:
            if isinstance(x, dict):
                if x.get("version") is not None and "cursors" in x and "stream" in x:
                    found.append(x)
                    return
                for v in x.values():
                    walk(v)

        walk(loader_state)
        return found

    merge_states = staticmethod(merge_states)
