"""The selector: a selection policy, its schedule, its score store and its RNG position.

Named ``Selector`` because it is no ``torch.utils.data.Sampler``; the module keeps its name.
The previous release's names, deprecated for one release: see :mod:`es_pipe.renamed`.

It turns one meta-batch's identities and losses into a selection, and is the only place
where scores change. Bad feedback raises before anything changes: scores, step counter and
RNG position are updated together, at the end, or not at all.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor

from es_pipe import sampling
from es_pipe.checks import is_int
from es_pipe.errors import ConfigError, FeedbackError
from es_pipe.eswp import ESWP, EpochCommit, Pruning
from es_pipe.eswp.plugin import check_options
from es_pipe.prune_hook import PrunedHook
from es_pipe.sampler_state import (  # noqa: F401  (re-exported: es_pipe.elastic, old imports)
    POSITION_KIND,
    SCORES_KIND,
    STATE_VERSION,
    SamplerState,
    check_header,
)
from es_pipe.sampling import Phase, Policy, Schedule, Span
from es_pipe.scores import ScoreStore, ShardCodes
from es_pipe.sources.world import resolve_rank

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


class _RunCounter:
    """A counter of the run (:attr:`Selector.step`, :attr:`Selector.epoch`), kept in the
    sampler's ``_<name>``. Reading it starts the run first (:meth:`Selector.start`), so that
    a resume from manifests is applied before anyone sees the counter; assigning sets it."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.attr = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}"

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _RunCounter: ...

    @overload
    def __get__(self, obj: Selector, owner: type | None = None) -> int: ...

    def __get__(self, obj: Selector | None, owner: type | None = None) -> _RunCounter | int:
        if obj is None:
            return self
        if not obj._started:
            obj.start()
        value: int = getattr(obj, self.attr)
        return value

    def __set__(self, obj: Selector, value: int) -> None:
        setattr(obj, self.attr, value)


@dataclass(frozen=True)
class Selection:
    """Members of a meta-batch chosen for training, with optional importance weights."""

    indices: Tensor  # positions in the meta-batch, sorted, on the losses' device
    weights: Tensor | None  # Horvitz-Thompson weights, when the sampler reweights
    phase: Phase
    step: int


