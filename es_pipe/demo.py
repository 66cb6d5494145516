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
import json
import math
import sys
import sysconfig
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from torch import Tensor, nn

from es_pipe import harness, report
from es_pipe.sources import WebDatasetSource

DEFAULT_OUT = Path("es-pipe-out") / "demo"
SHARD_SIZE = 1024  # samples per tar shard


# --------------------------------------------------------------------------- corpus


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, site-packages and dist-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _windows(files: Sequence[Path], window: int) -> list[bytes]:
    out: list[bytes] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        out.extend(data[i : i + window] for i in range(0, len(data) - window + 1, window))
    return out


def build_corpus(
    out: Path,
    *,
    samples: int,
    val_samples: int,
    window: int,
    seed: int = 0,
    shard_size: int = SHARD_SIZE,
) -> dict[str, Any]:
    """Write ``train-*.tar`` and ``val-*.tar`` shards of ``window``-byte samples under
    ``out``; one file in ten (by a hash of its path) is held out for validation. Reuses
    shards written earlier with the same parameters. ``meta["train_counts"]`` holds the
    shards' sample counts."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"samples": samples, "val_samples": val_samples, "window": window, "seed": seed}
    spec["shard_size"] = shard_size
    index = out / "corpus.json"
    if index.exists():
        known = json.loads(index.read_text())
        if known.get("spec") == spec and all(Path(u).exists() for u in known["train"]):
            return known
    import webdataset as wds

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    held = [zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0 for p in files]
    splits = {
        "train": (_windows([f for f, h in zip(files, held) if not h], window), samples),
        "val": (_windows([f for f, h in zip(files, held) if h], window), val_samples),
    }
    rng = np.random.default_rng(seed)
    meta: dict[str, Any] = {"spec": spec, "root": str(root), "files": len(files)}
    for old in out.glob("*.tar"):
        old.unlink()
    for split, (pool, wanted) in splits.items():
        if wanted > len(pool):
            raise SystemExit(
                f"es-pipe demo: asked for {wanted} {split} windows of {window} bytes, the "
                f"standard library has {len(pool)}; lower --samples or --window"
            )
        chosen = rng.choice(len(pool), size=wanted, replace=False)
        urls, counts = [], []
        for start in range(0, wanted, shard_size):
            url = out / f"{split}-{start // shard_size:05d}.tar"
            members = chosen[start : start + shard_size]
            with wds.TarWriter(str(url)) as sink:
                for i in members:
                    sink.write({"__key__": f"{int(i):08d}", "bin": pool[int(i)]})
            urls.append(str(url))
            counts.append(len(members))
        meta[split] = urls
        meta[f"{split}_counts"] = counts
        meta[f"{split}_pool"] = len(pool)
    index.write_text(json.dumps(meta, indent=1))
    return meta


# --------------------------------------------------------------------------- reading


def read_shards(urls: Sequence[str], seed: int = 0, pruned: Any = None) -> WebDatasetSource:
    """The demo's shards as a source: shard order and order within a shard (a seeded
    buffer) reshuffled every epoch; ESWP's pruned samples skipped before decoding."""
    return WebDatasetSource(list(urls), shuffle=True, seed=seed, shuffle_buffer=256, pruned=pruned)


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw bytes -> a tensor of byte values (the model's tokens)."""
    tokens = torch.frombuffer(bytearray(sample["bin"]), dtype=torch.uint8).long()
    return {k: sample[k] for k in ("__key__", "__shard__", "__index__")} | {"tokens": tokens}


def load_tokens(urls: Sequence[str]) -> Tensor:
    """All samples of ``urls`` as one ``[n, window]`` tensor (the held-out set)."""
    every = WebDatasetSource(list(urls), rank=0, world_size=1)  # on every rank, all of it
    return torch.stack([decode(s)["tokens"] for s in every])


# --------------------------------------------------------------------------- model


class ByteLM(nn.Module):
    """A small causal transformer over bytes (vocabulary 256)."""

    def __init__(self, window: int, d_model: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.position = nn.Parameter(torch.randn(window, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(window))

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def sample_losses(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Mean next-byte cross-entropy (nats/byte) of every sample."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="none")
    return loss.view(tokens.shape[0], -1).mean(1)


def lm_task(corpus: dict[str, Any], *, d_model: int = 64, layers: int = 2) -> harness.Task:
    """The byte-level LM on the demo shards as a harness task."""
    window = corpus["spec"]["window"]
    held_out = load_tokens(corpus["val"])

    def evaluate(model: nn.Module) -> float:
        losses = [sample_losses(model, {"tokens": part}) for part in held_out.split(256)]
        return float(torch.cat(losses).mean())

    return harness.Task(
        name="stdlib-lm",
        make_model=lambda seed: ByteLM(window - 1, d_model, layers),
        make_source=lambda seed, pruned: tn.Mapper(
            read_shards(corpus["train"], seed, pruned), decode
        ),
        sample_losses=sample_losses,
        evaluate=evaluate,
        n_train=corpus["spec"]["samples"],
        metric="val_loss",
        higher_is_better=False,
    )


# --------------------------------------------------------------------------- cli


# The configuration the long benchmark recommends (benchmarks/results/long/): full batches
# and ES-scored set-level pruning. The demo runs it beside uniform and beside uniform given
# the same CPU time (a point on the budget curve), so its saving is judged where it counts.
RECOMMENDED = harness.RECOMMENDED


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="pretrain a byte-level LM on the Python stdlib: uniform, ES with pruning, and "
        "uniform given the same compute, side by side",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    from es_pipe.cli import positive_float, positive_int

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
    parser.set_defaults(func=run_demo)
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


__all__ = ["ByteLM", "build_corpus", "decode", "demo_main", "lm_task", "read_shards"]
