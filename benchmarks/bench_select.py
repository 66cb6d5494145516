"""Selection and score-store benchmark (issue 14, "a tighter select and store").

Four rows, each a ratio measured side by side in one process (interleaved, median of
``reps``), 1 torch thread. Times are the thread's CPU time (``time.thread_time``), so that
other jobs on a shared machine do not count when they preempt this one:

- ``select``: ``Selector.select`` at B = 4096, b = 2048 (64 shards, every sample seen
  before) against the flat-numpy limit of the same semantics (:func:`limit_select`: the
  same gather, ES weights, torch RNG stream, draw and scatter on bare arrays, no checks).
  The limit keeps its own store and its picks are asserted equal to es_pipe's.
- ``store size``: select time per sample with a store of 1e7 entries against one of 1e5
  (1,000 shards in both, 10,000 vs 100 samples each; every meta-batch drawn uniformly from
  all shards, so it spans ~1,000 shards).
- ``store bytes``: arena bytes per sample held after an epoch end without manifests
  (1e6 samples in 100 shards, read 4 shards at a time), against 16 B (compacted).
- ``eswp``: ``Selector.select`` with ``eswp=ESWP(prune=Pruning(...))`` in an epoch with
  pruning decisions, against plain ES on the same meta-batches.

``rows(reps)`` returns the rows (keys measure, es_pipe, limit, ratio, goal, unit) for
other benchmarks to import; ``main()`` prints the table.

Run:  python benchmarks/bench_select.py [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import es_pipe
from es_pipe import sampling
from es_pipe.sampler import Identity
from es_pipe.scores import ShardCodes

B, b = 4096, 2048


def _identity(names: list[str], shard: np.ndarray, ordinal: np.ndarray) -> Identity:
    """A meta-batch's identity as the stage builds it: the shards it spans, encoded."""
    used, codes = np.unique(shard, return_inverse=True)
    return Identity(ShardCodes([names[i] for i in used], codes.astype(np.int64)), [], ordinal)


