"""What the identity checks (es_pipe/identity.py) cost the stage, side by side in one run.

For each meta-batch size B and each identity kind (``ordinals``: es_pipe's sources, with
``__index__``; ``keys``: a webdataset pipeline or a list, ``__key__`` + ``__url__`` only),
one epoch of ``SelectStage`` over prepared sample dicts (history scoring, so the
stage's own work dominates), timed with the checks and with them switched off (the
duplicate check and the repeat count replaced by no-ops), alternating (and alternating
which goes first), median of ``--reps`` epochs each. Prints the ratio checked /
unchecked, and, steadier on a busy machine, the two checks' own time per meta-batch (best
of 5 x 20 calls) next to the unchecked stage's time per meta-batch.

Run:  python benchmarks/bench_identity.py [--sizes 256,4096] [--epoch 65536] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch
import torchdata.nodes as tn

import es_pipe
import es_pipe.stage as stage_module
from es_pipe.identity import EpochRepeats, check_unique, identify


def samples(n: int, kind: str, shards: int = 16) -> list[dict]:
    x = torch.randn(n, 4)
    per = n // shards
    out = []
    for i in range(n):
        s, j = divmod(i, per)
        sample = {"x": x[i], "__key__": f"{j:08d}"}
        if kind == "ordinals":
            sample.update(__shard__=f"shard-{s:04d}.tar", __index__=j)
        else:
            sample["__url__"] = f"shard-{s:04d}.tar"
        out.append(sample)
    return out


def epoch(data: list[dict], B: int) -> float:
    sampler = es_pipe.Selector(es_pipe.Evolved(), B, B, scoring="history", seed=0)
    loader = tn.Loader(es_pipe.SelectStage(data, sampler))
    start = time.perf_counter()
    for meta in loader:
        sub = meta.select()
        sub.report(torch.ones(len(sub)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,4096")
    parser.add_argument("--epoch", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checked = (check_unique, EpochRepeats.add)
    unchecked = (lambda who: None, lambda self, who: None)
    print(
        f"{'kind':9} {'B':>6} {'checked s':>10} {'unchecked s':>12} {'ratio':>6} "
        f"{'checks ms':>9} {'step ms':>9}"
    )
    for kind in ("ordinals", "keys"):
        data = samples(args.epoch, kind)
        for B in (int(b) for b in args.sizes.split(",")):
            times: dict[bool, list[float]] = {True: [], False: []}
            for rep in range(args.reps):
                for on in (True, False) if rep % 2 else (False, True):  # alternate the order
                    stage_module.check_unique, EpochRepeats.add = checked if on else unchecked
                    times[on].append(epoch(data, B))
            stage_module.check_unique, EpochRepeats.add = checked
            on, off = statistics.median(times[True]), statistics.median(times[False])
            who = identify(data[:B])
            repeats = EpochRepeats()
            check = min(timeit.repeat(lambda who=who: check_unique(who), number=20, repeat=5))
            add = min(
                timeit.repeat(
                    lambda who=who, r=repeats: (r.clear(), r.add(who)), number=20, repeat=5
                )
            )
            per_step = off / (args.epoch / B) * 1e3
            print(
                f"{kind:9} {B:>6} {on:>10.3f} {off:>12.3f} {on / off:>6.3f} "
                f"{(check + add) / 20 * 1e3:>9.3f} {per_step:>9.3f}"
            )


if __name__ == "__main__":
    main()
