"""Tables and plots from harness runs: per-method means and spreads over seeds, every cost
taken as a ratio to uniform *of the same seed in the same run* (the machines are noisy),
and each method's place against the uniform accuracy-versus-time curve."""

from __future__ import annotations

import csv
import itertools
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from es_pipe.demo.harness import RunResult
from es_pipe.errors import ConfigError
from es_pipe.plotting import pyplot

BASELINE = "uniform"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.fmean(values), statistics.stdev(values)


def summarize(
    results: Sequence[RunResult], tolerance: float = 0.0, clock: str = "cpu_s"
) -> list[dict[str, Any]]:
    """One row per method, in first-seen order. Ratios are per seed against ``uniform``.

    ``clock`` is the time every ratio uses: ``"cpu_s"`` (process CPU time, robust to other
    load) or ``"train_s"`` (wall-clock). Time-to-quality is the first evaluation at which a
    run reached uniform's final metric (same seed) give or take ``tolerance``."""
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for run in results:
        by_method[run.method].append(run)
    base = {run.seed: run for run in by_method.get(BASELINE, [])}
    r_measured = statistics.median(
        [u.backward_ratio for u in base.values() if not math.isnan(u.backward_ratio)] or [1.0]
    )
    higher = bool(results) and results[0].higher_is_better
    curve = _budget_curve(by_method, base, higher, clock)
    rows = []
    for name, runs in by_method.items():
        paired = [(run, base[run.seed]) for run in runs if run.seed in base]
        final, final_std = _mean_std([run.final for run in runs])
        ratio, ratio_std = _mean_std([_time(r, clock) / _time(u, clock) for r, u in paired])
        sign = -1.0 if runs[0].higher_is_better else 1.0
        reach = [r.time_to(u.final + sign * tolerance, clock) / _time(u, clock) for r, u in paired]
        reached = [v for v in reach if not math.isnan(v)]
        row = {
            "method": name,
            "seeds": len(runs),
            "epochs": runs[0].epochs,
            "metric": runs[0].metric,
            "final_mean": final,
            "final_std": final_std,
            "delta_vs_uniform": _mean_std([r.final - u.final for r, u in paired])[0],
            "train_s": _mean_std([run.train_s for run in runs])[0],
            "cpu_s": _mean_std([run.cpu_s for run in runs])[0],
            "time_ratio": ratio,
            "time_ratio_std": ratio_std,
            "wall_ratio": _mean_std([r.train_s / u.train_s for r, u in paired])[0],
            "saving": 1.0 - ratio if not math.isnan(ratio) else math.nan,
            "backward_ratio_r": r_measured,
            "fwd_equiv_ratio": _mean_std(
                [
                    r.forward_equivalents(r_measured) / u.forward_equivalents(r_measured)
                    for r, u in paired
                ]
            )[0],
            "fwd_equiv_ratio_r2": _mean_std(
                [r.forward_equivalents(2.0) / u.forward_equivalents(2.0) for r, u in paired]
            )[0],
            "forwarded": _mean_std([run.forwarded for run in runs])[0],
            "backprop": _mean_std([run.backprop for run in runs])[0],
            "backprop_ratio": _mean_std([r.backprop / u.backprop for r, u in paired])[0],
            "time_to_uniform_quality": statistics.fmean(reached) if reached else math.nan,
            "reached": f"{len(reached)}/{len(paired)}",
            "tolerance": tolerance,
            "stage_share": _mean_std([run.stage_s / run.train_s for run in runs])[0],
            "score_share": _mean_std([run.score_s / run.train_s for run in runs])[0],
        }
        row["vs_curve"], row["vs_curve_delta"] = _against(row, curve, runs[0].higher_is_better)
        rows.append(row)
    return rows


def _time(run: RunResult, clock: str) -> float:
    value = getattr(run, clock)
    return value if value > 0 else run.train_s  # runs recorded before cpu_s existed


def _budget_curve(
    by_method: dict[str, list[RunResult]], base: dict[int, RunResult], higher: bool, clock: str
) -> list[tuple[float, float, float]]:
    """(cost ratio, metric, std) of uniform at each budget, sorted by cost.

    A budget's cost is its share of full uniform's optimizer steps: its steps are the same
    steps, fewer of them, so this is its CPU time without the clock's noise. Its metric is
    the best any budget up to that cost reached: a user who could stop earlier would (under
    label noise, longer uniform training ends worse)."""
    points = []
    for name, runs in by_method.items():
        if name != BASELINE and not name.startswith(BASELINE + "@"):
            continue
        ratios = [_cost(r, base[r.seed], clock) for r in runs if r.seed in base]
        final, std = _mean_std([r.final for r in runs])
        if ratios:
            points.append((statistics.fmean(ratios), final, std))
    envelope: list[tuple[float, float, float]] = []
    for cost, final, std in sorted(points):
        if envelope and (envelope[-1][1] >= final if higher else envelope[-1][1] <= final):
            final, std = envelope[-1][1], envelope[-1][2]
        envelope.append((cost, final, std))
    return envelope