def _interleave(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """Median of ``reps`` runs of each function, run in turn (order alternating)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps + 1):  # the first round warms up
        for name in names if rep % 2 else names[::-1]:
            seconds = fns[name]()
            if rep:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------- the limit


class FlatLimit:
    """ES selection on bare arrays: what ``Selector.select`` does at its core, without
    validation, identity objects or policies. One row of 16 bytes per sample."""

    ROW = np.dtype([("score", "<f4"), ("loss", "<f4"), ("visits", "<u4"), ("step", "<i4")])

    def __init__(self, shards: int, per_shard: int, beta1: float = 0.2, beta2: float = 0.8):
        self.rows = np.zeros(shards * per_shard, self.ROW)
        self.offsets = np.arange(shards, dtype=np.int64) * per_shard
        self.beta1, self.beta2 = beta1, beta2
        self.step = 0

    def select(self, shard: np.ndarray, ordinal: np.ndarray, losses: torch.Tensor) -> np.ndarray:
        n = len(ordinal)
        slots = self.offsets[shard] + ordinal
        old = self.rows[slots]
        loss = losses.numpy()
        prior = np.where(old["visits"] > 0, old["score"], loss)
        p, lt = torch.from_numpy(prior), losses
        w = (self.beta1 * p + (1.0 - self.beta1) * lt).to(torch.float64)
        w = w / w.max() + sampling._FLOOR
        generator = torch.Generator().manual_seed(sampling.step_seed(0, self.step))
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        keys = u.clamp_min(1e-300).log() / w
        values = keys.numpy()
        picked = np.flatnonzero(values >= np.partition(values, n - b)[n - b])
        new = np.empty(n, self.ROW)
        new["score"] = (self.beta2 * p + (1.0 - self.beta2) * lt).numpy()
        new["loss"] = loss
        new["visits"] = old["visits"] + 1
        new["step"] = self.step
        self.rows[slots] = new
        self.step += 1
        return picked


# --------------------------------------------------------------------------- rows


def row_select(reps: int, shards: int = 64, calls: int = 8) -> dict[str, Any]:
    """``Selector.select`` vs the flat limit at B = 4096 (samples/s)."""
    n = B * 8
    per = n // shards
    rng = np.random.default_rng(0)
    names = [f"shard-{i:04d}.tar" for i in range(shards)]
    batches = []
    for _ in range(8):
        pos = rng.permutation(n)[:B]
        batches.append((pos // per, pos % per, _identity(names, pos // per, pos % per)))
    losses = [torch.rand(B, generator=torch.Generator().manual_seed(r)) for r in range(8)]
    sampler = es_pipe.Selector(es_pipe.Evolved(), B, b, seed=0)
    limit = FlatLimit(shards, per)
    for r in range(8):  # every sample seen once; both in step
        shard, ordinal, who = batches[r]
        got = sampler.select(who, losses[r], B).indices.numpy()
        assert np.array_equal(got, limit.select(shard, ordinal, losses[r])), "limit differs"

    def es() -> float:
        start = time.thread_time()
        for r in range(calls):
            sampler.select(batches[r % 8][2], losses[r % 8], B)
        return time.thread_time() - start

    def flat() -> float:
        start = time.thread_time()
        for r in range(calls):
            limit.select(batches[r % 8][0], batches[r % 8][1], losses[r % 8])
        return time.thread_time() - start

    t = _interleave({"es": es, "flat": flat}, reps)
    # same semantics: after the same calls, the next selection is the same
    shard, ordinal, who = batches[0]
    got = sampler.select(who, losses[1], B).indices.numpy()
    assert np.array_equal(got, limit.select(shard, ordinal, losses[1])), "limit differs"
    es_rate, flat_rate = calls * B / t["es"] / 1e6, calls * B / t["flat"] / 1e6
    return {
        "measure": f"Selector.select, B={B} b={b}, vs flat numpy",
        "es_pipe": es_rate,
        "limit": flat_rate,
        "ratio": es_rate / flat_rate,
        "goal": ">= 15 M/s",
        "unit": "M samples/s",
    }


def _filled_sampler(shards: int, per: int) -> es_pipe.Selector:
    sampler = es_pipe.Selector(es_pipe.Evolved(), B, b, seed=0)
    rng = np.random.default_rng(1)
    for s in range(shards):
        sampler.store.load_shard(
            f"shard-{s:04d}",
            {
                "score": rng.random(per, dtype=np.float32),
                "loss": rng.random(per, dtype=np.float32),
                "visits": np.ones(per, np.uint32),
                "step": np.zeros(per, np.int32),
            },
        )
    return sampler


def row_store_size(reps: int, shards: int = 1000, calls: int = 8) -> dict[str, Any]:
    """Select time per sample, store of 1e7 vs 1e5 entries (ns/sample)."""
    names = [f"shard-{i:04d}" for i in range(shards)]
    rng = np.random.default_rng(2)
    losses = torch.rand(B, generator=torch.Generator().manual_seed(3))
    runs: dict[str, Callable[[], float]] = {}
    for label, total in (("1e7", 10**7), ("1e5", 10**5)):
        per = total // shards
        sampler = _filled_sampler(shards, per)
        batches = []
        for _ in range(calls):
            shard = rng.integers(0, shards, B)
            batches.append(_identity(names, shard, rng.integers(0, per, B)))

        def run(sampler: es_pipe.Selector = sampler, batches: list[Identity] = batches) -> float:
            start = time.thread_time()
            for who in batches:
                sampler.select(who, losses, B)
            return time.thread_time() - start

        runs[label] = run
    t = _interleave(runs, reps)
    big, small = (t[label] / (calls * B) * 1e9 for label in ("1e7", "1e5"))
    return {
        "measure": f"select time per sample, store 1e7 vs 1e5 ({shards} shards)",
        "es_pipe": big,
        "limit": small,
        "ratio": big / small,
        "goal": "<= 1.1x",
        "unit": "ns/sample",
    }


def row_store_bytes(samples: int = 10**6, shards: int = 100, together: int = 4) -> dict[str, Any]:
    """Arena bytes per sample after an epoch end without manifests (B/sample)."""
    sampler = es_pipe.Selector(es_pipe.Evolved(), B, b, seed=0)
    per = samples // shards
    names = [f"shard-{i:04d}" for i in range(shards)]
    losses = torch.rand(B, generator=torch.Generator().manual_seed(4))
    # a source reading `together` shards at a time, round robin, each in order
    order = []
    for group in range(0, shards, together):
        members = np.arange(group, min(group + together, shards))
        shard = np.tile(members, per)
        ordinal = np.repeat(np.arange(per), len(members))
        order.append((shard, ordinal))
    shard = np.concatenate([o[0] for o in order])
    ordinal = np.concatenate([o[1] for o in order])
    for start in range(0, len(shard), B):
        who = _identity(names, shard[start : start + B], ordinal[start : start + B])
        n = len(who.ordinals)
        sampler.select(who, losses[:n], n)
    sampler.end_epoch()
    per_sample = sampler.store.nbytes / sampler.store.held
    return {
        "measure": f"score store bytes/sample after an epoch end, no manifests ({samples:.0e})",
        "es_pipe": per_sample,
        "limit": 16.0,
        "ratio": per_sample / 16.0,
        "goal": "<= 16 B",
        "unit": "B/sample",
    }


def row_eswp(reps: int, shards: int = 64, calls: int = 8) -> dict[str, Any]:
    """ESWP select (an epoch with pruning decisions) vs plain ES select (samples/s)."""
    n = B * 8
    per = n // shards
    names = [f"shard-{i:04d}.tar" for i in range(shards)]
    rng = np.random.default_rng(5)
    full = rng.permutation(n)
    first = [full[i : i + B] for i in range(0, n, B)]  # epoch 0: every sample once
    losses = torch.rand(B, generator=torch.Generator().manual_seed(6))
    rule = es_pipe.Pruning(ratio=0.5, anneal=0)
    plain = es_pipe.Selector(es_pipe.Evolved(), B, b, seed=0)
    eswp = es_pipe.Selector(es_pipe.Evolved(), B, b, seed=0, eswp=es_pipe.ESWP(prune=rule))
    for pos in first:
        who = _identity(names, pos // per, pos % per)
        plain.select(who, losses, B)
        eswp.select(who, losses + torch.rand(B), B)
    plain.end_epoch()
    eswp.end_epoch()
    assert eswp.eswp is not None and eswp.eswp.decisions, "no pruning decisions to apply"
    batches = [_identity(names, pos // per, pos % per) for pos in (first[1:] + first[:1])]

    def run(sampler: es_pipe.Selector) -> Callable[[], float]:
        def timed() -> float:
            start = time.thread_time()
            for r in range(calls):
                sampler.select(batches[r % len(batches)], losses, B)
            return time.thread_time() - start

        return timed

    t = _interleave({"plain": run(plain), "eswp": run(eswp)}, reps)
    es_rate, plain_rate = calls * B / t["eswp"] / 1e6, calls * B / t["plain"] / 1e6
    return {
        "measure": f"ESWP select vs plain ES select, B={B} ({shards} shards)",
        "es_pipe": es_rate,
        "limit": plain_rate,
        "ratio": es_rate / plain_rate,
        "goal": ">= 0.9x",
        "unit": "M samples/s",
    }


def rows(reps: int = 7) -> list[dict[str, Any]]:
    """Every row of this benchmark (median of ``reps`` interleaved repetitions)."""
    torch.set_num_threads(1)
    return [row_select(reps), row_store_size(reps), row_store_bytes(), row_eswp(reps)]


def table(measured: list[dict[str, Any]]) -> str:
    lines = ["| measure | es_pipe | limit | ratio | goal | unit |", "|---|---|---|---|---|---|"]
    for row in measured:
        lines.append(
            f"| {row['measure']} | {row['es_pipe']:.2f} | {row['limit']:.2f} | "
            f"{row['ratio']:.2f} | {row['goal']} | {row['unit']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    print(table(rows(args.reps)))
    print(f"(median of {args.reps} interleaved repetitions, 1 torch thread)")


if __name__ == "__main__":
    main()