class Selector:
    """Selects ``batch_size`` of every ``meta_batch_size`` samples under a policy.

    ``Selector(Evolved(beta1, beta2), B, b)`` is Evolved Sampling; the baselines take the
    same arguments with another policy; :meth:`recommended` is the configuration the long
    benchmark recommends.

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
        eswp: the optional ESWP part, ``es_pipe.ESWP(prune=es_pipe.Pruning(...),
            manifests=url, resume=True, ...)``: set-level pruning at epoch boundaries
            and the per-epoch score manifests (see :class:`es_pipe.ESWP`).
        rank, world_size: this rank, for the RNG stream and for who writes which
            manifests (default: torch.distributed, else RANK/WORLD_SIZE).

    Deprecated: ``prune=``, ``manifests=``, ``resume=``, ``run_id=``, ``on_mismatch=`` and
    ``commit_timeout=`` on the sampler still work for one release (``DeprecationWarning``):
    they build ``eswp=es_pipe.ESWP(...)`` with the same meaning.

    When the I/O happens: constructing does none. :meth:`start` (the stage's first
    ``reset()``, or the sampler's first use) claims the manifests folder and resumes.
    The epoch commit runs in :meth:`end_epoch`, which the stage calls where an epoch's
    ``for meta in loader`` ends; :attr:`last_commit` says what it did and how long it
    took.

    Scores change here (forward scoring, ``observe``) and, at restores from manifests, in
    the ESWP part. The checkpoint state is in :class:`~es_pipe.sampler_state.SamplerState`.

    Why over 250 lines: besides the selection (``select``, ``observe``, ``end_epoch``:
    about 120 lines) it is the public face users call, so it keeps one-line delegates to
    :class:`~es_pipe.sampler_state.SamplerState` (the checkpoint), the lazy run start and
    the deprecated names of one release (``boundary``, the ESWP keywords).
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
        eswp: ESWP | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **deprecated: Any,
    ) -> None:
        check_arguments(policy, meta_batch_size, batch_size, init, scoring, seed)
        for label, flag in (("replacement", replacement), ("reweight", reweight)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ConfigError(f"{label}={flag!r} must be True or False")
        eswp = legacy_eswp(eswp, deprecated)
        if eswp is not None and not isinstance(eswp, ESWP):
            raise ConfigError(
                f"eswp={eswp!r}: give es_pipe.ESWP(prune=es_pipe.Pruning(...), manifests=...) "
                "or None"
            )
        self.policy = policy
        self.meta_batch_size = meta_batch_size
        self.batch_size = batch_size
        self.schedule = Schedule(burn_in, anneal, total_steps, total_epochs)
        self.replacement = bool(replacement)
        self.reweight = bool(reweight)
        self.init = init
        self.scoring = scoring
        self.seed = seed
        self.store = ScoreStore()
        self._step = 0
        self._epoch = 0
        self._started = self._starting = False
        self._checkpoint = SamplerState(self)
        self._steps_in_epoch = 0
        self._steps_last_epoch = 0
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.eswp = eswp
        if eswp is not None:
            eswp.bind(self)

    @property
    def prune(self) -> Pruning | None:
        """The pruning rule of the ESWP part (``None`` without one)."""
        return None if self.eswp is None else self.eswp.prune

    @property
    def run_id(self) -> str | None:
        return None if self.eswp is None else self.eswp.run_id

    @property
    def boundary(self) -> ESWP | None:
        """Deprecated name of :attr:`eswp`."""
        warnings.warn(
            "sampler.boundary is deprecated: use sampler.eswp (the es_pipe.ESWP part)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.eswp

    @property
    def last_commit(self) -> EpochCommit | None:
        """What the last epoch end did on this rank (epoch, step, seconds, seconds waiting
        for the commit, manifests written, samples pruned next), or ``None`` before the
        first epoch end and without ESWP. See :class:`es_pipe.eswp.EpochCommit`."""
        return None if self.eswp is None else self.eswp.last_commit

    step = _RunCounter("Steps taken (selections made). Reading it starts the run (:meth:`start`).")
    epoch = _RunCounter(
        "The epoch being read. Reading it starts the run (:meth:`start`): after a resume "
        "from manifests it is the epoch after the newest commit."
    )

    def start(self) -> None:
        """Start the run, once: with ``eswp=`` and manifests, claim the folder (its lease,
        the run identity check) and, when resuming, continue at the epoch after the newest
        commit and the step it records. The stage calls it at its first ``reset()`` (the
        first ``iter(loader)``); the sampler's first use (a selection, a restore, its
        ``epoch``/``step``, a source's ``pruned=`` hook) calls it when nothing did before.
        A failed start (``ManifestError``: another run's folder, data that moved) changes
        nothing and raises again at the next use."""
        if self._started or self._starting:
            return
        self._starting = True
        try:
            resumed = None if self.eswp is None else self.eswp.start(self.identity())
            self._started = True
        finally:
            self._starting = False
        if resumed is None:
            return
        self._epoch = resumed.epoch + 1
        self._step = self._step if resumed.step is None else resumed.step
        log.info(
            "resuming from the manifests under %s: epoch %d committed, continuing at epoch %d, "
            "step %d",
            None if self.eswp is None or self.eswp.manifests is None else self.eswp.manifests.url,
            resumed.epoch,
            self._epoch,
            self._step,
        )

    def identity(self) -> dict[str, Any]:
        """This run's identity, recorded in every commit and checked when resuming: the
        user's ``run_id`` and a fingerprint of the hyper-parameters that change what the
        scores and pruning decisions mean (not the seed or the training length)."""
        from es_pipe.manifests import run_fingerprint

        hyper = self.hyper()
        meaning = {key: hyper[key] for key in IDENTITY_FIELDS}
        return {"run_id": self.run_id, "fingerprint": run_fingerprint(meaning)}

    def hyper(self) -> dict[str, Any]:
        """The hyper-parameters, JSON-friendly (recorded in manifests), the pruning rule
        included."""
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
        self.start()
        self._checkpoint.refuse_without_scores()
        phase, k = self.phase, self.sub_batch_size(n)
        if losses is None and self.needs_losses:
            raise FeedbackError(
                f"this meta-batch needs its losses ({self.policy.name}, phase {phase}): "
                "call select(losses) with one loss per member, e.g. "
                "loss_fn(model(x), y, reduction='none') under torch.no_grad()"
            )
        loss = None if losses is None else check_losses(losses, n, self.policy.nonnegative)
        if self.eswp is not None:
            self.eswp.admit(who.shards, who.keys, who.ordinals)
        slots, prior, visits = self._prior(who, loss)
        device = prior.device

        weights = self.policy.weigh(prior, loss) if phase == "evolve" else None
        seed = sampling.step_seed(self.seed, self.step, self.rank)
        generator = torch.Generator(device).manual_seed(seed)
        picked = sampling.draw(weights, k, generator, replacement=self.replacement, n=n)
        importance = None
        if self.reweight:
            pi = sampling.inclusion_probabilities(weights, k, n, self.replacement).to(device)
            importance = sampling.importance_weights(pi, picked, k, n)
        if self.eswp is not None:  # ESWP: 1/keep weights of kept low-score samples
            positions = picked.cpu().numpy()
            ordinals = None if who.ordinals is None else who.ordinals[positions]
            keep = self.eswp.weights(who.shards.take(positions), ordinals)
            if keep is not None:
                rescale = torch.from_numpy(keep).to(device)
                importance = rescale if importance is None else importance * rescale

        if loss is not None:
            score = self.policy.score(prior, loss)
            self.store.scatter(slots, _host(score), _host(loss), self.step, visits)
        selection = Selection(picked, importance, phase, self.step)
        self.step += 1
        self._steps_in_epoch += 1
        return selection

    def observe(self, who: Identity, losses: Any, step: int) -> None:
        """Update scores from training losses of the samples selected at ``step``
        (history scoring)."""
        loss = check_losses(losses, len(who.keys), self.policy.nonnegative)
        slots, prior, visits = self._prior(who, loss)
        score = _host(self.policy.score(prior, loss))
        self.store.scatter(slots, score, _host(loss), step, visits)

    def _prior(self, who: Identity, loss: Tensor | None) -> tuple[np.ndarray, Tensor, np.ndarray]:
        """Store slots, ``s(t-1)`` of ``who`` on the losses' device, and their visits (one
        gather of the store's rows). Unseen samples start from ``initial_prior``; without
        losses, from the mean of the seen ones."""
        slots = self.store.locate(who.shards, who.keys, who.ordinals)
        rows = self.store.rows(slots)
        visits = rows["visits"]
        device = torch.device("cpu") if loss is None else loss.device
        cpu_loss = loss is not None and device.type == "cpu" and loss.dtype == torch.float32
        if cpu_loss and self.init == "loss":  # the same choice as below, in one numpy pass
            first = np.where(visits > 0, rows["score"], loss.numpy())  # type: ignore[union-attr]
            return slots, torch.from_numpy(first), visits
        prior = torch.from_numpy(rows["score"]).to(device)
        seen = torch.from_numpy(visits > 0).to(device)
        if loss is not None:
            prior = torch.where(seen, prior, sampling.initial_prior(loss, self.init))
        elif bool(seen.any()):
            prior = torch.where(seen, prior, prior[seen].mean())
        else:
            prior = torch.ones(len(slots), device=device)
        return slots, prior, visits

    def end_epoch(self) -> None:
        """Close the current epoch: the schedule's epoch clock advances; with ``eswp=``,
        the next epoch's pruning is decided and the epoch's manifests are written and
        committed, after waiting up to ``commit_timeout`` for the other ranks.

        The stage calls it in the last ``next()`` of an epoch, so the work shows up where
        the trainer's ``for meta in loader`` ends, before the loop exits;
        :attr:`last_commit` holds its figures (also logged at INFO). It stays there, not
        in the next ``reset()``, so that a checkpoint saved after the loop names a
        committed epoch: a run killed after the loop resumes from the manifests alone."""
        ended = self.epoch
        self.epoch += 1
        self._steps_last_epoch, self._steps_in_epoch = self._steps_in_epoch, 0
        if self.eswp is not None:
            prune = self.eswp.prune
            active = (
                prune is not None
                and prune.active(self.epoch, self.schedule.total_epochs)
                and self.schedule.phase(self.step, self.epoch) == "evolve"
            )
            self.eswp.close_epoch(ended, active=active, rank=self.rank, step=self.step)
        self.store.compact()  # 16 bytes per sample held, with or without manifests

    @property
    def pruned(self) -> PrunedHook:
        """The hook for the sources, ``Source(..., pruned=sampler.pruned)``:
        ``sampler.pruned(shard, epoch=None)`` gives the sorted int64 ordinals of ``shard``
        to skip in ``epoch`` (default: the current one), or ``None``."""
        return PrunedHook(self.eswp)

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict[str, Any]:
        """Position and RNG state, small and JSON-friendly, in the loader's state; one
        checkpoint with ``state_dict()`` (see :mod:`es_pipe.sampler_state`)."""
        return self._checkpoint.get_state()

    def check_state(self, state: Any) -> None:
        """Raise ``ConfigError`` unless ``load_state`` accepts ``state``."""
        self._checkpoint.check_state(state)

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore ``get_state()``'s position (or ``es_pipe.merge_checkpoints``'s); a
        damaged state raises ``ConfigError`` and changes nothing."""
        self._checkpoint.load_state(state)

    def state_dict(self) -> dict[str, Any]:
        """The score table, as tensors (like an optimizer's moments): save it with the
        model; ``torch.load(..., weights_only=True)`` reads it back. With ``eswp=`` it also
        holds what a checkpoint inside an epoch needs to resume exactly: the keys read so
        far (for the epoch's manifests) or, without manifests, the epoch's pruning
        decisions."""
        return self._checkpoint.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s score table; a damaged table (NaN scores, negative
        visits, ...) raises ``ConfigError`` and changes nothing."""
        self._checkpoint.load_state_dict(state)

    @classmethod
    def recommended(
        cls,
        batch_size: int,
        *,
        total_epochs: int,
        prune_ratio: float = 0.8,
        max_streak: int | None = 3,
        anneal: float = 0.1,
        beta1: float = 0.2,
        beta2: float = 0.8,
        **options: Any,
    ) -> Selector:
        """The configuration the long benchmark recommends (``es-prune-s3@0.8`` there):
        ES, ``Evolved(beta1, beta2)``, plus ESWP.

        Every optimizer step is kept (``meta_batch_size == batch_size``); ES's scores,
        formed from the training forward's own losses (``scoring="history"``, no extra
        pass), prune ``prune_ratio`` of each shard's below-mean samples at every epoch
        boundary, with a sample pruned at most ``max_streak`` epochs in a row, kept ones
        weighted by 1/keep, and no pruning in the last ``anneal`` of training: an
        ``es_pipe.ESWP`` built from these and ``manifests=``, ``resume=``, ``run_id=``,
        ``on_mismatch=``, ``commit_timeout=`` when given. Report the
        training losses with ``batch.report(losses)`` and multiply by ``batch.weights``.

        Measured (``make bench-long``, 3 seeds, CPU time vs full uniform): Fashion-MNIST
        15 epochs, uniform's accuracy within 1 std in 0.63x, above the uniform budget curve;
        byte-level LM 8 epochs, 0.73x but 0.15 nats worse, below the curve; 40% label
        noise, 0.848 vs uniform's 0.787, but under a random half-subset's 0.856. See
        ``benchmarks/README.md``.
        """
        if "eswp" in options or "prune" in options:
            raise ConfigError(
                "Selector.recommended() builds its own es_pipe.ESWP from prune_ratio=, "
                "max_streak= and anneal=; pass manifests=, resume=, run_id=, on_mismatch= or "
                "commit_timeout= to it, or build Selector(Evolved(), B, b, eswp=ESWP(...))"
            )
        eswp_options = {k: options.pop(k) for k in ESWP_OPTIONS if k in options}
        prune = Pruning(ratio=prune_ratio, anneal=anneal, max_streak=max_streak)
        eswp = ESWP(prune=prune, **eswp_options)
        options = {"scoring": "history", **options}
        return Selector(
            sampling.Evolved(beta1, beta2),
            batch_size,
            batch_size,
            total_epochs=total_epochs,
            eswp=eswp,
            **options,
        )


ESWP_OPTIONS = ("manifests", "resume", "run_id", "on_mismatch", "commit_timeout")
# what makes a run's scores and pruning decisions mean what they mean (its identity)
IDENTITY_FIELDS = (
    "policy",
    "meta_batch_size",
    "batch_size",
    "scoring",
    "replacement",
    "reweight",
    "init",
    "prune",
)


def check_arguments(
    policy: Any, meta_batch_size: Any, batch_size: Any, init: Any, scoring: Any, seed: Any
) -> None:
    """``ConfigError`` naming the first of a sampler's arguments that is not valid."""
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


