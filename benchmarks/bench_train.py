"""Side-by-side training benchmark: uniform (at several budgets), random subset,
loss-proportional, Selective Backprop, ES, ES history-scored (and ESWP, InfoBatch when
es_pipe has Pruning), same model, optimizer, epochs and LR schedule, over seeds.

Tasks: ``fmnist`` (small CNN, Fashion-MNIST subset, test accuracy), ``fmnist-noisy``
(40% of training labels corrupted with a fixed seed), ``lm`` (the demo's byte LM on the
Python stdlib, held-out loss). Methods run interleaved, seed by seed, so that load on a
shared machine hits all of them alike; every cost is reported as a ratio to uniform of the
same seed.

    python benchmarks/bench_train.py --task fmnist --seeds 0,1,2 --out bench-out
    python benchmarks/bench_train.py --task fmnist --tune          # choose the LR on val
    python benchmarks/bench_train.py --task lm --train-samples 4096 --epochs 3

Writes ``{task}.csv`` (summary), ``{task}_runs.csv``, ``{task}_curves.csv``, ``{task}.md``
and ``{task}.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import fmnist_task, lm_task

from es_pipe.demo import harness, report

DEFAULT_METHODS = "uniform,uniform@0.5,uniform@0.75,random,loss,sb,es,es-history,eswp,infobatch"


def make_task(args: argparse.Namespace, evaluate_on: str = "test") -> harness.Task:
    if args.task == "lm":
        return lm_task(args.out / "lm-shards", samples=args.train_samples, window=args.window)
    noise = 0.4 if args.task == "fmnist-noisy" else 0.0
    return fmnist_task(train_samples=args.train_samples, noise=noise, evaluate_on=evaluate_on)


def tune(args: argparse.Namespace, cfg: harness.RunConfig) -> float:
    """The peak LR of uniform with the best validation metric (never the test split)."""
    task = make_task(args, evaluate_on="val")
    best = None
    for lr in (float(v) for v in args.lrs.split(",")):
        run = harness.train(task, "uniform", harness.RunConfig(**{**cfg.__dict__, "lr": lr}))
        print(f"  tune: lr={lr:g} -> {task.metric} {run.final:.4f}", flush=True)
        better = best is None or (
            run.final > best[1] if task.higher_is_better else run.final < best[1]
        )
        if better:
            best = (lr, run.final)
    return best[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=["fmnist", "fmnist-noisy", "lm"], default="fmnist")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--window", type=int, default=64, help="lm: bytes per sample")
    parser.add_argument("--batch-size", type=int, default=64, help="b")
    parser.add_argument("--meta-batch-size", type=int, default=128, help="B")
    parser.add_argument("--lr", type=float, default=None, help="peak LR (default: task's)")
    parser.add_argument("--tune", action="store_true", help="choose the LR on the val split")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="candidates for --tune")
    parser.add_argument("--evals-per-epoch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="time-to-quality: reach uniform's final metric within this (default: 0.003 "
        "accuracy, 0.01 nats of loss)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in {task}_runs.jsonl under --out, run only the others",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the tables from {task}_runs.jsonl"
    )
    args = parser.parse_args()
    if args.tolerance is None:
        args.tolerance = 0.01 if args.task == "lm" else 0.003

    lr = args.lr or (3e-3 if args.task == "lm" else 2e-3)
    cfg = harness.RunConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        meta_batch_size=args.meta_batch_size,
        lr=lr,
        threads=args.threads,
        evals_per_epoch=args.evals_per_epoch,
    )
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "uniform" not in names:
        names.insert(0, "uniform")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)  # as every run does; the notes report it
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{args.task}_runs.jsonl"
    results = [harness.RunResult(**json.loads(line)) for line in _lines(log)]
    if not (args.resume or args.report_only) and results:
        raise SystemExit(f"{log} holds runs already: pass --resume to add to it, or remove it")
    done = {(run.method, run.seed) for run in results}
    if args.report_only:
        names, seeds = [], []
    if args.tune and not args.report_only:
        cfg = harness.RunConfig(**{**cfg.__dict__, "lr": tune(args, cfg)})
        print(f"chosen on the validation split: lr={cfg.lr:g}", flush=True)
    task = make_task(args)
    seeds = [] if args.report_only else [int(s) for s in args.seeds.split(",")]
    for seed in seeds:  # interleaved: every method once per seed, back to back
        for name in names:
            if (name, seed) in done:
                continue
            run = harness.train(
                task,
                name,
                harness.RunConfig(**{**cfg.__dict__, "seed": seed}),
                progress=args.progress,
            )
            results.append(run)
            with open(log, "a") as handle:  # one line per run: a long benchmark can stop
                handle.write(json.dumps(dataclasses.asdict(run)) + "\n")
            print(
                f"seed {seed} {name:16s} {task.metric} {run.final:.4f} "
                f"cpu {run.cpu_s:6.1f} s  wall {run.train_s:6.1f} s  "
                f"backprop {run.backprop}  fwd {run.forwarded}",
                flush=True,
            )
    title = f"{task.name}: {args.train_samples} train samples, {args.epochs} epochs"
    table = report.write_all(results, args.out, args.task, title, args.tolerance)
    notes = [
        f"command: `python {' '.join(_run_command())}`"
        + (" (tables rebuilt from the runs log with --report-only)" if args.report_only else ""),
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
        f"{len({r.seed for r in results})} seeds, b={cfg.batch_size}, "
        f"B={cfg.meta_batch_size}, lr={cfg.lr:g}"
        + (" (chosen on the validation split)" if args.tune else " (fixed a priori)"),
        f"held-out metric: {task.metric}"
        + (
            "; 40% of training labels corrupted (symmetric, seed 12345), test labels clean"
            if args.task == "fmnist-noisy"
            else ""
        ),
        f"training wall-clock over all runs {sum(r.train_s for r in results):.0f} s "
        f"(this invocation: {time.perf_counter() - started:.0f} s)",
    ]
    with open(args.out / f"{args.task}.md", "a") as handle:
        handle.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(table)
    print("\n".join(notes))


def _run_command() -> list[str]:
    """This command line as the one that (re)runs the benchmark."""
    return [a for a in sys.argv if a != "--report-only"] + (
        ["--resume"] if "--report-only" in sys.argv and "--resume" not in sys.argv else []
    )


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    main()
