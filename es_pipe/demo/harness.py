"""A side-by-side training harness: the same task, model, optimizer, epochs and learning-rate
schedule for every selection method, with the costs that decide whether ES pays off.

A *task* says what to train (model, data, per-sample loss, held-out metric); a *method* is a
small factory that turns a ``RunConfig`` into an ``es_pipe.Selector``. ``train`` runs one
(task, method, seed) and returns a ``RunResult``; ``es_pipe.report`` turns many of them
into tables and plots. ``es-pipe demo`` and ``benchmarks/bench_train.py`` are built on it.

What is counted, per run:

- ``forwarded``: samples that went through a gradient-free scoring pass (ES's extra cost);
- ``backprop``: samples that went through forward + backward (the training itself);
- ``train_s``: wall-clock of the training loop (data, scoring, selection, steps), held-out
  evaluation excluded; ``cpu_s``: the process CPU time of the same span (with one torch
  thread, the compute actually spent: robust to other load on a shared machine);
  ``stage_s``: the part of the wall-clock spent in the ES stage's selection and score update;
- ``forward_s``/``backward_s``: wall-clock of the training forward and of backward plus the
  optimizer step, whose ratio ``r`` prices a back-propagated sample in forward passes
  (``forward-equivalents = scored + (1 + r) * trained``, a device-independent cost);
- the held-out metric after every epoch (more often with ``evals_per_epoch``), with the
  training clock at that point, so that "time to reach uniform's final quality" can be read
  off afterwards.

The learning rate follows a cosine over the *optimizer steps* actually taken: the plan is
re-made at every epoch boundary from the epoch lengths measured so far, so epochs that
pruning shortens shorten the schedule too, and every run (each uniform budget included)
gets its own full schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torchdata.nodes as tn
from torch import Tensor, nn

import es_pipe
from es_pipe.errors import ConfigError
from es_pipe.sampler import Selector

# --------------------------------------------------------------------------- task


@dataclass
class Task:
    """What to train and how to judge it.

    Args:
        name: short name, shown in tables.
        make_model: ``make_model(seed) -> nn.Module``.
        make_source: ``make_source(seed, pruned)``: an iterable (or node) whose every
            ``iter()``/reset is one epoch; ``pruned`` is the sampler's pruned-row hook for
            sources that can skip pruned samples before decoding them
            of sample dicts with ``__key__`` (and ideally ``__shard__``, ``__index__``).
        sample_losses: ``sample_losses(model, batch) -> Tensor[n]``, one loss per sample.
        evaluate: ``evaluate(model) -> float``, the held-out metric.
        n_train: samples per epoch (for the first learning-rate plan).
        metric: the metric's name, e.g. ``"val_loss"`` or ``"test_acc"``.
        higher_is_better: accuracy: True; loss: False.
        collate_fn: turns a list of samples into a batch (default: ``default_collate``).
    """

    name: str
    make_model: Callable[[int], nn.Module]
    make_source: Callable[[int, Callable[..., Any]], Iterable[Any]]
    sample_losses: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], float]
    n_train: int
    metric: str = "val_loss"
    higher_is_better: bool = False
    collate_fn: Callable[[list[Any]], Any] | None = None


@dataclass(frozen=True)
class RunConfig:
    """Everything a method may need, shared by all methods of one comparison."""

    epochs: int = 4
    batch_size: int = 64  # b: samples back-propagated per optimizer step
    meta_batch_size: int = 128  # B: samples buffered (and scored) per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    beta1: float = 0.2
    beta2: float = 0.8
    burn_in: float = 0.1  # fraction of the epochs with uniform selection at the start
    anneal: float = 0.1  # ... and at the end
    prune_ratio: float = 0.3  # ESWP / InfoBatch: fraction of low-score samples pruned
    max_streak: int | None = 1  # ESWP: epochs in a row a sample may stay pruned
    sb_beta: float = 1.0  # Selective Backprop's percentile exponent
    score_autocast: bool = False  # bf16 autocast for the scoring pass (measure first)
    evals_per_epoch: int = 1
    seed: int = 0
    threads: int = 1
    manifests: str | None = None  # folder for ESWP/InfoBatch manifests, one subfolder each


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A named way of choosing what to train: ``build(cfg) -> Selector``; ``epochs(cfg)``
    is the epoch budget (uniform at a smaller budget trains fewer epochs)."""

    name: str
    build: Callable[[RunConfig], Selector]
    description: str
    epoch_fraction: float = 1.0
    overrides: dict[str, Any] = field(default_factory=dict)  # RunConfig fields it changes

    def epochs(self, cfg: RunConfig) -> int:
        """Epochs started: a fractional budget ends inside its last one."""
        return max(1, math.ceil(cfg.epochs * self.epoch_fraction - 1e-9))

    def step_budget(self, cfg: RunConfig, per_epoch: int) -> int | None:
        """Optimizer steps of a fractional budget (``None``: the whole epochs)."""
        if self.epoch_fraction >= 1:
            return None
        return max(1, round(cfg.epochs * self.epoch_fraction * per_epoch))