def legacy_eswp(eswp: ESWP | None, options: dict[str, Any]) -> ESWP | None:
    """The ESWP part of a selector built the deprecated way, ``Selector(..., prune=...,
    manifests=..., resume=..., run_id=..., on_mismatch=..., commit_timeout=...)``: the
    same ``ESWP`` (with a ``DeprecationWarning``), or ``None`` without prune and
    manifests."""
    if not options:
        return eswp
    unknown = sorted(set(options) - {"prune", *ESWP_OPTIONS})
    if unknown:
        raise TypeError(f"Selector() got an unexpected keyword argument {unknown[0]!r}")
    if eswp is not None:
        raise ConfigError(
            f"eswp= and {', '.join(f'{k}=' for k in options)} were both given: pass the "
            "ESWP options inside es_pipe.ESWP(...) only"
        )
    warnings.warn(
        f"the sampler's {', '.join(f'{k}=' for k in options)}: deprecated, to be removed "
        "in the next release. Pass eswp=es_pipe.ESWP(prune=..., manifests=..., "
        "resume=..., run_id=..., on_mismatch=..., commit_timeout=...)",
        DeprecationWarning,
        stacklevel=4,
    )
    settings: dict[str, Any] = {
        "resume": True,
        "run_id": None,
        "on_mismatch": "raise",
        "commit_timeout": 300.0,
    }
    settings.update({k: v for k, v in options.items() if k in settings})
    prune, manifests = options.get("prune"), options.get("manifests")
    check_options(prune=prune, **settings)
    if prune is None and manifests is None:
        return None
    return ESWP(prune=prune, manifests=manifests, **settings)


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
    if n:  # the usual case, in one pass and one sync: the extremes say all is well
        extremes = torch.aminmax(losses)
        if losses.device.type == "cpu":
            low, high = extremes[0].item(), extremes[1].item()
        else:
            low, high = torch.stack(extremes).tolist()
        if -big <= low and high <= big and (low >= 0 or not nonnegative):
            return losses  # (NaN fails every comparison, infinities the range)
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


def __getattr__(name: str) -> Any:
    """The deprecated names of one release, ``Sampler`` and ``EvolvedSampler``
    (:mod:`es_pipe.renamed`)."""
    if name not in ("Sampler", "EvolvedSampler"):  # the deprecated names
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from es_pipe.renamed import old_name

    return old_name(__name__, name)
