"""The sampler: a selection policy, its schedule, its score store and its RNG position.

It turns one meta-batch's identities and losses into a selection, and is the only place
where scores change. Bad feedback raises before anything changes: scores, step counter and
RNG position are updated together, at the end, or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from es_pipe import sampling
from es_pipe.checks import is_int, is_positive_number
from es_pipe.errors import ConfigError, FeedbackError, ManifestError
from es_pipe.prune_hook import PrunedHook
from es_pipe.pruning import Pruning, from_state
from es_pipe.sampling import Phase, Policy, Schedule, Span
from es_pipe.scores import ScoreStore, ShardCodes, damaged, is_count
from es_pipe.sources.shards import resolve_rank

if TYPE_CHECKING:
    from es_pipe.boundary import EpochBoundary
    from es_pipe.manifests import Manifests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """Who the members of a meta-batch are: shards plus ordinals (or keys)."""

    shards: ShardCodes
    keys: Sequence[str]
    ordinals: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        shards: Sequence[str],
        keys: Sequence[str],
        ordinals: Sequence[int] | np.ndarray | None = None,
    ) -> Identity:
        as_array = None if ordinals is None else np.asarray(ordinals, dtype=np.int64)
        return cls(ShardCodes.encode(shards), keys, as_array)

    def take(self, picked: np.ndarray) -> Identity:
        return Identity(
            self.shards.take(picked),
            [self.keys[i] for i in picked.tolist()],
            None if self.ordinals is None else self.ordinals[picked],
        )

    @classmethod
    def concat(cls, parts: Sequence[Identity]) -> Identity:
        if len(parts) == 1:
            return parts[0]
        ordinals = [part.ordinals for part in parts if part.ordinals is not None]
        return cls(
            ShardCodes.concat([part.shards for part in parts]),
            [key for part in parts for key in part.keys],
            np.concatenate(ordinals) if len(ordinals) == len(parts) else None,
        )


@dataclass(frozen=True)
class Selection:
    """Members of a meta-batch chosen for training, with optional importance weights."""

    indices: Tensor  # positions in the meta-batch, sorted, on the losses' device
    weights: Tensor | None  # Horvitz-Thompson weights, when the sampler reweights
    phase: Phase
    step: int


class Sampler:
    """Selects ``batch_size`` of every ``meta_batch_size`` samples under a policy.

    Args:
        policy: ``Evolved(beta1, beta2)`` (ES), ``Uniform()``, ``RandomSubset()``,
            ``LossProportional()`` or ``SelectiveBackprop(beta)``.
        meta_batch_size: ``B``, samples buffered and scored per step.
        batch_size: ``b``, samples trained per step (``b <= B``).
        burn_in: uniform selection at the start while scores form (int steps,
            ``Steps(n)`` or ``Epochs(n)``).
        anneal: uniform selection for the final part; needs ``total_steps`` or
            ``total_epochs``.
        replacement: draw with replacement (default: without, as the paper).
        reweight: return importance weights that make the sub-batch loss an unbiased
            estimate of the meta-batch loss (default off: ES means to emphasise).
        init: first score of an unseen sample: ``"loss"`` (its first loss, default) or
            ``"mean"`` (the meta-batch's mean loss). The paper's ``1/n`` needs ``n``.
        scoring: ``"forward"`` (losses of a gradient-free pass over the meta-batch, the
            paper) or ``"history"`` (select from stored scores, then update them from the
            training losses reported with ``SubBatch.report``: no extra forward pass).
            Under history scoring every sub-batch must be reported before the next
            meta-batch is asked for (``FeedbackError`` otherwise).
        seed: with the step counter, the whole RNG state.
        prune: set-level pruning at epoch boundaries, ``es_pipe.Pruning(ratio=0.3,
            anneal=0.125)`` (ESWP) or ``es_pipe.InfoBatch()``; pruned samples are skipped
            by the sources (their ``pruned=sampler.pruned`` hook) or by the stage. Pruning
            ranks by scores, which form from losses: a policy that needs no losses
            (``Uniform()``, ``RandomSubset()``, InfoBatch's setting) needs
            ``scoring="history"`` plus ``batch.report(losses)``; with the default
            ``scoring="forward"`` it is refused (``ConfigError``), since no loss would
            ever arrive and nothing would be pruned.
        manifests: a folder or fsspec URL (or an ``es_pipe.Manifests``) where every epoch's
            per-shard scores and pruning decisions are written as Parquet and committed;
            shards are restored from it the first time they show up.
        resume: with ``manifests`` that already hold committed epochs, continue after the
            newest (epoch and step from its commit) unless a checkpoint is loaded; ``False``
            starts over at epoch 0 (and replaces the old epochs as it commits). Only the
            same run is continued: the commits record a run identity (a fingerprint of the
            policy, B, b, scoring and pruning rule, plus ``run_id``), and epochs of another
            run raise ``ManifestError``, as does data that moved (no shard seen is in the
            committed manifests: pass ``manifests=es_pipe.Manifests(url, relocate=...)``).
            ``"force"`` adopts another run's epochs deliberately (with a warning).
        run_id: an optional name of this run, recorded in every commit and required to
            match when resuming (e.g. your experiment id).
        rank, world_size: who writes which manifests; rank 0 commits each epoch once every
            rank's files are there (default: torch.distributed, else RANK/WORLD_SIZE).
        on_mismatch: a manifest whose shard fingerprint differs from the shard:
            ``"raise"`` (``ManifestError``) or ``"fresh"`` (warn, start that shard over).
        commit_timeout: seconds rank 0 waits for the other ranks' manifests.
    """

    def __init__(
        self,
        policy: Policy,
        meta_batch_size: int,
        batch_size: int,
        *,
        burn_in: Span = 0,
        anneal: Span = 0,
        total_steps: int | None = None,
        total_epochs: float | None = None,
        replacement: bool = False,
        reweight: bool = False,
        init: Literal["loss", "mean"] = "loss",
        scoring: Literal["forward", "history"] = "forward",
        seed: int = 0,
        prune: Pruning | None = None,
        manifests: Any = None,
        resume: bool | Literal["force"] = True,
        run_id: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        on_mismatch: Literal["raise", "fresh"] = "raise",
        commit_timeout: float = 300.0,
    ) -> None:
        for label, value in (("meta_batch_size", meta_batch_size), ("batch_size", batch_size)):
            if not is_int(value, at_least=1):
                raise ConfigError(f"{label}={value!r} must be a positive int")
        if batch_size > meta_batch_size:
            raise ConfigError(
                f"batch_size={batch_size} > meta_batch_size={meta_batch_size}: the stage "
                "selects b of B buffered samples; raise meta_batch_size or lower batch_size"
            )
        if init not in ("loss", "mean"):
            raise ConfigError(f"init={init!r}: use 'loss' or 'mean'")
        if scoring not in ("forward", "history"):
            raise ConfigError(f"scoring={scoring!r}: use 'forward' or 'history'")
        if not is_int(seed, at_least=0):
            raise ConfigError(f"seed={seed!r} must be a non-negative int")
        if not all(callable(getattr(policy, f, None)) for f in ("weigh", "score")):
            raise ConfigError(
                f"policy={policy!r} is not a selection policy: use es_pipe.Evolved(beta1, "
                "beta2), Uniform(), RandomSubset(), LossProportional() or SelectiveBackprop()"
            )
        for label, flag in (("replacement", replacement), ("reweight", reweight)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ConfigError(f"{label}={flag!r} must be True or False")
        if prune is not None and not isinstance(prune, Pruning):
            raise ConfigError(
                f"prune={prune!r}: give es_pipe.Pruning(ratio=..., anneal=...), "
                "es_pipe.InfoBatch() or None"
            )
        if prune is not None and scoring == "forward" and not policy.needs_losses:
            raise ConfigError(
                f"prune={prune!r} ranks samples by their scores, and with "
                f"scoring='forward' a {policy.name!r} policy never receives a loss "
                "(meta.needs_losses is False, so no scoring pass runs): nothing would ever "
                "be pruned. Pass scoring='history' and feed the training losses back with "
                "batch.report(losses) after each step (InfoBatch's way), or use a policy that "
                "scores with a forward pass, e.g. es_pipe.Evolved()"
            )
        if on_mismatch not in ("raise", "fresh"):
            raise ConfigError(f"on_mismatch={on_mismatch!r}: use 'raise' or 'fresh'")
        if resume not in (True, False, "force"):
            raise ConfigError(f"resume={resume!r}: use True, False or 'force'")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ConfigError(f"run_id={run_id!r} must be a non-empty string or None")
        self.run_id = run_id
        timeout = commit_timeout
        if not is_positive_number(timeout):
            raise ConfigError(f"commit_timeout={commit_timeout!r} must be a number of seconds > 0")
        self.policy = policy
        self.prune = prune
        self.meta_batch_size = meta_batch_size
        self.batch_size = batch_size
        self.schedule = Schedule(burn_in, anneal, total_steps, total_epochs)
        self.replacement = bool(replacement)
        self.reweight = bool(reweight)
        self.init = init
        self.scoring = scoring
        self.seed = seed
        self.store = ScoreStore()
        self.step = 0
        self.epoch = 0
        # a restored position's step while its score table is not loaded, and a loaded
        # score table (with its step, None if it names none) while its position is not
        self._position_step: int | None = None
        self._scores_waiting = False
        self._scores_step: int | None = None
        self._steps_in_epoch = 0
        self._steps_last_epoch = 0
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if prune is not None and manifests is None and self.world_size > 1:
            raise ConfigError(
                f"prune= on {self.world_size} ranks needs manifests=: a rank learns the "
                "pruning decisions of the shards it reads next epoch from the manifests the "
                "other ranks committed. Pass manifests='s3://bucket/run/manifests' (any "
                "folder every rank can reach)"
            )
        self.boundary: EpochBoundary | None = None
        if prune is not None or manifests is not None:
            self.boundary = self._make_boundary(
                prune, manifests, on_mismatch, commit_timeout, total_epochs
            )
            if self.boundary.manifests is not None:
                self._begin_run(self.boundary, self.boundary.manifests, prune, resume)

    def _make_boundary(
        self,
        prune: Pruning | None,
        manifests: Any,
        on_mismatch: Literal["raise", "fresh"],
        timeout: float,
        total: float | None,
    ) -> EpochBoundary:
        from es_pipe.boundary import EpochBoundary
        from es_pipe.manifests import Manifests

        if manifests is not None and not isinstance(manifests, Manifests):
            manifests = Manifests(manifests, rank=self.rank)
        elif manifests is not None and manifests.rank != self.rank:
            raise ConfigError(
                f"manifests={manifests!r} was made for rank {manifests.rank}, but this sampler "
                f"is rank {self.rank}: two ranks would write the same files. Pass "
                f"es_pipe.Manifests(url, rank={self.rank}, storage_options=...), or the URL"
            )
        return EpochBoundary(
            self.store,
            prune=prune,
            manifests=manifests,
            seed=self.seed,
            hyper=self.hyper(),
            total_epochs=total,
            world_size=self.world_size,
            on_mismatch=on_mismatch,
            commit_timeout=timeout,
        )

    def identity(self, prune: Pruning | None = None) -> dict[str, Any]:
        """This run's identity, recorded in every commit and checked when resuming: the
        user's ``run_id`` and a fingerprint of the hyper-parameters that change what the
        scores and pruning decisions mean (not the seed or the training length)."""
        from dataclasses import asdict, is_dataclass

        from es_pipe.manifests import run_fingerprint

        policy: dict[str, Any] = asdict(self.policy) if is_dataclass(self.policy) else {}
        meaning = {
            "policy": {"name": self.policy.name, **policy},
            "meta_batch_size": self.meta_batch_size,
            "batch_size": self.batch_size,
            "scoring": self.scoring,
            "replacement": self.replacement,
            "reweight": self.reweight,
            "init": self.init,
            "prune": None if prune is None else prune.describe(),
        }
        return {"run_id": self.run_id, "fingerprint": run_fingerprint(meaning)}

    def _begin_run(
        self,
        boundary: EpochBoundary,
        manifests: Manifests,
        prune: Pruning | None,
        resume: bool | str,
    ) -> None:
        """Claim the manifests folder and, when resuming, continue after its newest commit
        if it is this run's (see ``resume``)."""
        identity = self.identity(prune)
        boundary.run = identity
        latest = manifests.begin(world_size=self.world_size, identity=identity, resume=resume)
        if latest is None:
            return
        step = manifests.marker(latest).get("hyper", {}).get("step")
        if step is not None and not is_int(step, at_least=0, below=2**31 - 1):
            raise ManifestError(
                f"the commit marker of epoch {latest} under {manifests.url} records step "
                f"{step!r}, not a step count; restore the marker or start with resume=False"
            )
        self.epoch = boundary.epoch = latest + 1
        self.step = int(step) if step is not None else self.step
        boundary.expect_known = resume != "force"
        log.info(
            "resuming from the manifests under %s: epoch %d committed, continuing at epoch %d, "
            "step %d",
            manifests.url,
            latest,
            self.epoch,
            self.step,
        )

    def hyper(self) -> dict[str, Any]:
        """The hyper-parameters, JSON-friendly (recorded in manifests)."""
        from dataclasses import asdict, is_dataclass

        policy: dict[str, Any] = asdict(self.policy) if is_dataclass(self.policy) else {}
        prune = self.prune
        return {
            "policy": {"name": self.policy.name, **policy},
            "meta_batch_size": self.meta_batch_size,
            "batch_size": self.batch_size,
            "replacement": self.replacement,
            "reweight": self.reweight,
            "init": self.init,
            "scoring": self.scoring,
            "seed": self.seed,
            "total_epochs": self.schedule.total_epochs,
            "total_steps": self.schedule.total_steps,
            "prune": None if prune is None else prune.describe(),
        }

    # ------------------------------------------------------------------ planning

    def sub_batch_size(self, n: int) -> int:
        """``b`` for a meta-batch of ``n`` members: a short final meta-batch gets its pro
        rata share, rounded, at least one."""
        if n >= self.meta_batch_size:
            return self.batch_size
        return max(1, min(n, round(self.batch_size * n / self.meta_batch_size)))

    @property
    def phase(self) -> Phase:
        """Phase of the next step: ``burn_in``, ``evolve`` or ``anneal``."""
        fraction = self._steps_in_epoch / self._steps_last_epoch if self._steps_last_epoch else 0.0
        return self.schedule.phase(self.step, self.epoch + min(fraction, 1.0))

    @property
    def needs_losses(self) -> bool:
        """Whether ``select`` of the next meta-batch needs its losses."""
        forward = self.scoring == "forward" and self.policy.needs_losses
        return forward and self.phase != "anneal"

    # ------------------------------------------------------------------ selection

    def select(self, who: Identity, losses: Any | None, n: int) -> Selection:
        """Choose members of a meta-batch of ``n`` from their losses, then record scores."""
        if self._position_step is not None:
            raise ConfigError(
                f"the loader was restored to step {self._position_step}, but this sampler's "
                "score table was not: without it the run would go on from an empty table. "
                "Save sampler.state_dict() with loader.state_dict() and restore both "
                "(sampler.load_state_dict(saved) before or after loader.load_state_dict)"
            )
        phase, k = self.phase, self.sub_batch_size(n)
        if losses is None and self.needs_losses:
            raise FeedbackError(
                f"this meta-batch needs its losses ({self.policy.name}, phase {phase}): "
                "call select(losses) with one loss per member, e.g. "
                "loss_fn(model(x), y, reduction='none') under torch.no_grad()"
            )
        loss = None if losses is None else check_losses(losses, n, self.policy.nonnegative)
        if self.boundary is not None:
            self.boundary.admit(who.shards, who.keys, who.ordinals)
        slots, prior = self._prior(who, loss)
        device = prior.device

        weights = self.policy.weigh(prior, loss) if phase == "evolve" else None
        seed = sampling.step_seed(self.seed, self.step, self.rank)
        generator = torch.Generator(device).manual_seed(seed)
        picked = sampling.draw(weights, k, generator, replacement=self.replacement, n=n)
        importance = None
        if self.reweight:
            pi = sampling.inclusion_probabilities(weights, k, n, self.replacement).to(device)
            importance = sampling.importance_weights(pi, picked, k, n)
        if self.boundary is not None:  # ESWP: 1/keep weights of kept low-score samples
            positions = picked.cpu().numpy()
            ordinals = None if who.ordinals is None else who.ordinals[positions]
            keep = self.boundary.weights(who.shards.take(positions), ordinals)
            if keep is not None:
                rescale = torch.from_numpy(keep).to(device)
                importance = rescale if importance is None else importance * rescale

        if loss is not None:
            score = self.policy.score(prior, loss)
            self.store.scatter(slots, _host(score), _host(loss), self.step)
        selection = Selection(picked, importance, phase, self.step)
        self.step += 1
        self._steps_in_epoch += 1
        return selection

    def observe(self, who: Identity, losses: Any, step: int) -> None:
        """Update scores from training losses of the samples selected at ``step``
        (history scoring)."""
        loss = check_losses(losses, len(who.keys), self.policy.nonnegative)
        slots, prior = self._prior(who, loss)
        self.store.scatter(slots, _host(self.policy.score(prior, loss)), _host(loss), step)

    def _prior(self, who: Identity, loss: Tensor | None) -> tuple[np.ndarray, Tensor]:
        """Store slots and ``s(t-1)`` of ``who``, on the losses' device. Unseen samples
        start from ``initial_prior``; without losses, from the mean of the seen ones."""
        slots = self.store.locate(who.shards, who.keys, who.ordinals)
        state = self.store.gather(slots, ("score", "visits"))
        device = torch.device("cpu") if loss is None else loss.device
        prior = torch.from_numpy(state["score"]).to(device)
        seen = torch.from_numpy(state["visits"] > 0).to(device)
        if loss is not None:
            return slots, torch.where(seen, prior, sampling.initial_prior(loss, self.init))
        if bool(seen.any()):
            return slots, torch.where(seen, prior, prior[seen].mean())
        return slots, torch.ones(len(slots), device=device)

    def end_epoch(self) -> None:
        """Close the current epoch: the schedule's epoch clock advances; with ``prune`` /
        ``manifests``, the next epoch's pruning is decided and the epoch's manifests are
        written and committed."""
        ended = self.epoch
        self.epoch += 1
        self._steps_last_epoch, self._steps_in_epoch = self._steps_in_epoch, 0
        if self.boundary is not None:
            prune = self.boundary.prune
            active = (
                prune is not None
                and prune.active(self.epoch, self.schedule.total_epochs)
                and self.schedule.phase(self.step, self.epoch) == "evolve"
            )
            self.boundary.close_epoch(ended, active=active, rank=self.rank, step=self.step)

    @property
    def pruned(self) -> PrunedHook:
        """The hook for the sources, ``Source(..., pruned=sampler.pruned)``:
        ``sampler.pruned(shard, epoch=None)`` gives the sorted int64 ordinals of ``shard``
        to skip in ``epoch`` (default: the current one), or ``None``."""
        return PrunedHook(self.boundary)

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict[str, Any]:
        """Position and RNG state: small and JSON-friendly; it rides in the loader's state.
        Its other half is ``state_dict()`` (the scores), saved at the same step: each
        names its step, and restoring one without the other, or halves of two steps,
        raises ``ConfigError``."""
        return {
            "kind": POSITION_KIND,
            "version": STATE_VERSION,
            "seed": self.seed,
            "step": self.step,
            "epoch": self.epoch,
            "steps_in_epoch": self._steps_in_epoch,
            "steps_last_epoch": self._steps_last_epoch,
            "world_size": self.world_size,
        }

    def check_state(self, state: Any) -> None:
        """Raise ``ConfigError`` unless ``state`` is a position ``load_state`` accepts
        (also one without ``version``, as es_pipe wrote them before it had one)."""
        check_header(state, POSITION_KIND, "position", "the loader's state_dict()")
        for name in POSITION_FIELDS:
            value = state.get(name)
            if not is_int(value, at_least=0):
                raise ConfigError(
                    f"the sampler position in this checkpoint has {name}={value!r}, not a "
                    "non-negative int: the checkpoint is damaged. Restore another checkpoint, "
                    "or start the epoch over from manifests= without a loader checkpoint"
                )
        world = state.get("world_size", 1)
        if not is_int(world, at_least=1):
            raise ConfigError(
                f"the sampler position in this checkpoint has world_size={world!r}, not a "
                "positive int: the checkpoint is damaged; restore another one"
            )
        if not isinstance(state.get("merged", False), bool):
            raise ConfigError(
                f"the sampler position's 'merged' is {state['merged']!r}, not True or False: "
                "the checkpoint is damaged; merge the old ranks' checkpoints again"
            )
        if state["seed"] != self.seed:
            raise ConfigError(
                f"checkpoint was taken with seed={state['seed']}, this sampler has "
                f"seed={self.seed}: construct the sampler with the checkpoint's seed"
            )
        merged = bool(state.get("merged"))
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size and not merged:
            raise ConfigError(
                f"this checkpoint is one rank's of {saved_world}, and it is restored on "
                f"{self.world_size} ranks: merge the checkpoints of all {saved_world} old "
                "ranks with es_pipe.merge_checkpoints(...) (and their score tables with "
                "es_pipe.merge_scores(...)) and restore the merged ones on every new rank"
            )

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore ``get_state()``'s position: this rank's own, or, on another number of
        ranks, the state merged from all old ranks by ``es_pipe.merge_checkpoints``.
        A damaged state raises ``ConfigError`` and changes nothing."""
        self.check_state(state)
        self._pair_step(position=state["step"], scores=self._scores_step)  # before changes
        merged = bool(state.get("merged"))
        self.step, self.epoch = state["step"], state["epoch"]
        self._steps_in_epoch = state["steps_in_epoch"]
        self._steps_last_epoch = state["steps_last_epoch"]
        log.debug("sampler restored to epoch %d, step %d", self.epoch, self.step)
        if self.boundary is not None:  # also at the same epoch: see EpochBoundary.rewind
            self.boundary.rewind(self.epoch, merged=merged)
        if not self._scores_waiting and state["step"] > 0:
            self._position_step = state["step"]  # select() refuses until the scores come
        self._scores_waiting, self._scores_step = False, None

    def _pair_step(self, *, position: int | None, scores: int | None) -> None:
        """Refuse the two halves of a checkpoint when they were saved at different steps."""
        if position is None or scores is None or position == scores:
            return
        raise ConfigError(
            f"the sampler's score table is from step {scores} but the loader position is "
            f"from step {position}: they are halves of two checkpoints. Restore the "
            "sampler.state_dict() and loader.state_dict() saved together (at the same step)"
        )

    def state_dict(self) -> dict[str, Any]:
        """The score table, as tensors (like an optimizer's moments): save it with the
        model; ``torch.load(..., weights_only=True)`` reads it back. With ``prune=`` or
        ``manifests=`` it also holds what a checkpoint inside an epoch needs to resume
        exactly: the keys read so far (for the epoch's manifests) or, without manifests,
        the epoch's pruning decisions."""
        state: dict[str, Any] = {
            "kind": SCORES_KIND,
            "version": STATE_VERSION,
            "step": self.step,
            "scores": self.store.state_dict(),
        }
        if self.boundary is not None and self.boundary.manifests is not None:
            state["keys"] = self.boundary.key_state()  # for this epoch's manifests
        elif self.boundary is not None:  # this epoch's pruning: no manifest holds it
            state["pruning"] = {
                "epoch": self.boundary.epoch,
                "shards": {
                    name: {"state": torch.from_numpy(d.state.copy()), "factor": d.factor}
                    for name, d in self.boundary.decisions.items()
                },
            }
        if self.boundary is not None:  # the shards this epoch's boundary decides (writes)
            state["read"] = self.boundary.read_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s score table (also one without ``version``, as es_pipe
        wrote them before it had one). A damaged table (NaN scores, negative visits,
        columns of different lengths, ...) raises ``ConfigError`` and changes nothing."""
        check_header(state, SCORES_KIND, "score table", "sampler.state_dict()")
        if "scores" not in state:
            raise _damaged(f"it has no 'scores' entry (its entries: {[str(k) for k in state][:8]})")
        keys, pruning, read = state.get("keys", {}), state.get("pruning"), state.get("read")
        _check_key_book(keys)
        if read is not None and (
            not isinstance(read, (list, tuple)) or not all(isinstance(n, str) for n in read)
        ):
            raise _damaged("its 'read' entry is not a list of shard names")
        decisions = None if pruning is None else _pruning_decisions(pruning)
        step = state.get("step")  # absent in states up to version 1 without it, and merged
        if step is not None and not is_int(step, at_least=0):
            raise _damaged(f"its 'step' is {step!r}, not a non-negative int")
        self._pair_step(position=self._position_step, scores=step)
        self.store.load_state_dict(state["scores"])  # checks the table, then loads it
        self._scores_waiting = self._position_step is None
        self._scores_step = step if self._scores_waiting else None
        self._position_step = None
        if self.boundary is not None:
            self.boundary.rewind(self.epoch)
            self.boundary.load_key_state(keys)
            self.boundary.load_read(read)
        if self.boundary is not None and decisions is not None:
            self.boundary.epoch = int(state["pruning"]["epoch"])
            self.boundary.decisions = decisions


STATE_VERSION = 1
POSITION_KIND = "es_pipe.sampler.position"  # Sampler.get_state(), inside the loader's state
SCORES_KIND = "es_pipe.sampler.scores"  # Sampler.state_dict()
POSITION_FIELDS = ("seed", "step", "epoch", "steps_in_epoch", "steps_last_epoch")


def check_header(state: Any, kind: str, what: str, source: str) -> None:
    """``kind`` and ``version`` of a sampler state; a state without them (es_pipe up to
    3d23362 wrote none) is read as version 1."""
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"the sampler {what} to restore is a {type(state).__name__}, not a dict: pass "
            f"what {source} returned"
        )
    if state.get("kind", kind) != kind:
        raise ConfigError(
            f"this is a {state.get('kind')!r} state, not the sampler {what} ({kind!r}): pass "
            f"what {source} returned"
        )
    version = state.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > 1
        raise ConfigError(
            f"the sampler {what} has version {version!r}; this es_pipe reads version "
            f"{STATE_VERSION} (and states without a version). "
            + (
                "It was written by a newer es_pipe: upgrade es_pipe to restore it"
                if newer
                else "The checkpoint is damaged: restore another one"
            )
        )


def _damaged(what: str) -> ConfigError:
    return damaged(what, "the sampler's score table (sampler.state_dict())")


def _check_key_book(keys: Any) -> None:
    if not isinstance(keys, Mapping) or not all(
        isinstance(name, str)
        and isinstance(book, (list, tuple))
        and all(k is None or isinstance(k, str) for k in book)
        for name, book in keys.items()
    ):
        raise _damaged("its 'keys' entry is not a map from shard names to lists of keys")


def _pruning_decisions(pruning: Any) -> dict[str, Any]:
    """The pruning decisions of a checkpoint without manifests, checked."""
    entries = pruning.get("shards") if isinstance(pruning, Mapping) else None
    if not isinstance(pruning, Mapping) or not is_count(pruning.get("epoch")):
        raise _damaged("its 'pruning' entry has no epoch")
    if not isinstance(entries, Mapping):
        raise _damaged("its 'pruning' entry has no decisions per shard")
    decisions = {}
    for name, entry in entries.items():
        state = entry.get("state") if isinstance(entry, Mapping) else None
        factor = entry.get("factor") if isinstance(entry, Mapping) else None
        if (
            not isinstance(state, Tensor)
            or state.dim() != 1
            or state.is_floating_point()
            or (state.numel() and not 0 <= int(state.min()) <= int(state.max()) <= 255)
        ):
            raise _damaged(f"the pruning state of shard {name!r} is not a 1-D uint8 tensor")
        if not is_positive_number(factor):
            raise _damaged(f"the pruning factor of shard {name!r} is {factor!r}")
        decisions[name] = from_state(state.numpy(), float(factor))
    return decisions


class EvolvedSampler(Sampler):
    """ES with the paper's decoupled EMA: ``Sampler(Evolved(beta1, beta2), ...)``."""

    def __init__(
        self,
        meta_batch_size: int,
        batch_size: int,
        *,
        beta1: float = 0.2,
        beta2: float = 0.8,
        **options: Any,
    ) -> None:
        super().__init__(
            sampling.Evolved(beta1, beta2),
            meta_batch_size=meta_batch_size,
            batch_size=batch_size,
            **options,
        )

    @classmethod
    def recommended(
        cls,
        batch_size: int,
        *,
        total_epochs: int,
        prune_ratio: float = 0.8,
        max_streak: int | None = 3,
        anneal: float = 0.1,
        **options: Any,
    ) -> EvolvedSampler:
        """The configuration the long benchmark recommends (``es-prune-s3@0.8`` there).

        Every optimizer step is kept (``meta_batch_size == batch_size``); ES's scores,
        formed from the training forward's own losses (``scoring="history"``, no extra
        pass), prune ``prune_ratio`` of each shard's below-mean samples at every epoch
        boundary, with a sample pruned at most ``max_streak`` epochs in a row, kept ones
        weighted by 1/keep, and no pruning in the last ``anneal`` of training. Report the
        training losses with ``batch.report(losses)`` and multiply by ``batch.weights``.

        Measured (``make bench-long``, 3 seeds, CPU time vs full uniform): Fashion-MNIST
        15 epochs, uniform's accuracy within 1 std in 0.63x, above the uniform budget curve;
        byte-level LM 8 epochs, 0.73x but 0.15 nats worse, below the curve; 40% label
        noise, 0.848 vs uniform's 0.787, but under a random half-subset's 0.856. See
        ``benchmarks/README.md``.
        """
        prune = Pruning(ratio=prune_ratio, anneal=anneal, max_streak=max_streak)
        options = {"scoring": "history", "prune": prune, **options}
        return cls(batch_size, batch_size, total_epochs=total_epochs, **options)


def check_losses(losses: Any, n: int, nonnegative: bool) -> Tensor:
    """Losses as a 1-D float tensor of length ``n``, or a ``FeedbackError`` that says why
    not. One host sync, for the finiteness check."""
    if isinstance(losses, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(losses)
            if array.dtype.kind not in "fiub":  # strings, objects (None), complex
                raise TypeError(f"dtype {array.dtype}")
            losses = torch.as_tensor(array)
        except (TypeError, ValueError) as exc:  # ragged lists, None, strings
            raise FeedbackError(
                f"losses could not be read as a 1-D array of floats ({exc}); pass one float "
                "loss per member, e.g. loss_fn(logits, y, reduction='none')"
            ) from None
    if not isinstance(losses, Tensor):
        raise FeedbackError(
            f"losses must be a tensor, array or list of floats, got {type(losses).__name__}"
        )
    if losses.layout != torch.strided or losses.device.type == "meta":
        raise FeedbackError(
            f"losses are a {losses.layout} tensor on {losses.device}; pass a dense tensor "
            "with values (losses.to_dense(), or compute them on a real device)"
        )
    if not losses.is_floating_point():
        raise FeedbackError(
            f"losses have dtype {losses.dtype}; pass per-sample float losses, e.g. "
            "loss_fn(logits, y, reduction='none')"
        )
    if losses.dtype not in _CHECKED_DTYPES:  # float8 formats: no isfinite/abs kernels
        try:
            losses = losses.to(torch.float32)  # exact: every float8 value is a float32
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            raise FeedbackError(
                f"losses have dtype {losses.dtype}, which could not be converted to float32 "
                f"({type(exc).__name__}: {exc}); pass float32, float16, bfloat16 or float64 "
                "losses (losses.float())"
            ) from None
    if losses.dim() != 1 or losses.numel() != n:
        raise FeedbackError(
            f"got losses of shape {tuple(losses.shape)} for a meta-batch of {n}: pass one "
            "loss per member, in meta-batch order (reduction='none'; flatten per-token "
            "losses to per-sample means first)"
        )
    losses = losses.detach()
    big = torch.finfo(torch.float32).max  # scores are stored as float32
    bad = torch.stack(
        [(~torch.isfinite(losses)).sum(), (losses < 0).sum(), (losses.abs() > big).sum()]
    ).tolist()
    if bad[0]:
        raise FeedbackError(
            f"{bad[0]} of {n} losses are NaN or infinite; scores were left unchanged. "
            "Check the model for divergence or skip this step"
        )
    if bad[2]:
        raise FeedbackError(
            f"{bad[2]} of {n} losses exceed float32's range (|loss| > {big:.3g}), where scores "
            "are kept; scores were left unchanged. Check the model for divergence or scale "
            "the losses down"
        )
    if nonnegative and bad[1]:
        raise FeedbackError(
            f"{bad[1]} of {n} losses are negative; sampling proportional to the loss needs "
            "losses >= 0 (shift them, or use SelectiveBackprop, which uses ranks only)"
        )
    return losses


_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _host(values: Tensor) -> np.ndarray:
    return values.detach().to("cpu", torch.float32).numpy()