def _cost(run: RunResult, uniform: RunResult, clock: str) -> float:
    if run.steps and uniform.steps:
        return run.steps / uniform.steps
    return _time(run, clock) / _time(uniform, clock)  # runs recorded without steps


def _against(
    row: dict[str, Any], curve: list[tuple[float, float, float]], higher: bool
) -> tuple[str, float]:
    """Where a method stands against uniform's metric-vs-time curve at its own time."""
    if row["method"] == BASELINE or row["method"].startswith(BASELINE + "@"):
        return "(the curve)", math.nan
    if len(curve) < 2 or math.isnan(row["time_ratio"]):
        return "n/a: run uniform@F budgets", math.nan
    t = row["time_ratio"]
    if t < curve[0][0]:
        gain = (row["final_mean"] - curve[0][1]) * (1 if higher else -1)
        if gain > 0 and not gain < (row["final_std"] if not math.isnan(row["final_std"]) else 0):
            return "above (cheaper and better than the smallest budget)", gain
        return f"n/a: cheaper than the smallest budget ({curve[0][0]:.2f}x)", math.nan
    if t > curve[-1][0]:
        expected = curve[-1][1]
    else:
        for (t0, m0, _), (t1, m1, _) in itertools.pairwise(curve):
            if t0 <= t <= t1:
                expected = m0 if t1 == t0 else m0 + (m1 - m0) * (t - t0) / (t1 - t0)
                break
    delta = row["final_mean"] - expected
    gain = delta if higher else -delta
    spread = row["final_std"]
    if math.isnan(spread):
        return ("above" if gain > 0 else "below") + " (1 seed)", delta
    if gain > spread:
        return "above", delta
    if gain < -spread:
        return "below", delta
    return "on (within 1 std)", delta


# --------------------------------------------------------------------------- writers


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _pm(mean: float, std: float, digits: int = 4) -> str:
    text = _fmt(mean, digits)
    return text if math.isnan(std) else f"{text} ± {_fmt(std, 2)}"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table of ``rows`` (cells formatted with ``str``) under ``head``."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