def _plain(cfg: RunConfig) -> Selector:
    b = cfg.batch_size
    return es_pipe.Selector(es_pipe.Uniform(), meta_batch_size=b, batch_size=b, seed=cfg.seed)


def _subset(policy: Any, cfg: RunConfig, **options: Any) -> Selector:
    return es_pipe.Selector(
        policy,
        meta_batch_size=cfg.meta_batch_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        **options,
    )


def _schedule(cfg: RunConfig) -> dict[str, Any]:
    return {
        "burn_in": es_pipe.Epochs(cfg.burn_in * cfg.epochs),
        "anneal": es_pipe.Epochs(cfg.anneal * cfg.epochs),
        "total_epochs": cfg.epochs,
    }


def _scores(cfg: RunConfig) -> dict[str, Any]:
    """What every ES method takes from the config alike: the score's two EMA decays and
    the seed."""
    return {"beta1": cfg.beta1, "beta2": cfg.beta2, "seed": cfg.seed}


def _es(
    cfg: RunConfig, scoring: Literal["forward", "history"] = "forward", **options: Any
) -> Selector:
    return es_pipe.Selector(
        es_pipe.Evolved(beta1=cfg.beta1, beta2=cfg.beta2),
        cfg.meta_batch_size,
        cfg.batch_size,
        scoring=scoring,
        seed=cfg.seed,
        **_schedule(cfg),
        **options,
    )


def _pruning(cfg: RunConfig) -> es_pipe.Pruning:
    return es_pipe.Pruning(
        ratio=cfg.prune_ratio,
        anneal=es_pipe.Epochs(cfg.anneal * cfg.epochs),
        max_streak=cfg.max_streak,
    )


def _manifests(cfg: RunConfig, method: str) -> dict[str, Any]:
    if cfg.manifests is None:
        return {}
    # every run starts over: a folder left by an earlier run is replaced, not resumed
    return {"manifests": f"{cfg.manifests}/{method}-seed{cfg.seed}", "resume": False}


def _eswp(cfg: RunConfig) -> Selector:
    return _es(cfg, eswp=es_pipe.ESWP(prune=_pruning(cfg), **_manifests(cfg, "eswp")))


def _infobatch(cfg: RunConfig, ratio: float = 0.5) -> Selector:
    """InfoBatch: plain training (b == B) plus below-mean random pruning of the last
    training losses with 1/keep rescale, full data for the last (1 - delta) of epochs."""
    b = cfg.batch_size
    return es_pipe.Selector(
        es_pipe.Uniform(),
        meta_batch_size=b,
        batch_size=b,
        seed=cfg.seed,
        scoring="history",
        total_epochs=cfg.epochs,
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning.infobatch(ratio), **_manifests(cfg, "infobatch")),
    )


