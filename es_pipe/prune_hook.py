"""The ``pruned=`` hook a source asks which samples ESWP skips, in the trainer's process and
in DataLoader worker processes.

In the trainer's process the hook asks the sampler's :class:`~es_pipe.eswp.ESWP`
(the decisions it holds, restored lazily from the manifests). A DataLoader worker holds a
*copy* of the hook, made when the worker started (fork, or pickling under spawn):
non-persistent workers get a fresh copy every epoch, persistent workers
(``persistent_workers=True``) keep the first one for the whole run. So in a worker the hook
answers from a :class:`WorkerView`:

* the epoch it answers for is the sampler's current one, which the worker reads from a
  one-number tensor in shared memory (``ESWP.epoch_cell``): right even when the
  source in the worker was never told the epoch (no ``set_epoch``: its shard order is
  stale, but the samples the stage will drop are still the ones skipped);
* for the epoch the copy was made in: the decisions the sampler held then;
* for a later epoch (a persistent worker): the decisions the sampler committed to its
  manifests at the end of the epoch before, read in the worker (the stage commits before
  the next epoch starts). Without ``manifests=`` there is nothing to read: the worker reads
  every sample, and the stage drops the pruned ones and warns once with the count.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import get_worker_info

if TYPE_CHECKING:
    from es_pipe.eswp import ESWP
    from es_pipe.manifests import Manifests

log = logging.getLogger(__name__)


class PrunedHook:
    """``Source(..., pruned=sampler.pruned)``: which ordinals of a shard an epoch skips
    (called for the shards a stream reads), and how many (``count``, for ``equalize=``,
    asked for every shard by every rank: answered from the commit marker, so no rank loads
    the scores of shards it does not read)."""

    def __init__(self, boundary: ESWP | None) -> None:
        self._boundary = boundary
        self._view: WorkerView | None = None
        if boundary is not None:  # given to a source, maybe behind DataLoader workers
            boundary.share_epoch()

    @classmethod
    def _of_view(cls, view: WorkerView) -> PrunedHook:
        hook = cls(None)
        hook._view = view
        return hook

    def _worker_view(self) -> WorkerView | None:
        """The view of a DataLoader worker (``None`` in the trainer's process)."""
        if self._view is None and self._boundary is not None and get_worker_info() is not None:
            self._view = WorkerView.of(self._boundary)
        return self._view

    def __call__(self, shard: str, epoch: int | None = None) -> np.ndarray | None:
        view = self._worker_view()
        if view is not None:  # never starts the run: that is the trainer process's I/O
            return view.pruned(shard, epoch)
        return None if self._boundary is None else self._boundary.pruned(shard, epoch)

    def count(self, shard: str, epoch: int) -> int:
        view = self._worker_view()
        if view is not None:
            return view.count(shard, epoch)
        return 0 if self._boundary is None else self._boundary.pruned_count(shard, epoch)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled for a worker started by spawn: the view alone travels (the sampler's
        score table and its open manifest root stay in the trainer's process)."""
        view = self._view
        if view is None and self._boundary is not None:
            self._boundary.ensure_started()  # pickled in the trainer's process
            view = WorkerView.of(self._boundary)
        if view is None:
            return (PrunedHook, (None,))
        return (PrunedHook._of_view, (view,))


class WorkerView:
    """The pruning decisions as a DataLoader worker sees them: the sampler's decisions of
    the epoch the worker's copy was made in, and the committed manifests for later epochs."""

    def __init__(
        self,
        epoch: int,
        pruned: dict[str, np.ndarray],
        prunes: bool,
        manifests: Manifests | None,
        current: Any = None,
    ) -> None:
        self.epoch = int(epoch)
        self.current = current  # the sampler's epoch, shared with the trainer's process
        self.decisions = pruned
        self.prunes = prunes
        self._manifests = manifests
        self._spec = None if manifests is None else _spec(manifests)
        self._committed: set[int] = set()

    @classmethod
    def of(cls, boundary: ESWP) -> WorkerView:
        pruned = {n: d.pruned for n, d in boundary.decisions.items() if len(d.pruned)}
        return cls(
            boundary.epoch,
            pruned,
            boundary.prune is not None,
            boundary.manifests,
            boundary.epoch_cell,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_manifests"] = None  # holds locks and open filesystems: rebuilt from the spec
        return state

    @property
    def manifests(self) -> Manifests | None:
        if self._manifests is None and self._spec is not None:
            from es_pipe.manifests import Manifests

            self._manifests = Manifests(self._spec["url"], **self._spec["options"])
        return self._manifests

    def _committed_entry(self, shard: str, epoch: int) -> dict[str, Any] | None:
        """The manifest entry of ``shard`` in the commit of ``epoch - 1``, where one is."""
        manifests = self.manifests
        if manifests is None or epoch < 1:
            return None
        if epoch - 1 not in self._committed:  # listed once per epoch, not once per shard
            if epoch - 1 not in manifests.committed(refresh=False):
                return None
            self._committed.add(epoch - 1)
            log.debug("worker reads the pruning of epoch %d from %s", epoch, manifests.url)
        return manifests.shards(epoch - 1).get(shard)

    def pruned(self, shard: str, epoch: int | None = None) -> np.ndarray | None:
        if not self.prunes:
            return None
        epoch = self._epoch(epoch)
        if epoch == self.epoch and shard in self.decisions:
            return self.decisions[shard]
        if self._committed_entry(shard, epoch) is None:
            return None
        manifest = self.manifests.read_shard(shard, epoch - 1)  # type: ignore[union-attr]
        ordinals = np.flatnonzero(manifest.columns["pruned"]).astype(np.int64)
        return ordinals if len(ordinals) else None

    def _epoch(self, asked: int | None) -> int:
        """The sampler's current epoch for the epoch the source reads (or ``None``); other
        epochs (a count asked about the next epoch) as asked."""
        if self.current is None:
            return self.epoch if asked is None else int(asked)
        current = int(self.current[0])
        if asked is None or asked == current or asked < current:  # behind: no set_epoch
            return current
        return int(asked)

    def count(self, shard: str, epoch: int) -> int:
        if not self.prunes:
            return 0
        epoch = self._epoch(epoch)
        if epoch == self.epoch and shard in self.decisions:
            return len(self.decisions[shard])
        entry = self._committed_entry(shard, epoch)
        if entry is None:
            return 0
        if "pruned" in entry:
            return int(entry["pruned"])
        ordinals = self.pruned(shard, epoch)
        return 0 if ordinals is None else len(ordinals)


def _spec(manifests: Manifests) -> dict[str, Any]:
    """What a worker needs to open the same manifest root read-only."""
    return {
        "url": manifests.url,
        "options": {
            "storage_options": dict(getattr(manifests.fs, "storage_options", {}) or {}),
            "relocate": manifests.relocate,
            "retry": manifests.retry,
        },
    }
