"""Evolved Sampling and its peers as pure tensor functions: no I/O, no state.

Lay this module next to Cheng, Li & Bian, "Data-Efficient Training by Evolved Sampling",
arXiv 2509.23461 (Eq. 3.1; ICLR'25 version Eq. 3.8). For a sample *i* with score
``s_i(t-1)`` and current loss ``l_i(t)``::

    w_i(t) = beta1 * s_i(t-1) + (1 - beta1) * l_i(t)      # sampling weight
    s_i(t) = beta2 * s_i(t-1) + (1 - beta2) * l_i(t)      # score: EMA of the loss

and ``b`` of the ``B`` meta-batch members are drawn with probability proportional to ``w``.
Every function takes and returns torch tensors on any device, so selection runs where the
losses are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import numpy as np
import torch
from torch import Tensor

from es_pipe.checks import is_real
from es_pipe.errors import ConfigError

Phase = Literal["burn_in", "evolve", "anneal"]


# --------------------------------------------------------------------------- policies


class Policy(Protocol):
    """How a policy weighs a meta-batch and scores its samples.

    ``weigh`` returns the sampling weights (``None``: uniform) from the prior scores
    ``s(t-1)`` and, when known, the current losses ``l(t)``; ``score`` returns ``s(t)``.
    """

    @property
    def name(self) -> str: ...

    @property
    def needs_losses(self) -> bool:
        """Does selection need a gradient-free forward pass?"""
        ...

    @property
    def nonnegative(self) -> bool:
        """Are weights proportional to losses (so losses must be >= 0)?"""
        ...

    def weigh(self, prior: Tensor, losses: Tensor | None) -> Tensor | None: ...

    def score(self, prior: Tensor, losses: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Evolved:
    """ES: the paper's decoupled EMA. ``beta1 == beta2`` is a plain loss EMA,
    ``beta1 == 0`` plain loss-proportional sampling. Without current losses (history
    scoring) the weight is the prior score alone."""

    beta1: float = 0.2
    beta2: float = 0.8
    name: str = "es"
    needs_losses: bool = True
    nonnegative: bool = True

    def __post_init__(self) -> None:
        for label, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
                raise ConfigError(
                    f"{label}={beta!r} is outside [0, 1]; the paper recommends beta1 small "
                    "and beta2 close to 1, e.g. beta1=0.2, beta2=0.8"
                )

    def weigh(self, prior: Tensor, losses: Tensor | None) -> Tensor:
        if losses is None:
            return prior
        return self.beta1 * prior + (1.0 - self.beta1) * losses

    def score(self, prior: Tensor, losses: Tensor) -> Tensor:
        return self.beta2 * prior + (1.0 - self.beta2) * losses


@dataclass(frozen=True)
class Uniform:
    """Plain training: every member of the meta-batch is trained (use ``b == B``), or,
    with ``b < B``, ``b`` of them drawn uniformly (the random-subset baseline)."""

    name: str = "uniform"
    needs_losses: bool = False
    nonnegative: bool = False

    def weigh(self, prior: Tensor, losses: Tensor | None) -> None:
        return None

    def score(self, prior: Tensor, losses: Tensor) -> Tensor:
        return losses


@dataclass(frozen=True)
class RandomSubset(Uniform):
    """``b`` of ``B`` uniformly at random: the cost-matched null baseline."""

    name: str = "random"


@dataclass(frozen=True)
class LossProportional:
    """Draw with probability proportional to the current loss (Katharopoulos & Fleuret)."""

    name: str = "loss"
    needs_losses: bool = True
    nonnegative: bool = True

    def weigh(self, prior: Tensor, losses: Tensor | None) -> Tensor:
        return prior if losses is None else losses

    def score(self, prior: Tensor, losses: Tensor) -> Tensor:
        return losses


@dataclass(frozen=True)
class SelectiveBackprop:
    """Selective Backprop (Jiang et al., 2019): weight = loss percentile ** beta.

    The meta-batch serves as the loss history from which percentiles are taken (the
    original keeps the last R losses; for B >= 128 the two agree closely)."""

    beta: float = 1.0
    name: str = "selective_backprop"
    needs_losses: bool = True
    nonnegative: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"SelectiveBackprop beta={self.beta!r} must be > 0 (1 to 3)")

    def weigh(self, prior: Tensor, losses: Tensor | None) -> Tensor:
        values = prior if losses is None else losses
        ranks = values.argsort().argsort().to(values.dtype) + 1.0
        return (ranks / values.numel()) ** self.beta

    def score(self, prior: Tensor, losses: Tensor) -> Tensor:
        return losses


def initial_prior(losses: Tensor, init: str) -> Tensor:
    """``s(0)`` for samples seen for the first time. The paper uses ``1/n``, which a stream
    does not know: ``"loss"`` starts from the sample's first observed loss (its first weight
    is then its loss), ``"mean"`` from the meta-batch's mean loss."""
    if init == "loss":
        return losses
    return losses.mean().expand_as(losses)