COLUMNS: dict[str, str] = {
    "method": "how samples were chosen; uniform@F is uniform trained for F x the epochs",
    "epochs": "epochs trained",
    "metric": "held-out quality after the last epoch, mean ± std over seeds",
    "Δ vs uniform": "metric minus full uniform's, same seed, averaged",
    "CPU time": "training process CPU time (1 thread) as a ratio to uniform's, same seed",
    "wall": "training wall-clock as a ratio to uniform's (noisier on a shared machine)",
    "fwd-eq": "cost in forward passes, scored + (1 + r) x trained, r = backward/forward as "
    "measured here; ratio to uniform's",
    "fwd-eq r=2": "the same at r = 2, as on a GPU: a projection, not a measurement",
    "back-prop": "samples back-propagated, as a ratio to uniform's",
    "time to uniform quality": "CPU time (ratio to uniform's) when the metric first reached "
    "uniform's final value within the stated tolerance; (k/n) seeds that got there",
    "vs budget curve": "against uniform trained for less (the curve: a budget costs its share "
    "of uniform's steps and scores the best quality any budget up to that cost reached): "
    "above = better than the curve at the same CPU time by more than 1 std; on = within; "
    "below = worse",
}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table, then one line per column saying what it means."""
    metric = rows[0]["metric"] if rows else "metric"
    head = [name if name != "metric" else f"{metric}" for name in COLUMNS]
    body = []
    for r in rows:
        reach = r["time_to_uniform_quality"]
        reach_text = (
            f"{_fmt(reach, 3)}x ({r['reached']})"
            if not math.isnan(reach)
            else (f"not reached ({r['reached']})")
        )
        body.append(
            [
                r["method"],
                r["epochs"],
                _pm(r["final_mean"], r["final_std"]),
                _fmt(r["delta_vs_uniform"], 3),
                _pm(r["time_ratio"], r["time_ratio_std"], 3),
                _fmt(r["wall_ratio"], 3),
                _fmt(r["fwd_equiv_ratio"], 3),
                _fmt(r["fwd_equiv_ratio_r2"], 3),
                _fmt(r["backprop_ratio"], 3),
                reach_text,
                r["vs_curve"],
            ]
        )
    r_measured = rows[0]["backward_ratio_r"] if rows else math.nan
    tolerance = rows[0]["tolerance"] if rows else 0.0
    legend = [f"- **{name}**: {text}" for name, text in COLUMNS.items()]
    legend.append(f"- measured r = {_fmt(r_measured, 3)}; tolerance = {_fmt(tolerance, 3)}")
    return table(head, body) + "\n" + "\n".join(legend) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    keep: tuple[str, ...] = (
        "task",
        "method",
        "seed",
        "epochs",
        "metric",
        "final",
        "train_s",
        "cpu_s",
    )
    keep += ("stage_s", "score_s", "forward_s", "backward_s", "forwarded", "backprop", "steps")
    return [{k: getattr(r, k) for k in keep} for r in results]


def curve_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    return [
        {"task": r.task, "method": r.method, "seed": r.seed, **point}
        for r in results
        for point in r.curve
    ]


def plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Held-out metric against training wall-clock and against samples back-propagated,
    mean over seeds, one line per method."""
    plt = pyplot(f"the plot {path.name}")

    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for run in results:
        by_method[run.method].append(run)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, runs in by_method.items():
        n = min(len(run.curve) for run in runs)
        mean = {
            key: [statistics.fmean(run.curve[i][key] for run in runs) for i in range(n)]
            for key in ("cpu_s", "backprop", "metric")
        }
        style = "--" if name.startswith(BASELINE + "@") else "-"
        axes[0].plot(mean["cpu_s"], mean["metric"], style, marker="o", ms=3, label=name)
        axes[1].plot(mean["backprop"], mean["metric"], style, marker="o", ms=3, label=name)
    metric = results[0].metric if results else "metric"
    curve = sorted(
        (statistics.fmean(r.cpu_s for r in runs), statistics.fmean(r.final for r in runs))
        for name, runs in by_method.items()
        if name == BASELINE or name.startswith(BASELINE + "@")
    )
    if len(curve) > 1:
        xs, ys = zip(*curve)
        axes[0].plot(xs, ys, "k:", lw=2, label="uniform budget curve (finals)")
    for ax, xlabel in zip(axes, ("training CPU time (s, 1 thread)", "samples back-propagated")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    seeds = len({run.seed for run in results})
    fig.suptitle(f"{title} ({seeds} seed{'s' if seeds > 1 else ''}, mean)")
    axes[0].legend(fontsize=7)
    if results and not results[0].higher_is_better:
        for ax in axes:  # the first evaluation (untrained model) would flatten the plot
            finals = [point["metric"] for run in results for point in run.curve[1:]]
            if finals:
                low, high = min(finals), max(finals)
                ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(
    results: Sequence[RunResult], out: Path, stem: str, title: str, tolerance: float = 0.0
) -> str:
    """``{stem}.csv`` (summary), ``{stem}_runs.csv``, ``{stem}_curves.csv``, ``{stem}.md``
    and ``{stem}.png`` in ``out``; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, tolerance)
    write_csv(out / f"{stem}.csv", rows)
    write_csv(out / f"{stem}_runs.csv", run_rows(results))
    write_csv(out / f"{stem}_curves.csv", curve_rows(results))
    table = markdown(rows)
    (out / f"{stem}.md").write_text(f"# {title}\n\n{table}")
    try:
        plot(results, out / f"{stem}.png", title)
    except ConfigError as missing:  # matplotlib is an extra: the tables are written
        print(f"note: no {stem}.png: {missing}", file=sys.stderr)
    return table


def _budget(name: str) -> float:
    """F of ``uniform@F``: its share of full uniform's steps, hence of its CPU time."""
    return float(name.partition("@")[2])


def verdict(rows: Sequence[dict[str, Any]], name: str) -> str:
    """One sentence: how ``name`` did against uniform and against uniform given the same
    CPU time (the nearest budget point), and whether it lies above the budget curve."""
    by_name = {row["method"]: row for row in rows}
    if name not in by_name or BASELINE not in by_name:
        return f"verdict: n/a ({name} or uniform did not run)"
    run, base = by_name[name], by_name[BASELINE]
    metric, t = run["metric"], run["time_ratio"]
    text = (
        f"verdict: {name} reached {metric} {_fmt(run['final_mean'])} in {t:.2f}x uniform's "
        f"CPU time (uniform: {_fmt(base['final_mean'])} in 1.00x)"
    )
    reach = run["time_to_uniform_quality"]
    if not math.isnan(reach):
        text += f"; it first reached uniform's final {metric} at {reach:.2f}x"
    points = [r for r in rows if r["method"].startswith(BASELINE + "@")]
    if points:
        point = min(points, key=lambda r: abs(_budget(r["method"]) - t))
        text += (
            f"; uniform given {_budget(point['method']):.2f}x of its steps reached "
            f"{_fmt(point['final_mean'])}"
        )
    place = run["vs_curve"].split(" ")[0]
    meaning = {
        "above": "above the uniform budget curve: a real saving",
        "on": "on the uniform budget curve: no better than training uniform for less",
        "below": "below the uniform budget curve: training uniform for less would do better",
    }
    text += f". {name} lies " + meaning.get(place, f"at '{run['vs_curve']}' on the curve") + "."
    return text
