"""Restore from manifests: a shard's scores, keys and pruning decision from the newest
committed manifest that has it, the first time the shard shows up in an epoch (a ``pruned``
hook call by a source, or a meta-batch), with its fingerprint and keys checked; and the
start of a run, which claims the manifests folder and finds where to continue.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from es_pipe.checks import is_int
from es_pipe.errors import ManifestError
from es_pipe.eswp import rule
from es_pipe.eswp.book import EpochBook
from es_pipe.manifests import Manifests, fingerprints_match
from es_pipe.scores import ScoreStore

OnMismatch = Literal["raise", "fresh"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumed:
    """Where a run resumed from the manifests goes on: after ``epoch``, at ``step``."""

    epoch: int
    step: int | None


def begin(
    manifests: Manifests, *, world_size: int, identity: Mapping[str, Any], resume: bool | str
) -> Resumed | None:
    """Claim the manifests folder (its lease, the run identity check) and, when resuming,
    the newest committed epoch and the step its marker records."""
    latest = manifests.begin(world_size=world_size, identity=identity, resume=resume)
    if latest is None:
        return None
    step = manifests.marker(latest).get("hyper", {}).get("step")
    if step is not None and not is_int(step, at_least=0, below=2**31 - 1):
        raise ManifestError(
            f"the commit marker of epoch {latest} under {manifests.url} records step "
            f"{step!r}, not a step count; restore the marker or start with resume=False"
        )
    return Resumed(latest, None if step is None else int(step))


class Restorer:
    """Restores shards into a score store and an epoch book from committed manifests."""

    def __init__(
        self,
        manifests: Manifests,
        on_mismatch: OnMismatch,
        fingerprint_fn: Callable[[str], dict[str, Any] | None],
        stats: dict[str, int],
    ) -> None:
        self.manifests = manifests
        self.on_mismatch = on_mismatch
        self.fingerprint_fn = fingerprint_fn
        self.stats = stats
        self._fingerprints: dict[str, dict[str, Any] | None] = {}
        self._committed: list[int] | None = None  # committed epochs, listed once per epoch
        # resumed from the manifests: until a shard seen is found in them, count the
        # unknown ones; too many means the data moved or is another run's (see restore)
        self.expect_known = False
        self._unknown: list[str] = []

    def forget_listing(self) -> None:
        """List the committed epochs again (a new epoch, or a rewind)."""
        self._committed = None

    def committed(self) -> list[int]:
        """The committed epochs, listed once per epoch, not once per shard."""
        if self._committed is None:
            self._committed = self.manifests.committed(refresh=False)
        return self._committed

    def fingerprint(self, shard: str) -> dict[str, Any] | None:
        """The shard's fingerprint, looked up once per run: shards are immutable, and an
        object store charges a request per lookup."""
        if shard not in self._fingerprints:
            self._fingerprints[shard] = self.fingerprint_fn(shard)
        return self._fingerprints[shard]

    def restore(self, shard: str, book: EpochBook, store: ScoreStore) -> None:
        """Load ``shard`` from the newest committed manifest that has it, if newer than what
        this rank holds."""
        epoch = self.manifests.find(shard, before=book.epoch, epochs=self.committed())
        if self.expect_known:
            anywhere = self.manifests.find(shard, epochs=self.committed())
            self._expect_known(shard, book.epoch, epoch is not None or anywhere is not None)
        if epoch is None or book.written.get(shard, -1) >= epoch:
            return
        # held from a checkpoint (state_dict): its scores are authoritative, but this
        # epoch's pruning decision lives only in the manifest of the epoch before
        held = shard in store.shards and shard not in book.written
        if held and epoch + 1 != book.epoch:
            return
        manifest = self.manifests.read_shard(shard, epoch)
        stored = manifest.meta.get("fingerprint")
        current = self.fingerprint(shard)
        if not fingerprints_match(stored, current):
            self._mismatch(shard, manifest.path, stored, current, book, store)
            return
        columns = manifest.columns
        if not held:
            store.load_shard(shard, columns)
            book.keys.adopt(shard, manifest.keys, manifest.path)
            self.stats["restored"] += 1
            log.debug("restored the scores of shard %s from %s", shard, manifest.path)
        if epoch + 1 == book.epoch:
            state = columns["streak"].astype(np.uint8)
            state[columns["weight"] != 1.0] |= rule.UPWEIGHT
            book.decisions[shard] = rule.from_state(state, manifest.meta.get("factor", 1.0))
        else:
            book.decisions.pop(shard, None)

    def _mismatch(
        self, shard: str, path: str, stored: Any, current: Any, book: EpochBook, store: ScoreStore
    ) -> None:
        message = (
            f"manifest {path} was written for shard {shard!r} with fingerprint "
            f"{stored}, but the shard now has {current}: the shard changed since, and "
            "its scores would belong to other samples"
        )
        if self.on_mismatch == "raise":
            raise ManifestError(
                message + ". Restore the original shard, start with a fresh manifests= "
                "folder, or pass on_mismatch='fresh' to start this shard from scratch"
            )
        warnings.warn(message + "; starting this shard fresh (on_mismatch='fresh')", stacklevel=5)
        self.stats["fresh"] += 1
        if shard in store.shards:
            store.drop(shard)
        book.decisions.pop(shard, None)
        book.keys.forget(shard)

    def _expect_known(self, shard: str, epoch: int, known: bool) -> None:
        """After resuming from the manifests, the first shards seen must be in them: a run
        whose first ``min(4, shards committed)`` shards are all unknown reads other data
        (moved to new URLs, or another run's folder), and would restore nothing while
        continuing at the committed epoch and step."""
        manifests = self.manifests
        if known:
            self.expect_known = False
            return
        self._unknown.append(shard)
        epochs = self.committed()
        committed = len(manifests.marker(epochs[-1])["files"]) if epochs else 0
        if len(self._unknown) < max(1, min(4, committed)):
            return
        example = next(iter(manifests.shards(epochs[-1])), None) if epochs else None
        raise ManifestError(
            f"resumed at epoch {epoch} from {manifests.url}, but none of the first "
            f"{len(self._unknown)} shards read ({', '.join(self._unknown[:2])}, ...) is in its "
            f"committed manifests (which name shards like {example!r}): the data moved, or "
            "the folder is another run's. If the data moved, map the old URLs: "
            "manifests=es_pipe.Manifests(url, relocate={'old_prefix': 'new_prefix'}); "
            "otherwise start over with resume=False or a new manifests= folder, or pass "
            "resume='force' to continue anyway"
        )

    def committed_pruned(self, shard: str, epoch: int) -> np.ndarray | None:
        """Ordinals of ``shard`` that the commit of ``epoch - 1`` prunes in ``epoch``."""
        if epoch < 1 or epoch - 1 not in self.committed():
            return None
        if self.manifests.shards(epoch - 1).get(shard) is None:
            return None
        manifest = self.manifests.read_shard(shard, epoch - 1)
        ordinals = np.flatnonzero(manifest.columns["pruned"]).astype(np.int64)
        return ordinals if len(ordinals) else None

    def committed_count(self, shard: str, epoch: int) -> int | None:
        """How many samples of ``shard`` ``epoch`` skips, from the commit marker of
        ``epoch - 1`` (``None``: not committed)."""
        if epoch < 1 or epoch - 1 not in self.committed():
            return None
        entry = self.manifests.shards(epoch - 1).get(shard)
        if entry is None:
            return 0
        if "pruned" in entry:
            return int(entry["pruned"])
        ordinals = self.committed_pruned(shard, epoch)  # a marker from before counts
        return 0 if ordinals is None else len(ordinals)