# --------------------------------------------------------------------------- selection

_FLOOR = 1e-12  # zero weights are drawn as _FLOOR * max(w): rare, never impossible


def draw(
    weights: Tensor | None,
    k: int,
    generator: torch.Generator,
    *,
    replacement: bool = False,
    n: int | None = None,
) -> Tensor:
    """Indices of ``k`` members drawn with probability proportional to ``weights``.

    Without replacement this is Efraimidis-Spirakis successive sampling: the ``k`` largest
    keys ``log(u) / w``, ``u ~ U(0, 1)``. Zero (and negative) weights get a floor of
    ``_FLOOR * max(w)`` so that they stay drawable, uniformly among themselves, when too few
    are positive; all-zero weights draw uniformly.
    ``weights=None`` draws uniformly from ``n`` members.
    """
    if weights is None:
        assert n is not None
        device = generator.device
        if replacement:
            return torch.randint(n, (k,), generator=generator, device=device)
        return torch.randperm(n, generator=generator, device=device)[:k]
    w = _drawn_weights(weights)
    if replacement:
        return torch.multinomial(w, k, replacement=True, generator=generator)
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float64)
    keys = u.clamp_min_(1e-300).log_().div_(w)  # log(u) / w, in u's memory
    return sorted_top(keys, k)


