"""What es_pipe costs each rank of a distributed run: score memory and communication.

    PYTHONPATH=. python benchmarks/bench_distributed.py --worlds 1,2,4 --repeat 3

For each world size the script launches that many real processes with torchrun (gloo) and
runs ESWP (Evolved sampling with pruning, manifests committed every epoch) over the same
sharded data set, with synthetic per-sample losses (no model: the point is es_pipe's share).
Every ``torch.distributed`` collective and point-to-point call is wrapped and counted while
the ranks run, so "es_pipe adds no collective" is measured, not asserted. Reported per
rank: score-store bytes and samples held at the end of each epoch, collectives per step,
manifest bytes written per epoch, and the stage's median time per step; next to them, what
an InfoBatch-style all-gather of every index and loss would move per step (computed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from es_pipe.demo.report import table  # noqa: E402

COLLECTIVES = [
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
]


def rank_main(args: argparse.Namespace) -> None:
    """One rank: count collectives, run the epochs, write a JSON report."""
    import torch
    import torch.distributed as dist
    import torchdata.nodes as tn

    import es_pipe
    from es_pipe.sources import ShardList, WebDatasetSource

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    calls = {"n": 0}
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*a, _original=original, **k):
            calls["n"] += 1
            return _original(*a, **k)

        setattr(dist, name, counted)

    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        args.meta,
        args.meta // 4,
        seed=0,
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.3, anneal=0), manifests=args.manifests),
    )
    source = WebDatasetSource(
        ShardList.from_index(args.index),
        shuffle=True,
        seed=0,
        equalize="pad",
        pruned=sampler.pruned,
    )

    def keys(samples: list[dict]) -> list[str]:
        return [s["__key__"] for s in samples]

    loader = tn.Loader(es_pipe.SelectStage(source, sampler, collate_fn=keys))
    epochs = []
    for epoch in range(args.epochs):
        times, steps, start = [], 0, time.perf_counter()
        for meta in loader:
            losses = torch.tensor([zlib.crc32(f"{k}/{epoch}".encode()) / 2**32 for k in meta.data])
            t = time.perf_counter()
            meta.select(losses)
            times.append(time.perf_counter() - t)
            steps += 1
        elapsed = time.perf_counter() - start
        marker = es_pipe.Manifests(args.manifests).marker(epoch)
        mine = {e["shard"] for e in marker["files"]} & set(sampler.store.shards)
        written = sum(e["size"] for e in marker["files"] if e["shard"] in mine)
        epochs.append(
            {
                "epoch": epoch,
                "steps": steps,
                "collectives": calls["n"],
                "held": sampler.store.held,
                "store_bytes": sampler.store.nbytes,
                "manifest_bytes": written,
                "select_ms": 1e3 * statistics.median(times),
                "epoch_s": elapsed,
            }
        )
    Path(args.report).write_text(json.dumps({"rank": rank, "world": world, "epochs": epochs}))
    dist.destroy_process_group()


def write_data(base: Path, shards: int, per_shard: int) -> str:
    from es_pipe.shard_writer import write_shards

    samples = ({"__key__": f"{i:09d}", "txt": "x"} for i in range(shards * per_shard))
    write_shards(samples, f"{base}/train-%05d.tar", "tar", per_shard)
    return f"{base}/index.txt"


def launch(world: int, index: str, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={world}", __file__, "--rank-main", "--index", index]
        cmd += ["--manifests", f"{tmp}/manifests", "--report", f"{tmp}/report-%s.json"]
        cmd += ["--meta", str(args.meta), "--epochs", str(args.epochs)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("report-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=4096)
    parser.add_argument("--meta", type=int, default=1024, help="B per rank")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians are reported")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--manifests", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        args.report = args.report % os.environ["RANK"]
        rank_main(args)
        return

    total = args.shards * args.per_shard
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        index = write_data(Path(tmp), args.shards, args.per_shard)
        for world in [int(w) for w in args.worlds.split(",")]:
            runs = [launch(world, index, args) for _ in range(args.repeat)]
            last = runs[-1]  # memory and counts are deterministic; times are not
            final = [r["epochs"][-1] for r in last]
            steps = sum(e["steps"] for e in last[0]["epochs"])
            select = [
                statistics.median(e["select_ms"] for r in run for e in r["epochs"]) for run in runs
            ]
            rows.append(
                {
                    "ranks": world,
                    "samples": total,
                    "held_per_rank": max(e["held"] for e in final),
                    "store_MiB_per_rank": max(e["store_bytes"] for e in final) / 2**20,
                    "bytes_per_sample_held": final[0]["store_bytes"] / max(1, final[0]["held"]),
                    "collectives_per_step": max(e["collectives"] for e in final) / steps,
                    "manifest_MiB_per_rank_epoch": max(e["manifest_bytes"] for e in final) / 2**20,
                    "select_ms_median": statistics.median(select),
                    "infobatch_gather_MiB_per_step": world * args.meta * 12 / 2**20,
                }
            )
            print(json.dumps(rows[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(rows, indent=1))
    header = [
        "ranks",
        "scores held per rank",
        "store MiB per rank",
        "B per sample",
        "es_pipe collectives per step",
        "manifest MiB per rank per epoch",
        "select ms (median)",
        "all-gather MiB per step, InfoBatch-style (computed)",
    ]
    cells = [
        [
            r["ranks"],
            f"{r['held_per_rank']:,}",
            f"{r['store_MiB_per_rank']:.2f}",
            f"{r['bytes_per_sample_held']:.1f}",
            f"{r['collectives_per_step']:.0f}",
            f"{r['manifest_MiB_per_rank_epoch']:.2f}",
            f"{r['select_ms_median']:.2f}",
            f"{r['infobatch_gather_MiB_per_step']:.3f}",
        ]
        for r in rows
    ]
    text = table(header, cells)
    (args.out / "distributed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