def _es_pruned(cfg: RunConfig) -> Selector:
    """Full batches (``b == B``: every optimizer step kept) and ES-scored set-level
    pruning: the decoupled-EMA score from the training forward's losses (history scoring,
    no extra pass) ranks the samples; below-mean ones are pruned at ``prune_ratio`` for
    the next epoch, kept ones up-weighted by 1/keep; no pruning in the final anneal."""
    return es_pipe.Selector.recommended(
        cfg.batch_size,
        total_epochs=cfg.epochs,
        prune_ratio=cfg.prune_ratio,
        max_streak=cfg.max_streak,
        anneal=cfg.anneal,
        **_scores(cfg),
        **_manifests(cfg, "es-prune"),
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("uniform", _plain, "plain training: every sample, batch b"),
        Method("random", lambda c: _subset(es_pipe.RandomSubset(), c), "b of B at random"),
        Method("loss", lambda c: _subset(es_pipe.LossProportional(), c), "b of B, p ~ loss"),
        Method(
            "sb",
            lambda c: _subset(es_pipe.SelectiveBackprop(c.sb_beta), c),
            "Selective Backprop: p ~ loss percentile^beta",
        ),
        Method("es", _es, "Evolved Sampling, scoring pass over B"),
        Method(
            "es-history",
            lambda c: _es(c, scoring="history"),
            "ES scored from training-loss history: no extra forward",
        ),
        Method(
            "es-bf16",
            _es,
            "ES, scoring pass under bf16 autocast (a cost lever; measure it)",
            overrides={"score_autocast": True},
        ),
        Method(
            "es-wide",
            lambda c: _es(replace(c, meta_batch_size=4 * c.batch_size)),
            "ES with B = 4b: a larger scoring batch, a stronger selection",
        ),
        Method("eswp", _eswp, "ES + set-level pruning (ESWP)"),
        Method(
            "infobatch",
            _infobatch,
            "InfoBatch (set-level pruning of the last losses, full data at the end)",
        ),
        Method(
            "es-prune",
            _es_pruned,
            "full batches + ES-scored set-level pruning (history scores, 1/keep, anneal)",
        ),
    ]
}


def _with_ratio(cfg: RunConfig, ratio: float) -> RunConfig:
    return replace(cfg, meta_batch_size=max(cfg.batch_size, round(cfg.batch_size / ratio)))


# ``name@F`` families: F is a fraction in (0, 1] whose meaning the family gives.
FAMILIES: dict[str, tuple[str, Callable[[float], Method]]] = {
    "uniform": (
        "uniform with F x the epochs (its own full LR schedule): the budget curve",
        lambda f: Method(f"uniform@{f:g}", _plain, f"uniform, {f:g}x the epochs", f),
    ),
    "es": (
        "ES, forward-scored, b/B = F",
        lambda f: Method(f"es@{f:g}", lambda c: _es(_with_ratio(c, f)), f"ES, b/B={f:g}"),
    ),
    "es-history": (
        "ES, history-scored, b/B = F",
        lambda f: Method(
            f"es-history@{f:g}",
            lambda c: _es(_with_ratio(c, f), scoring="history"),
            f"ES history-scored, b/B={f:g}",
        ),
    ),
    "es-prune": (
        "full batches, ES-scored set-level pruning at ratio F",
        lambda f: Method(
            f"es-prune@{f:g}",
            lambda c: _es_pruned(replace(c, prune_ratio=f)),
            f"full batches + ES-scored pruning, ratio {f:g}",
        ),
    ),
    "es-prune-s3": (
        "as es-prune, a sample may stay pruned up to 3 epochs in a row",
        lambda f: Method(
            f"es-prune-s3@{f:g}",
            lambda c: _es_pruned(replace(c, prune_ratio=f, max_streak=3)),
            f"full batches + ES-scored pruning, ratio {f:g}, max_streak 3",
        ),
    ),
    "infobatch": (
        "InfoBatch at prune ratio F",
        lambda f: Method(
            f"infobatch@{f:g}",
            lambda c: _infobatch(c, f),
            f"InfoBatch, ratio {f:g}",
        ),
    ),
}


