"""ESWP: set-level pruning at epoch boundaries, as pure vectorised numpy. No I/O.

At the end of an epoch, for each shard, from the historical scores of its samples
(arXiv 2509.23461, "ESWP"; the rule is InfoBatch's, Qin et al., ICLR'24):

1. *candidates* are the samples that have a score (seen at least once), whose score is
   below the shard's mean score, and that may be pruned again (see "dead-lock" below);
2. ``k = round(ratio * len(candidates))`` of them, drawn uniformly at random without
   replacement, are pruned: the sources skip them for the next epoch (no decode, no
   forward, no backward);
3. with ``rescale``, the kept candidates get loss weight ``n / (n - k)`` (about
   ``1 / (1 - ratio)``) for the next epoch, so the expected gradient over the
   candidates is unchanged (unbiased).

**Threshold per shard.** The mean is taken over the shard, not the whole dataset: no
rank all-gathers the score table, and the decision for a shard depends only on that
shard, ``seed`` and ``epoch``, so every rank decides the same for the same shard, on any
topology. Shards are thousands of samples drawn from one distribution, so the shard
mean estimates the dataset mean well; for shards sorted by difficulty it does not.

**The dead-lock fix.** A pruned sample is not forward-passed, so its score cannot move:
pruned on a low score, it could stay pruned forever. es_pipe bounds it: a sample that has
been pruned ``max_streak`` epochs in a row is not a candidate at the next boundary, so it
is read, trained if selected and re-scored (forward scoring re-scores every member of a
meta-batch). With the default ``max_streak=1`` a sample is pruned for one epoch at a time
and every sample is read at least every other epoch; in general every sample returns
within ``max_streak + 1`` epochs. ``max_streak=None`` (InfoBatch) gives no bound: a sample
stays out ``j`` epochs in a row with probability about ``ratio ** j``.

**Schedule.** No pruning in an epoch that starts in the sampler's burn-in or annealing
phase, in the first ``burn_in`` epochs (epoch 0 has no scores to prune from), or in the
final ``anneal`` part of ``total_epochs`` (a fraction, or ``Epochs(n)``).

The per-sample pruning state is one byte (``uint8``): the number of epochs in a row the
sample has been pruned (``streak``, low 7 bits) and whether it is an up-weighted kept
candidate (bit 7).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import numpy as np

from es_pipe.checks import is_int, is_real
from es_pipe.errors import ConfigError
from es_pipe.sampling import Epochs

UPWEIGHT = np.uint8(0x80)
STREAK = np.uint8(0x7F)


@dataclass(frozen=True)
class Pruning:
    """Set-level pruning (ESWP) at every epoch boundary.

    Args:
        ratio: fraction of the below-mean candidates pruned for the next epoch.
        anneal: final part of training without pruning: a fraction of ``total_epochs``
            (``0.125`` = the last eighth) or ``es_pipe.Epochs(n)``. Needs the sampler's
            ``total_epochs`` when > 0.
        burn_in: epochs at the start without pruning (at least 1: epoch 0 has no scores).
        rescale: weight the kept candidates by ``n / (n - k)`` (about ``1/(1-ratio)``)
            in ``SubBatch.weights``, for an unbiased gradient.
        max_streak: a sample pruned this many epochs in a row is read again at the next
            epoch (the dead-lock fix); ``None``: no bound (InfoBatch).
        score: history column the rule ranks by: ``"score"`` (the ES score, an EMA of
            the loss: ESWP) or ``"loss"`` (the last loss: InfoBatch).
        draw: ``"exact"`` prunes exactly ``round(ratio * n)`` candidates; ``"bernoulli"``
            prunes each with probability ``ratio`` (InfoBatch).
    """

    ratio: float = 0.3
    anneal: float | Epochs = 0.125
    burn_in: int = 1
    rescale: bool = True
    max_streak: int | None = 1
    score: Literal["score", "loss"] = "score"
    draw: Literal["exact", "bernoulli"] = "exact"
    name: str = "eswp"

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0):
            raise ConfigError(f"Pruning ratio={self.ratio!r} must be in [0, 1), e.g. 0.3")
        anneal = self.anneal
        if isinstance(anneal, Epochs):
            if not (is_real(anneal.n) and math.isfinite(anneal.n) and anneal.n >= 0):
                raise ConfigError(f"Pruning anneal={anneal!r} must be a non-negative length")
        elif not (isinstance(anneal, (int, float)) and 0.0 <= anneal <= 1.0):
            raise ConfigError(
                f"Pruning anneal={anneal!r}: give a fraction of total_epochs in [0, 1] "
                "(0.125 = no pruning in the last eighth) or es_pipe.Epochs(n)"
            )
        if not is_int(self.burn_in):
            raise ConfigError(f"Pruning burn_in={self.burn_in!r} must be an int of epochs")
        if self.burn_in < 1:
            raise ConfigError("Pruning burn_in must be >= 1: epoch 0 has no scores to prune by")
        if self.max_streak is not None and not is_int(
            self.max_streak, at_least=1, below=int(STREAK) + 1
        ):
            raise ConfigError(
                f"Pruning max_streak={self.max_streak!r} must be None or an int in [1, 127]"
            )
        if not isinstance(self.rescale, (bool, np.bool_)):
            raise ConfigError(f"Pruning rescale={self.rescale!r} must be True or False")
        if self.score not in ("score", "loss"):
            raise ConfigError(f"Pruning score={self.score!r}: use 'score' or 'loss'")
        if self.draw not in ("exact", "bernoulli"):
            raise ConfigError(f"Pruning draw={self.draw!r}: use 'exact' or 'bernoulli'")

    @classmethod
    def infobatch(cls, ratio: float = 0.5, delta: float = 0.875) -> Pruning:
        """InfoBatch (Qin et al., ICLR'24) in this interface: score = last training loss,
        each below-mean sample pruned with probability ``ratio``, ``1/(1-ratio)`` rescale,
        full data for the last ``1 - delta`` of the epochs, no bound on streaks. The
        baseline's one name (``es_pipe.InfoBatch()`` is its deprecated alias)."""
        if not (isinstance(delta, (int, float)) and 0.0 <= delta <= 1.0):
            raise ConfigError(
                f"Pruning.infobatch(delta={delta!r}): delta must be in [0, 1], e.g. 0.875"
            )
        return cls(
            ratio=ratio,
            anneal=1.0 - delta,
            rescale=True,
            max_streak=None,
            score="loss",
            draw="bernoulli",
            name="infobatch",
        )

    def needs_total_epochs(self) -> bool:
        return (self.anneal.n if isinstance(self.anneal, Epochs) else self.anneal) > 0

    def total_epochs_missing(self) -> ConfigError:
        """The error for a rule that counts back from the end of training without
        ``total_epochs``, in the words the user wrote the rule with."""
        if self.name == "infobatch":
            delta = 1.0 - float(cast(float, self.anneal))
            return ConfigError(
                f"Pruning.infobatch(delta={delta:g}) trains on the full data for the last "
                "1 - delta of the epochs, so it needs to know where training ends: "
                "pass the sampler total_epochs=..., or Pruning.infobatch(delta=1.0)"
            )
        return ConfigError(
            f"Pruning(anneal={self.anneal!r}) counts back from the end of training: pass "
            "the sampler total_epochs=..., or Pruning(anneal=0)"
        )

    def active(self, epoch: int, total_epochs: float | None) -> bool:
        """Whether this rule prunes in ``epoch`` (0-based), by its own schedule."""
        if epoch < self.burn_in or self.ratio == 0.0:
            return False
        if not self.needs_total_epochs():
            return True
        if total_epochs is None:
            raise self.total_epochs_missing()
        span = self.anneal.n if isinstance(self.anneal, Epochs) else self.anneal * total_epochs
        return epoch < total_epochs - span

    def describe(self) -> dict[str, Any]:
        """JSON-friendly hyper-parameters, for manifests."""
        out = asdict(self)
        if isinstance(self.anneal, Epochs):
            out["anneal"] = {"epochs": self.anneal.n}
        return out


def shard_seed(seed: int, epoch: int, shard: str) -> np.random.Generator:
    """The RNG of one shard's decision: from ``(seed, epoch, crc32(shard name))``, the same
    in every process, rank and interpreter (never Python's ``hash``)."""
    crc = zlib.crc32(shard.encode("utf-8"))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, crc, 0xE5])))


