"""``es_pipe.ESWP``: Evolved Sampling with pruning, as one optional part of a sampler.

``Selector(Evolved(), B, b, eswp=es_pipe.ESWP(prune=es_pipe.Pruning(...), manifests=url))``.
The sampler keeps the policy, the schedule, the scores and the RNG; the ESWP part holds
the pruning rule (:mod:`~es_pipe.eswp.rule`), this epoch's book (:mod:`~es_pipe.eswp.book`),
the restore from manifests (:mod:`~es_pipe.eswp.restore`) and the epoch commit
(:mod:`~es_pipe.eswp.commit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from es_pipe.checks import is_positive_number
from es_pipe.errors import ConfigError
from es_pipe.eswp import commit, restore
from es_pipe.eswp.book import EpochBook
from es_pipe.eswp.commit import EpochCommit
from es_pipe.eswp.restore import OnMismatch, Restorer, Resumed
from es_pipe.eswp.rule import Decision, Pruning
from es_pipe.manifests import Manifests
from es_pipe.scores import ScoreStore, ShardCodes

if TYPE_CHECKING:
    from es_pipe.sampler import Selector

log = logging.getLogger(__name__)
Resume = bool | Literal["force"]


def check_options(
    resume: Any, run_id: Any, on_mismatch: Any, commit_timeout: Any, prune: Any
) -> None:
    """``ConfigError`` naming the first of ESWP's options that is not valid."""
    if prune is not None and not isinstance(prune, Pruning):
        raise ConfigError(
            f"prune={prune!r}: give es_pipe.Pruning(ratio=..., anneal=...), "
            "es_pipe.Pruning.infobatch() or None"
        )
    if on_mismatch not in ("raise", "fresh"):
        raise ConfigError(f"on_mismatch={on_mismatch!r}: use 'raise' or 'fresh'")
    if resume not in (True, False, "force"):
        raise ConfigError(f"resume={resume!r}: use True, False or 'force'")
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ConfigError(f"run_id={run_id!r} must be a non-empty string or None")
    if not is_positive_number(commit_timeout):
        raise ConfigError(f"commit_timeout={commit_timeout!r} must be a number of seconds > 0")