# What the long benchmark recommends (benchmarks/README.md): Selector.recommended().
RECOMMENDED = "es-prune-s3@0.8"


def method(name: str) -> Method:
    """A method by name, or ``family@F`` (see ``FAMILIES``): ``uniform@0.5`` is uniform
    with half the epochs and its own full LR schedule, the budget-matched baseline."""
    if name in METHODS:
        return METHODS[name]
    family, _, value = name.partition("@")
    if family in FAMILIES and value:
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if 0 < fraction < 1 or (fraction == 1 and family in ("uniform", "es", "es-history")):
            return FAMILIES[family][1](fraction)
    families = "; ".join(f"{k}@F: {v[0]}" for k, v in FAMILIES.items())
    raise ConfigError(
        f"unknown method {name!r}; choose from {', '.join(METHODS)}, or {families} "
        "(e.g. uniform@0.5)"
    )


# --------------------------------------------------------------------------- schedule


class CosineSteps:
    """Linear warm-up, then a cosine to zero over the planned number of optimizer steps.
    ``replan(total)`` moves the end (pruning shortened the epochs); the rate stays a
    function of the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total: int, warmup: int):
        self.optimizer, self.lr, self.total, self.warmup = optimizer, lr, max(1, total), warmup
        self.step_count = 0
        self._apply()

    def replan(self, total: int) -> None:
        self.total = max(total, self.step_count + 1)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def rate(self) -> float:
        t = self.step_count
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (t - self.warmup) / span)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.rate()


# --------------------------------------------------------------------------- result


@dataclass
class RunResult:
    """One (task, method, seed) run: totals and the evaluation curve."""

    task: str
    method: str
    seed: int
    epochs: float  # the budget: a fraction for uniform@F
    metric: str
    higher_is_better: bool
    final: float = math.nan
    train_s: float = 0.0
    cpu_s: float = 0.0
    stage_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    score_s: float = 0.0
    forwarded: int = 0
    backprop: int = 0
    steps: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)

    def time_to(self, target: float, clock: str = "cpu_s") -> float:
        """Training seconds (``clock``: ``"cpu_s"`` or ``"train_s"``) until the held-out
        metric first reached ``target`` (nan: never)."""
        for point in self.curve:
            value = point["metric"]
            if (value >= target) if self.higher_is_better else (value <= target):
                return point[clock]
        return math.nan

    @property
    def backward_ratio(self) -> float:
        """``r``: backward + optimizer step time per forward time, as measured."""
        return self.backward_s / self.forward_s if self.forward_s > 0 else math.nan

    def forward_equivalents(self, r: float) -> float:
        """Device-independent cost: ``scored + (1 + r) * trained`` samples."""
        return self.forwarded + (1.0 + r) * self.backprop


# --------------------------------------------------------------------------- training


def train(
    task: Task,
    chosen: Method | str,
    cfg: RunConfig,
    *,
    progress: bool = False,
    stream: Any = None,
) -> RunResult:
    """Train ``task`` once with method ``chosen``; return its costs and curve."""
    chosen = method(chosen) if isinstance(chosen, str) else chosen
    torch.set_num_threads(cfg.threads)
    warm_up()
    epochs = chosen.epochs(cfg)
    budget_epochs = round(cfg.epochs * min(1.0, chosen.epoch_fraction), 2)
    planned_epochs = cfg.epochs
    cfg = replace(cfg, epochs=epochs, **chosen.overrides)
    sampler = chosen.build(cfg)
    torch.manual_seed(cfg.seed)
    model = task.make_model(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(task.n_train / sampler.meta_batch_size)
    budget = chosen.step_budget(replace(cfg, epochs=planned_epochs), per_epoch)
    schedule = CosineSteps(optimizer, cfg.lr, budget or per_epoch * epochs, cfg.warmup_steps)
    options = {} if task.collate_fn is None else {"collate_fn": task.collate_fn}
    source = task.make_source(cfg.seed, sampler.pruned)
    loader = tn.Loader(es_pipe.SelectStage(source, sampler, **options))
    result = RunResult(
        task.name, chosen.name, cfg.seed, budget_epochs, task.metric, task.higher_is_better
    )
    history = sampler.scoring == "history"
    eval_every = max(1, per_epoch // max(1, cfg.evals_per_epoch))

    def evaluate(epoch: float) -> None:
        model.eval()
        with torch.inference_mode():
            value = float(task.evaluate(model))
        result.curve.append(
            {
                "epoch": epoch,
                "train_s": result.train_s,
                "cpu_s": result.cpu_s,
                "metric": value,
                "backprop": result.backprop,
                "forwarded": result.forwarded,
                "steps": result.steps,
            }
        )

    evaluate(0.0)
    bar = _bar(progress, budget or epochs * per_epoch, f"{task.name}/{chosen.name}", stream)
    for epoch in range(epochs):
        start, cpu_start, in_epoch = time.perf_counter(), time.process_time(), 0
        for meta in loader:
            tick = time.perf_counter()
            losses = None
            if meta.needs_losses:
                model.eval()
                with torch.inference_mode(), _autocast(cfg.score_autocast):
                    losses = task.sample_losses(model, meta.data).float()
                result.forwarded += len(meta)
            tock = time.perf_counter()
            sub = meta.select(losses)
            stage = time.perf_counter() - tock
            model.train()
            forward_at = time.perf_counter()
            per_sample = task.sample_losses(model, sub.data)
            weights = sub.weights
            loss = per_sample.mean() if weights is None else (per_sample * weights).mean()
            backward_at = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            result.backward_s += time.perf_counter() - backward_at
            result.forward_s += backward_at - forward_at
            if history:
                tock = time.perf_counter()
                sub.report(per_sample.detach())
                stage += time.perf_counter() - tock
            result.score_s += tock - tick if losses is not None else 0.0
            result.stage_s += stage
            result.backprop += len(sub)
            result.steps += 1
            in_epoch += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if cfg.evals_per_epoch > 1 and in_epoch % eval_every == 0 and in_epoch < per_epoch:
                result.train_s += time.perf_counter() - start
                result.cpu_s += time.process_time() - cpu_start
                evaluate(epoch + in_epoch / per_epoch)
                start, cpu_start = time.perf_counter(), time.process_time()
            if budget is not None and result.steps >= budget:
                break
        result.train_s += time.perf_counter() - start
        result.cpu_s += time.process_time() - cpu_start
        if budget is not None and result.steps >= budget:
            evaluate(epoch + in_epoch / per_epoch)
            break
        # Re-plan the cosine from the measured epoch length: pruning shortens epochs.
        per_epoch = max(1, in_epoch)
        schedule.replan(budget or result.steps + per_epoch * (epochs - epoch - 1))
        evaluate(epoch + 1.0)
        if bar is not None:
            bar.set_postfix(**{task.metric: f"{result.curve[-1]['metric']:.4f}"}, refresh=True)
    if bar is not None:
        bar.close()
    result.final = result.curve[-1]["metric"]
    return result


_WARM = False


def warm_up() -> None:
    """Pay the stage's one-time costs (lazy imports, first allocations) outside the timed
    loop, once per process, so that the first method compared does not carry them."""
    global _WARM
    if not _WARM:
        sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=0)
        meta = next(
            iter(
                tn.Loader(
                    es_pipe.SelectStage([{"__key__": str(i), "x": i} for i in range(8)], sampler)
                )
            )
        )
        meta.select(torch.rand(8))
        _WARM = True


def _autocast(enabled: bool) -> Any:
    if enabled:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _bar(enabled: bool, total: int, label: str, stream: Any) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="step", leave=True, file=stream, dynamic_ncols=True)