def sorted_top(keys: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest ``keys``, in increasing order: exactly
    ``keys.topk(k, sorted=False).indices.sort().values``.

    On the CPU without a sort or ``topk``: the k-th largest key by selection
    (``np.partition``, linear time), then the members whose key reaches it, in order:
    topk's k unless keys tie at that value (then topk's own choice, sorted). Keys must not
    be NaN (``draw``'s are finite: ``u > 0``, ``w > 0``)."""
    if keys.device.type == "cpu" and 0 < k <= keys.numel() and keys.dim() == 1:
        values = keys.detach().numpy()
        threshold = np.partition(values, len(values) - k)[len(values) - k]
        picked = np.flatnonzero(values >= threshold)
        if len(picked) == k:
            return torch.from_numpy(picked)
    return keys.topk(k, sorted=False).indices.sort().values


def inclusion_probabilities(weights: Tensor | None, k: int, n: int, replacement: bool) -> Tensor:
    """Expected number of times each member is drawn (``pi_i``), for the weights that
    :func:`draw` actually draws from (zeros floored at ``_FLOOR * max(w)``, all-zero weights
    uniform).

    With replacement ``pi = k * p``. Without, the standard approximation ``pi = min(1, c*w)``
    with ``c`` set so that ``sum(pi) == k``; the heaviest members are capped at 1 first
    (the iterative capping of Horvitz-Thompson inclusion probabilities, done in one sorted
    pass). The numerics hold for weights of any magnitude and spread: they are scaled to a
    maximum of 1 in float64, and the mass left after capping the ``j`` heaviest is summed
    from the lightest member up (a suffix sum), never as ``total - prefix``, which cancels
    to nothing once the weights span more than float64's ~1e16.
    """
    if weights is None:
        return torch.full((n,), k / n, dtype=torch.float64)
    w = _drawn_weights(weights)
    if replacement:
        return k * w / w.sum()
    ordered = w.sort(descending=True).values
    capped = torch.arange(n, device=w.device, dtype=torch.float64)  # members capped at 1
    rest = ordered.flip(0).cumsum(0).flip(0)  # rest[j] = sum(ordered[j:]), lightest first
    # the smallest j whose next member is not pushed above 1 by c_j = (k - j) / rest[j];
    # written without a division, j = k - 1 always fits (ordered[k-1] <= rest[k-1] exactly)
    fits = ((k - capped) * ordered <= rest) & (capped < k)
    j = fits.to(torch.int8).argmax()
    c = (k - capped[j]) / rest[j]
    return (c * w).clamp_max(1.0)


def _drawn_weights(weights: Tensor) -> Tensor:
    """The weights :func:`draw` draws from, in float64 and scaled to a maximum of 1:
    negative as 0, all-zero as uniform, then the relative floor ``_FLOOR`` added (so zeros
    stay drawable). Infinite weights count as the largest finite ones, NaN as 0."""
    w = weights.to(torch.float64)
    if w.device.type == "cpu" and w.numel():
        # the usual case in one pass: finite, non-negative weights with a normal maximum
        # are only scaled (the same operations as below, less those that change nothing)
        low, top = torch.aminmax(w)
        if low.item() >= 0.0 and torch.finfo(torch.float64).tiny <= top.item() < math.inf:
            return torch.div(w, top).add_(_FLOOR)
    w = torch.nan_to_num(w, nan=0.0, posinf=torch.finfo(torch.float64).max).clamp_min(0.0)
    top = w.max()
    w = torch.where(top > 0, w / top.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    return w + _FLOOR


def importance_weights(pi: Tensor, picked: Tensor, k: int, n: int) -> Tensor:
    """Horvitz-Thompson weights ``k / (n * pi)`` of the picked members: ``mean(w * loss)``
    over the sub-batch is then an unbiased estimate of the meta-batch's mean loss."""
    return (k / (n * pi[picked])).to(torch.float32)


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Steps:
    """A span of training measured in optimizer steps (meta-batches)."""

    n: float


@dataclass(frozen=True)
class Epochs:
    """A span of training measured in epochs (fractions allowed)."""

    n: float


Span = Steps | Epochs | int


def _as_span(span: Span, label: str) -> Steps | Epochs:
    if isinstance(span, bool) or not isinstance(span, (int, Steps, Epochs)):
        raise ConfigError(
            f"{label}={span!r}: give an int (steps), es_pipe.Steps(n) or es_pipe.Epochs(n)"
        )
    span = Steps(span) if isinstance(span, int) else span
    if not (is_real(span.n) and math.isfinite(span.n) and span.n >= 0):
        raise ConfigError(f"{label}={span!r} must be a finite, non-negative length")
    return span


@dataclass(frozen=True)
class Schedule:
    """When selection is uniform: a burn-in while scores form, and a final annealing part.

    ``anneal`` counts back from the end of training, so it needs ``total_steps`` (for a
    span in steps) or ``total_epochs`` (for a span in epochs).
    """

    burn_in: Span = 0
    anneal: Span = 0
    total_steps: int | None = None
    total_epochs: float | None = None

    def __post_init__(self) -> None:
        totals = (("total_steps", self.total_steps), ("total_epochs", self.total_epochs))
        for label, total in totals:
            kind = (int, np.integer) if label == "total_steps" else (int, float, np.number)
            if total is not None and not (
                isinstance(total, kind) and is_real(total) and 0 < total < math.inf
            ):
                raise ConfigError(
                    f"{label}={total!r} must be None or a positive, finite "
                    + ("int" if label == "total_steps" else "number")
                )
        object.__setattr__(self, "burn_in", _as_span(self.burn_in, "burn_in"))
        anneal = _as_span(self.anneal, "anneal")
        object.__setattr__(self, "anneal", anneal)
        if anneal.n > 0:
            total = self.total_steps if isinstance(anneal, Steps) else self.total_epochs
            if total is None:
                unit = "total_steps" if isinstance(anneal, Steps) else "total_epochs"
                raise ConfigError(
                    f"anneal={anneal!r} counts back from the end of training: also pass {unit}=..."
                )

    def phase(self, step: int, epoch: float) -> Phase:
        """The phase of meta-batch ``step`` (0-based) in ``epoch`` (0-based, fractional)."""
        burn_in = cast("Steps | Epochs", self.burn_in)  # spans since __post_init__
        anneal = cast("Steps | Epochs", self.anneal)
        if self._within(burn_in, step, epoch):
            return "burn_in"
        if anneal.n > 0:
            if isinstance(anneal, Steps) and step >= (self.total_steps or 0) - anneal.n:
                return "anneal"
            if isinstance(anneal, Epochs) and epoch >= (self.total_epochs or 0) - anneal.n:
                return "anneal"
        return "evolve"

    @staticmethod
    def _within(span: Steps | Epochs, step: int, epoch: float) -> bool:
        return step < span.n if isinstance(span, Steps) else epoch < span.n


# --------------------------------------------------------------------------- rng


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for meta-batch ``step`` of ``rank``: SplitMix64 of (seed, step), the
    same in every process and interpreter, so the RNG state is just ``(seed, step)``. Each
    rank draws from its own stream (rank 0 keeps the single-process one)."""
    if rank:
        seed = step_seed(seed, -1 - rank)
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & mask
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & mask
    return (z ^ (z >> 31)) >> 1