@dataclass(frozen=True)
class Decision:
    """One shard's pruning decision for one epoch."""

    pruned: np.ndarray  # sorted int64 ordinals left out of the epoch
    state: np.ndarray  # uint8 per ordinal: streak (low 7 bits) | UPWEIGHT
    factor: float  # loss weight of the up-weighted (kept candidate) samples
    candidates: int  # how many samples were candidates
    threshold: float  # the shard's mean score

    @property
    def streak(self) -> np.ndarray:
        return self.state & STREAK

    @property
    def upweighted(self) -> np.ndarray:
        return (self.state & UPWEIGHT) != 0

    def weights(self, ordinals: np.ndarray) -> np.ndarray:
        """Loss weights (float32) of the given ordinals: ``factor`` or 1."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        inside = ordinals < len(self.state)
        up = np.zeros(len(ordinals), dtype=bool)
        up[inside] = (self.state[ordinals[inside]] & UPWEIGHT) != 0
        return np.where(up, np.float32(self.factor), np.float32(1.0)).astype(np.float32)

    def is_pruned(self, ordinals: np.ndarray) -> np.ndarray:
        """Boolean mask: which ``ordinals`` are pruned."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        if not len(self.pruned):
            return np.zeros(len(ordinals), dtype=bool)
        at = np.searchsorted(self.pruned, ordinals).clip(max=len(self.pruned) - 1)
        return self.pruned[at] == ordinals