class ESWP:
    """Set-level pruning across epochs (ESWP) and the per-epoch score manifests.

    Args:
        prune: the rule, ``es_pipe.Pruning(ratio=0.3, anneal=0.125)`` (ESWP) or
            ``es_pipe.Pruning.infobatch()``; ``None`` writes manifests without pruning. Pruned
            samples are skipped by the sources (their ``pruned=sampler.pruned`` hook) or
            by the stage. Pruning ranks by scores, which form from losses: a policy that
            needs no losses (``Uniform()``, ``RandomSubset()``) needs the sampler's
            ``scoring="history"`` plus ``batch.report(losses)`` (``ConfigError``
            otherwise).
        manifests: a folder or fsspec URL (or an ``es_pipe.Manifests``) where every
            epoch's per-shard scores and pruning decisions are written as Parquet and
            committed; shards are restored from it the first time they show up. Needed
            on more than one rank.
        resume: with ``manifests`` that already hold committed epochs, continue after the
            newest (epoch and step from its commit) unless a checkpoint is loaded;
            ``False`` starts over at epoch 0 (and replaces the old epochs as it commits).
            Only the same run is continued: the commits record a run identity (a
            fingerprint of the policy, B, b, scoring and pruning rule, plus ``run_id``),
            and epochs of another run raise ``ManifestError``, as does data that moved
            (pass ``manifests=es_pipe.Manifests(url, relocate=...)``). ``"force"`` adopts
            another run's epochs deliberately (with a warning).
        run_id: an optional name of this run, recorded in every commit and required to
            match when resuming.
        on_mismatch: a manifest whose shard fingerprint differs from the shard:
            ``"raise"`` (``ManifestError``) or ``"fresh"`` (warn, start that shard over).
        commit_timeout: seconds rank 0 waits at an epoch's end for the other ranks'
            manifests (and the other ranks for rank 0's commit).

    When the I/O happens: constructing does none. The manifests folder is claimed (its
    lease, the run identity check) and a resume finds its epoch at the sampler's
    ``start()``: the stage's first ``reset()`` (the first ``iter(loader)``) or the
    sampler's first use, whichever comes first. The epoch commit, with the wait for the
    other ranks, runs where the sampler's epoch ends (the last ``next()`` of the epoch's
    ``for meta in loader``); ``sampler.last_commit`` says what it did and how long it
    took.

    One ESWP belongs to one sampler (it holds that sampler's epoch book).

    Its ~260 lines are the facade the sampler, the stage and the sources' hook talk to;
    the work is in the modules named above.
    """

    def __init__(
        self,
        prune: Pruning | None = None,
        manifests: str | Manifests | Any = None,
        *,
        resume: Resume = True,
        run_id: str | None = None,
        on_mismatch: OnMismatch = "raise",
        commit_timeout: float = 300.0,
        fingerprint_fn: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        check_options(resume, run_id, on_mismatch, commit_timeout, prune)
        if prune is None and manifests is None:
            raise ConfigError(
                "es_pipe.ESWP() needs prune= (the pruning rule, e.g. es_pipe.Pruning()), "
                "manifests= (a folder for the per-epoch scores), or both; for neither, give "
                "the sampler no eswp="
            )
        self.prune = prune
        self.resume: Resume = resume
        self.run_id = run_id
        self.on_mismatch: OnMismatch = on_mismatch
        self.commit_timeout = float(commit_timeout)
        self.fingerprint_fn = fingerprint_fn
        self._manifests_arg = manifests
        self.manifests: Manifests | None = None
        self.restorer: Restorer | None = None
        self.book = EpochBook()
        self.stats = {"restored": 0, "written": 0, "fresh": 0}
        self.store = ScoreStore()  # the sampler's, once bound
        self.seed = 0
        self.world_size = 1
        self.hyper: dict[str, Any] = {}
        self.run: dict[str, Any] | None = None  # run identity recorded in each commit
        self.last_commit: EpochCommit | None = None
        self._sampler: Selector | None = None
        self._checked: set[str] = set()  # shards compared with the manifests this epoch

    def __repr__(self) -> str:
        where = self._manifests_arg if self.manifests is None else self.manifests.url
        return f"ESWP(prune={self.prune!r}, manifests={where!r}, resume={self.resume!r})"

    # ------------------------------------------------------------------ wiring

    def bind(self, sampler: Selector) -> None:
        """Become ``sampler``'s ESWP part (the sampler's constructor calls this)."""
        if self._sampler is not None and self._sampler is not sampler:
            raise ConfigError(
                "this es_pipe.ESWP is already given to another sampler, and it holds that "
                "sampler's epoch book: make one ESWP per sampler"
            )
        prune, total = self.prune, sampler.schedule.total_epochs
        if prune is not None and sampler.scoring == "forward" and not sampler.policy.needs_losses:
            raise ConfigError(
                f"prune={prune!r} ranks samples by their scores, and with "
                f"scoring='forward' a {sampler.policy.name!r} policy never receives a loss "
                "(meta.needs_losses is False, so no scoring pass runs): nothing would ever "
                "be pruned. Pass scoring='history' and feed the training losses back with "
                "batch.report(losses) after each step (InfoBatch's way), or use a policy that "
                "scores with a forward pass, e.g. es_pipe.Evolved()"
            )
        if prune is not None and prune.needs_total_epochs() and total is None:
            raise prune.total_epochs_missing()
        if prune is not None and self._manifests_arg is None and sampler.world_size > 1:
            raise ConfigError(
                f"prune= on {sampler.world_size} ranks needs manifests=: a rank learns the "
                "pruning decisions of the shards it reads next epoch from the manifests the "
                "other ranks committed. Pass es_pipe.ESWP(..., manifests='s3://bucket/run/"
                "manifests') (any folder every rank can reach)"
            )
        manifests = self._manifests_arg
        if manifests is not None and not isinstance(manifests, Manifests):
            manifests = Manifests(manifests, rank=sampler.rank)
        elif manifests is not None and manifests.rank != sampler.rank:
            raise ConfigError(
                f"manifests={manifests!r} was made for rank {manifests.rank}, but this sampler "
                f"is rank {sampler.rank}: two ranks would write the same files. Pass "
                f"es_pipe.Manifests(url, rank={sampler.rank}, storage_options=...), or the URL"
            )
        self.manifests = manifests
        if manifests is not None:
            # the shards' fingerprints under the manifests' retry= policy, unless given
            look = self.fingerprint_fn or manifests.fingerprint
            self.restorer = Restorer(manifests, self.on_mismatch, look, self.stats)
        self._sampler = sampler
        self.store = sampler.store
        self.seed, self.world_size = sampler.seed, sampler.world_size
        self.hyper = sampler.hyper()

    def start(self, identity: Mapping[str, Any]) -> Resumed | None:
        """Claim the manifests folder and, when resuming, move the book to the epoch after
        the newest commit (see the class: "When the I/O happens")."""
        self.run = dict(identity)
        if self.manifests is None:
            return None
        resumed = restore.begin(
            self.manifests, world_size=self.world_size, identity=self.run, resume=self.resume
        )
        if resumed is not None and self.restorer is not None:
            self.book.epoch = resumed.epoch + 1
            self.restorer.expect_known = self.resume != "force"
        return resumed

    def ensure_started(self) -> None:
        """Start the sampler's run (its first use), when asked by a source's hook first."""
        if self._sampler is not None:
            self._sampler.start()

    # ------------------------------------------------------------------ the book

    @property
    def epoch(self) -> int:
        """The epoch the decisions held apply to (the one being read)."""
        return self.book.epoch

    @property
    def decisions(self) -> dict[str, Decision]:
        return self.book.decisions

    @property
    def epoch_cell(self) -> torch.Tensor:
        return self.book.epoch_cell

    def share_epoch(self) -> None:
        self.book.share_epoch()

    def fingerprint(self, shard: str) -> dict[str, Any] | None:
        return None if self.restorer is None else self.restorer.fingerprint(shard)

    def see(self, shard: str) -> None:
        """First sight of ``shard`` this epoch: restore it from the manifests."""
        if shard in self._checked:
            return
        self._checked.add(shard)
        if self.restorer is not None:
            self.restorer.restore(shard, self.book, self.store)

    def new_listing(self) -> None:
        """Compare shards with the newest commit again (a new epoch, a rewind)."""
        self._checked = set()
        if self.restorer is not None:
            self.restorer.forget_listing()

    # ------------------------------------------------------------------ hooks

    def pruned(self, shard: str, epoch: int | None = None) -> np.ndarray | None:
        """Sorted int64 ordinals of ``shard`` to skip in ``epoch`` (default: the current)."""
        self.ensure_started()
        if epoch is None or epoch == self.book.epoch:
            self.see(shard)
            decision = self.book.decisions.get(shard)
            return None if decision is None or not len(decision.pruned) else decision.pruned
        return None if self.restorer is None else self.restorer.committed_pruned(shard, epoch)

    def pruned_count(self, shard: str, epoch: int) -> int:
        """How many samples of ``shard`` ``epoch`` skips, the same answer on every rank and
        without loading the shard's scores: from the commit marker of ``epoch - 1`` (which
        every rank waited for), else from the decisions this rank holds."""
        self.ensure_started()
        if self.prune is None:
            return 0
        count = None if self.restorer is None else self.restorer.committed_count(shard, epoch)
        if count is not None:
            return count
        decision = self.book.decisions.get(shard) if epoch == self.book.epoch else None
        return 0 if decision is None else len(decision.pruned)

    def admit(self, shards: ShardCodes, keys: Sequence[str], ordinals: np.ndarray | None) -> None:
        """A meta-batch arrives: restore its new shards, check and record its keys."""
        names = set(shards.names)
        for name in names - self._checked:
            self.see(name)
        self.book.touched.update(names)
        if self.manifests is None:
            return
        if ordinals is None:
            raise ConfigError(
                "manifests= needs each sample's ordinal in its shard ('__index__'); es_pipe's "
                "sources add it, or add it in your map step"
            )
        self.book.keys.record(shards, keys, ordinals)

    def drop_pruned(self, shards: ShardCodes, ordinals: np.ndarray) -> np.ndarray:
        """Mask of the samples to keep (those this epoch does not prune)."""
        if self.prune is None:
            return np.ones(len(shards), dtype=bool)
        new = set(shards.names) - self._checked
        if new:  # first sight: restore, in the order the shards came
            for name in shards.names:
                if name in new:
                    self.see(name)
        return self.book.keep_mask(shards, ordinals)

    def weights(self, shards: ShardCodes, ordinals: np.ndarray | None) -> np.ndarray | None:
        """1/keep loss weights of the given samples (``None``: all 1)."""
        return self.book.weights(self.prune, shards, ordinals)

    # ------------------------------------------------------------------ epoch end, restore

    def close_epoch(self, ended: int, *, active: bool, rank: int, step: int) -> EpochCommit:
        """Decide the next epoch's pruning for every shard read in ``ended``, write their
        manifests, commit (rank 0) or wait for the commit (see :mod:`~es_pipe.eswp.commit`)."""
        self.last_commit = commit.close_epoch(self, ended, active=active, rank=rank, step=step)
        return self.last_commit

    def rewind(self, epoch: int, *, merged: bool = False) -> None:
        """The sampler was restored to ``epoch`` (a checkpoint): forget the decisions held
        and restore every shard again from the manifests committed before ``epoch``.

        The shards the checkpoint's score table says this rank read in the epoch up to the
        checkpoint (``load_read``) count as read this epoch by this rank; it also holds
        shards it read in the epoch before, which another rank may read in this one. A
        table without that list (es_pipe before issue 11) counts every shard it holds.
        If the checkpoint was ``merged`` from all ranks of a topology (elastic resume),
        the rank that reads a shard again writes its manifest, and a shard nobody reads
        again (it was done) is written by its :func:`~es_pipe.eswp.commit.shard_owner`.

        Also at the same epoch: a fresh process that resumed from the manifests is at the
        checkpoint's epoch already, but holds nothing of it yet. Without manifests, the
        decisions held are the only ones there are: kept at the same epoch."""
        forget = self.manifests is not None or int(epoch) != self.book.epoch
        self.book.rewind(epoch, set(self.store.shards), merged=merged, forget=forget)
        self.new_listing()

    def load_read(self, names: Sequence[str] | None) -> None:
        self.book.load_read(names, set(self.store.shards))
