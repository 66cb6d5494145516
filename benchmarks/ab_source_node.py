"""A/B: the per-sample cost of the source node in two checkouts of es_pipe, side by side.

Each repetition runs one fresh interpreter per checkout (alternating which goes first)
and times, in it: an epoch of 1,000,000 samples from a reader without I/O (what is
timed is ``ShardedSource``'s delivery path alone), the same with ``equalize="pad"``,
and the best of 6 epochs of ``WebDatasetSource`` over 4 local tars of 10,000 1-KiB
samples. Prints medians over the repetitions and the ratio B / A.

    python benchmarks/ab_source_node.py A_REPO B_REPO [--reps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
from es_pipe.sources import WebDatasetSource
from es_pipe.sources.base import ShardedSource

N_SHARDS, PER = 20, 50_000
CHUNK = [{"__key__": str(j), "x": j} for j in range(256)]


class Null(ShardedSource):
    def _chunks(self, url, start, pruned, rng_seed):
        n = PER - start
        for _ in range(n // 256):
            yield CHUNK
        if n % 256:
            yield CHUNK[: n % 256]

    iter_shard = _chunks  # the reader hook's name since the split
    _iter_shard = _chunks  # its name before


def rate(src):
    src.reset()
    t = time.perf_counter()
    n = sum(1 for _ in src)
    return n / (time.perf_counter() - t)


urls = [f"null://{i}" for i in range(N_SHARDS)]
pad = Null(urls, equalize="pad", num_samples=dict.fromkeys(urls, PER))
out = {"node": rate(Null(urls)), "node_pad": rate(pad)}
out["tar"] = max(rate(WebDatasetSource(sys.argv[1])) for _ in range(6))
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="checkout A (its folder holds es_pipe/)")
    ap.add_argument("b", help="checkout B")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        import numpy as np

        from es_pipe.shard_writer import write_shards

        rng = np.random.default_rng(0)
        samples = [{"__key__": f"k{i}", "bin": rng.bytes(1024), "cls": i} for i in range(40_000)]
        write_shards(samples, f"{tmp}/t-%03d.tar", "tar", 10_000, index=False)
        tars = f"{tmp}/t-{{000..003}}.tar"
        runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        for rep in range(args.reps):
            order = [("A", args.a), ("B", args.b)]
            for name, repo in order if rep % 2 == 0 else order[::-1]:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(repo))
                env["PYTHONDONTWRITEBYTECODE"] = "1"
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, tars], env=env, capture_output=True, text=True
                )
                if out.returncode:
                    sys.exit(out.stderr[-2000:])
                runs[name].append(json.loads(out.stdout))
    for key in ("node", "node_pad", "tar"):
        a = statistics.median(r[key] for r in runs["A"])
        b = statistics.median(r[key] for r in runs["B"])
        print(f"{key:9s} A {a / 1e6:.3f} M samples/s  B {b / 1e6:.3f} M samples/s  B/A {b / a:.3f}")


if __name__ == "__main__":
    main()
