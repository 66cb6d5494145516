"""Micro-benchmark of the ES stage alone: score update + selection, in samples per second.

Two levels, for B in {256, 4096, 65536} (b = B/2):

- ``sampler``: ``Sampler.select`` on a prepared identity and loss vector: the score-store
  gather/scatter, the ES weights and the draw (the stage's arithmetic);
- ``stage``: ``EvolvedSampling`` end to end over sample dicts: buffering B samples,
  reading their identities, collating and taking the sub-batch, plus the above.

Run:  python benchmarks/bench_stage.py [--sizes 256,4096,65536] [--threads 1] [--out DIR]
The goal in issue 5: >= 5 million samples/s at B = 4096 on one core.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import es_pipe
from es_pipe.sampler import Identity


def bench_sampler(B: int, shards: int, repeats: int) -> float:
    """Median samples/s of ``Sampler.select`` over ``repeats`` meta-batches."""
    n = B * 8  # a dataset of 8 meta-batches, so that scores get revisited
    sampler = es_pipe.EvolvedSampler(B, B // 2, seed=0)
    names = [f"shard-{i:04d}.tar" for i in range(shards)]
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    per = -(-n // shards)
    times = []
    for r in range(repeats + 2):
        pos = order[(r % 8) * B : (r % 8 + 1) * B]
        # shard names are encoded while buffering, as EvolvedSampling does (identify)
        who = Identity.of([names[p // per] for p in pos], [str(p) for p in pos], pos % per)
        losses = torch.rand(B)
        t = time.perf_counter()
        sampler.select(who, losses, B)
        if r >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    return B / statistics.median(times)


def bench_stage(B: int, shards: int, repeats: int) -> float:
    """Samples/s through ``EvolvedSampling`` (buffering, identity, collate, take, select)."""
    n = B * repeats
    per = -(-n // shards)
    samples = [
        {"__key__": str(i), "__shard__": f"shard-{i // per:04d}.tar", "__index__": i % per, "x": i}
        for i in range(n)
    ]
    sampler = es_pipe.EvolvedSampler(B, B // 2, seed=0)
    losses = torch.rand(B)

    def collate(batch: list) -> dict:
        return {"x": torch.tensor([s["x"] for s in batch])}

    node = es_pipe.EvolvedSampling(samples, sampler, collate_fn=collate)
    t = time.perf_counter()
    count = 0
    for meta in es_pipe.stage.tn.Loader(node):
        meta.select(losses[: len(meta)])
        count += len(meta)
    return count / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,4096,65536")
    parser.add_argument("--shards", type=int, default=16, help="shards the samples come from")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write stage.csv and stage.md here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for B in (int(s) for s in args.sizes.split(",")):
        repeats = max(5, min(args.repeats, 2_000_000 // B))
        rows.append(
            {
                "B": B,
                "b": B // 2,
                "sampler_samples_per_s": bench_sampler(B, args.shards, repeats),
                "stage_samples_per_s": bench_stage(B, args.shards, max(4, repeats // 2)),
            }
        )
        print(
            f"B={B:6d}: Sampler.select {rows[-1]['sampler_samples_per_s'] / 1e6:7.3f} M/s, "
            f"EvolvedSampling end to end {rows[-1]['stage_samples_per_s'] / 1e6:7.3f} M/s",
            flush=True,
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "stage.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        lines = [
            "| B | b | Sampler.select (M samples/s) | EvolvedSampling end to end (M/s) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['B']} | {r['b']} | {r['sampler_samples_per_s'] / 1e6:.3f} | "
            f"{r['stage_samples_per_s'] / 1e6:.3f} |"
            for r in rows
        ]
        (args.out / "stage.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