def keep_all(rows: int, previous: np.ndarray | None = None) -> Decision:
    """The decision of an epoch without pruning: nothing pruned, streaks reset."""
    del previous
    return Decision(np.zeros(0, np.int64), np.zeros(rows, np.uint8), 1.0, 0, float("nan"))


def decide(
    rule: Pruning,
    scores: np.ndarray,
    visits: np.ndarray,
    previous: np.ndarray | None,
    rng: np.random.Generator,
) -> Decision:
    """Which samples of one shard to prune for the next epoch.

    Args:
        rule: the pruning configuration.
        scores: per-ordinal history (the ES score, or the last loss), float.
        visits: per-ordinal visit counts; 0 means "no score yet" (never a candidate).
        previous: per-ordinal uint8 state of the epoch just ended (``None``: nothing was
            pruned), for the streak bound.
        rng: the shard's generator (:func:`shard_seed`).
    """
    rows = len(scores)
    streak = np.zeros(rows, np.uint8)
    if previous is not None:
        n = min(rows, len(previous))
        streak[:n] = previous[:n] & STREAK
    seen = np.asarray(visits)[:rows] > 0
    if not seen.any():
        return keep_all(rows)
    values = np.asarray(scores, dtype=np.float64)
    threshold = float(values[seen].mean())
    candidate = seen & (values < threshold)
    if rule.max_streak is not None:
        candidate &= streak < rule.max_streak
    where = np.flatnonzero(candidate)
    n = len(where)
    if rule.draw == "exact":
        k = round(rule.ratio * n)
        chosen = np.sort(rng.choice(where, size=k, replace=False)) if k else where[:0]
    else:
        chosen = where[rng.random(n) < rule.ratio]
        k = len(chosen)
    pruned = np.zeros(rows, bool)
    pruned[chosen] = True
    new_streak = np.where(pruned, np.minimum(streak.astype(np.int16) + 1, int(STREAK)), 0)
    state = new_streak.astype(np.uint8)
    factor = 1.0
    if rule.rescale and n > k:
        # exact draw: n/(n-k) makes the kept candidates stand for all of them; Bernoulli
        # (InfoBatch): each candidate is kept with probability 1 - ratio.
        factor = n / (n - k) if rule.draw == "exact" else 1.0 / (1.0 - rule.ratio)
        state[candidate & ~pruned] |= UPWEIGHT
    return Decision(chosen.astype(np.int64), state, float(factor), n, threshold)


def from_state(state: np.ndarray, factor: float) -> Decision:
    """Rebuild a decision from its stored per-ordinal state (e.g. a manifest)."""
    state = np.asarray(state, np.uint8)
    pruned = np.flatnonzero(state & STREAK).astype(np.int64)
    return Decision(pruned, state, float(factor), -1, float("nan"))


def __getattr__(name: str) -> Any:
    """The deprecated name of one release, ``InfoBatch`` (:mod:`es_pipe.renamed`)."""
    if name != "InfoBatch":  # the deprecated names
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from es_pipe.renamed import old_name

    return old_name(__name__, name)
