"""``ScoreStore.locate`` for a meta-batch whose samples come from many shards.

Issue 14: per-shard-name Python loops in ``locate`` dominated when a meta-batch spans
~1,000 shards. Times the lookup of B samples drawn from ``--shards`` shards, in two
regimes: *steady* (every sample seen before: a later epoch) and *growing* (shards'
lengths extend at every step: the first epoch). Median over ``--reps`` meta-batches;
the shard names are encoded beforehand, as the stage does while buffering.

    python benchmarks/bench_locate.py [--batch 4096] [--shards 16,1000] [--reps 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from es_pipe.scores import COLUMNS, ScoreStore, ShardCodes


def median_locate(shards: int, batch: int, reps: int, growing: bool) -> float:
    rng = np.random.default_rng(0)
    names = [f"s3://bucket/shard-{i:06d}.tar" for i in range(shards)]
    per = 100  # samples per shard
    store = ScoreStore()
    if not growing:
        zeros = {c: np.zeros(per, d) for c, d in COLUMNS.items()}
        for name in names:
            store.load_shard(name, zeros)
    times = []
    for r in range(reps):
        which = rng.integers(0, shards, batch)
        ordinals = rng.integers(0, per, batch)
        if growing:
            ordinals = np.minimum(ordinals, r)  # every step reaches one ordinal further
        codes = ShardCodes.encode([names[i] for i in which])
        t0 = time.perf_counter()
        store.locate(codes, ordinals=ordinals)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shards", default="16,1000")
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    for shards in (int(s) for s in args.shards.split(",")):
        for growing in (False, True):
            t = median_locate(shards, args.batch, args.reps, growing)
            regime = "growing (1st epoch)" if growing else "steady (later epochs)"
            print(
                f"B={args.batch} from {shards:5d} shards, {regime:22s}: "
                f"{t * 1e6:7.1f} us per meta-batch, {args.batch / t / 1e6:6.1f} M samples/s"
            )


if __name__ == "__main__":
    main()
