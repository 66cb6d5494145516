"""``es-pipe demo``: the main job, on a corpus every machine running es_pipe already has.

It shards the Python standard library's source (``sysconfig.get_paths()["stdlib"]``,
site-packages left out) into WebDataset tar shards of fixed-length byte windows, holding
out whole files for validation, then pretrains a small byte-level transformer language
model on them with plain (uniform) training and with Evolved Sampling side by side, and
writes a table (held-out loss, wall-clock, samples back-propagated, saving) as Markdown and
CSV, plus a PNG of the loss curves, into the output folder it names.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from es_pipe.demo import harness, report
from es_pipe.demo.lm import build_corpus, lm_task

DEFAULT_OUT = Path("es-pipe-out") / "demo"


# The configuration the long benchmark recommends (benchmarks/results/long/): full batches
# and ES-scored set-level pruning. The demo runs it beside uniform and beside uniform given
# the same CPU time (a point on the budget curve), so its saving is judged where it counts.
RECOMMENDED = harness.RECOMMENDED


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    from es_pipe.tools.argtypes import add_command, positive_float, positive_int

    parser = add_command(
        subparsers,
        "demo",
        run_demo,
        help="pretrain a byte-level LM on the Python stdlib: uniform, ES with pruning, and "
        "uniform given the same compute, side by side",
        description=__doc__.split("\n\n")[1],
        epilog=f"""By default it trains three runs: uniform (plain training), {RECOMMENDED}
(the recommended configuration) and uniform@F, uniform cut to the CPU time the recommended
run took, and ends with a one-line verdict. The columns are explained under the table.

examples:
  es-pipe demo                         # about 3 minutes on 2 CPU cores
  es-pipe demo --quick                 # under 40 s: a smoke run
  es-pipe demo --epochs 12 --samples 16384 --methods uniform,uniform@0.5,es,es-history
  es-pipe demo --out /tmp/run1 --seed 1

methods: uniform, uniform@F (uniform with F x the steps, its own LR schedule: the budget
curve), random, loss, sb (Selective Backprop), es, es-history (ES scored from the training
losses, no extra forward pass), eswp (ES with set-level pruning), infobatch, and the
families es@F / es-history@F (b/B = F), es-prune@R / es-prune-s3@R (full batches, ES-scored
pruning at ratio R), infobatch@R.""",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 40 s")
    parser.add_argument(
        "--samples", type=positive_int, help="training windows (default 4096; quick 1024)"
    )
    parser.add_argument("--val-samples", type=positive_int, help="held-out windows (default 512)")
    parser.add_argument("--window", type=positive_int, help="bytes per sample (default 64)")
    parser.add_argument("--epochs", type=positive_int, help="epochs (default 8; quick 4)")
    parser.add_argument(
        "--methods",
        help=f"comma-separated (default: uniform,{RECOMMENDED}, then uniform at its budget)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help="b, samples back-propagated per step (default 64)",
    )
    parser.add_argument(
        "--meta-batch-size",
        type=positive_int,
        help="B, samples buffered and scored per step (default 2b)",
    )
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    parser.add_argument("--d-model", type=positive_int, default=64, help="model width (default 64)")
    parser.add_argument(
        "--layers", type=positive_int, default=2, help="transformer layers (default 2)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1)",
    )
    parser.add_argument(
        "--score-bf16",
        action="store_true",
        help="bf16 autocast for the scoring pass (slower on CPUs without AMX)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    quick = args.quick
    samples = args.samples or (1024 if quick else 4096)
    val_samples = args.val_samples or (256 if quick else 512)
    epochs = args.epochs or (4 if quick else 8)
    window = args.window or 64
    batch_size = args.batch_size or 64
    meta_batch_size = args.meta_batch_size or 2 * batch_size
    names = [n.strip() for n in (args.methods or f"uniform,{RECOMMENDED}").split(",") if n.strip()]
    if "uniform" not in names:
        names.insert(0, "uniform")  # the baseline every ratio is taken against
    match_budget = args.methods is None  # the default run adds uniform at the same cost
    try:
        methods = [harness.method(name) for name in names]
        for m in methods:
            m.build(harness.RunConfig())
    except harness.ConfigError as error:
        print(f"es-pipe demo: {error}", file=sys.stderr)
        return 2
    out: Path = args.out
    started = time.perf_counter()
    print(f"es-pipe demo: sharding the Python standard library into {out / 'shards'} ...")
    corpus = build_corpus(out / "shards", samples=samples, val_samples=val_samples, window=window)
    print(
        f"  {len(corpus['train'])} train + {len(corpus['val'])} val WebDataset shards, "
        f"{samples} + {val_samples} windows of {window} bytes "
        f"(from {corpus['files']} files; 1 in 10 files held out)"
    )
    task = lm_task(corpus, d_model=args.d_model, layers=args.layers)
    cfg = harness.RunConfig(
        epochs=epochs,
        batch_size=batch_size,
        meta_batch_size=meta_batch_size,
        lr=args.lr,
        warmup_steps=10 if quick else 30,
        seed=args.seed,
        threads=args.threads,
        score_autocast=args.score_bf16,
        evals_per_epoch=1 if quick else 2,
        manifests=str(out / "manifests"),
    )
    results = []
    for chosen in methods:
        results.append(harness.train(task, chosen, cfg, progress=not args.no_progress))
    if match_budget:
        spent = results[-1].cpu_s / results[0].cpu_s
        budget = min(1.0, max(0.01, math.floor(spent * 100) / 100))  # at most its cost
        point = harness.method(f"uniform@{budget:g}")
        print(f"  uniform given the CPU time {RECOMMENDED} took ({spent:.2f}x): {point.name}")
        results.append(harness.train(task, point, cfg, progress=not args.no_progress))
    title = f"es-pipe demo: byte LM on the Python stdlib, {samples} windows, {epochs} epochs"
    rows = report.summarize(results, tolerance=0.01)
    table = report.write_all(results, out, "demo", title, tolerance=0.01)
    print()
    print(table)
    print(
        f"held-out metric: mean next-byte cross-entropy (nats/byte; lower is better) on "
        f"{val_samples} windows of held-out files; times are training CPU time, evaluation "
        "excluded"
    )
    line = report.verdict(rows, names[-1] if not match_budget else RECOMMENDED)
    print(line)
    with open(out / "demo.md", "a") as handle:
        handle.write(f"\n{line}\n")
    print(
        f"wrote {out}/demo.md, demo.csv, demo_runs.csv, demo_curves.csv, demo.png "
        f"({time.perf_counter() - started:.0f} s in all)"
    )
    return 0


def demo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="es-pipe")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(demo_main(sys.argv[1:]))


__all__ = ["RECOMMENDED", "add_demo_parser", "demo_main"]
