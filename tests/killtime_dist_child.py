"""One rank of the torchrun random-time kill test (``test_faults_killtime.py``).

A real DDP job (gloo): each rank reads its part of shared WebDataset shards through
es_pipe's source (``equalize="drop"``: equal steps per rank) and the ESWP stage with
Parquet manifests, scores each meta-batch with a forward pass of a small DDP model, trains
on the selection. Every ``EVERY`` steps each rank saves a checkpoint named by its step
(``torch.save`` to a temporary file, ``os.replace``); a relaunch resumes every rank from
the newest step that all ranks saved. Each step is appended to an fsync'd per-rank log,
one per attempt. Rank 0 writes the final model.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchdata.nodes as tn

import es_pipe
from es_pipe.sources import ShardList, WebDatasetSource

B, b, EVERY, EPOCHS, SEED = 8, 3, 2, 3, 5


def decode(sample: dict) -> dict:
    i, j = (int(v) for v in sample["txt"].decode().split())
    return {
        "x": torch.tensor([i / 8.0, j / 24.0, ((i * 7 + j * 3) % 5) / 5.0]),
        "y": (i + j) % 2,
        **{k: sample[k] for k in ("__key__", "__shard__", "__index__")},
    }


def newest_common(folder: str, world: int) -> int | None:
    """The newest step every rank saved a checkpoint of."""
    steps: list[set[int]] = []
    for rank in range(world):
        found = set()
        for path in glob.glob(os.path.join(folder, f"ckpt-rank{rank}-*.pt")):
            match = re.search(r"-(\d+)\.pt$", path)
            if match:
                found.add(int(match.group(1)))
        steps.append(found)
    common = set.intersection(*steps) if steps else set()
    return max(common) if common else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--run-dir", required=True)  # not --run: torchrun takes it for --run-path
    p.add_argument("--attempt", type=int, required=True)
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with open(os.path.join(args.run_dir, f"pid-rank{rank}.{args.attempt}"), "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)
    try:
        run(args, rank, world)
    except Exception:
        with open(os.path.join(args.run_dir, f"error-rank{rank}.{args.attempt}.txt"), "w") as f:
            f.write(traceback.format_exc())
        sys.exit(1)


def run(args: argparse.Namespace, rank: int, world: int) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        B,
        b,
        seed=SEED,
        total_epochs=EPOCHS,
        eswp=es_pipe.ESWP(
            prune=es_pipe.Pruning(ratio=0.5, anneal=0),
            manifests=os.path.join(args.run_dir, "manifests"),
            commit_timeout=30.0,
        ),
    )
    source = WebDatasetSource(
        ShardList.from_index(args.index),
        shuffle=True,
        seed=SEED,
        equalize="drop",
        pruned=sampler.pruned,
    )
    loader = tn.Loader(es_pipe.SelectStage(tn.Mapper(source, decode), sampler))
    steps = newest_common(args.run_dir, world) or 0
    if steps:
        saved = torch.load(
            os.path.join(args.run_dir, f"ckpt-rank{rank}-{steps:05d}.pt"), weights_only=True
        )
        model.module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        loader.load_state_dict(saved["loader"])
        sampler.load_state_dict(saved["sampler"])
    path = os.path.join(args.run_dir, f"log-rank{rank}.{args.attempt}.jsonl")
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(record: dict) -> None:
        os.write(log, (json.dumps(record) + "\n").encode())
        os.fsync(log)

    append({"resume": steps, "t": time.time()})
    while True:
        it = iter(loader)
        if sampler.epoch >= EPOCHS:
            break
        epoch = sampler.epoch
        for meta in it:
            with torch.no_grad():
                scored = F.cross_entropy(
                    model.module(meta.data["x"]), meta.data["y"], reduction="none"
                )
            sub = meta.select(scored)
            per = F.cross_entropy(model(sub.data["x"]), sub.data["y"], reduction="none")
            loss = per if sub.weights is None else per * sub.weights
            opt.zero_grad()
            loss.mean().backward()  # all-reduce: both ranks in step
            opt.step()
            steps += 1
            append(
                {
                    "n": steps,
                    "epoch": epoch,
                    "step": sub.step,
                    "read": list(meta.data["__key__"]),
                    "trained": list(sub.data["__key__"]),
                    "loss": float(loss.detach().mean()).hex(),
                    "t": time.time(),
                }
            )
            if steps % EVERY == 0:
                state = {
                    "model": model.module.state_dict(),
                    "opt": opt.state_dict(),
                    "loader": loader.state_dict(),
                    "sampler": sampler.state_dict(),
                    "steps": steps,
                }
                target = os.path.join(args.run_dir, f"ckpt-rank{rank}-{steps:05d}.pt")
                torch.save(state, target + ".tmp")
                os.replace(target + ".tmp", target)
    if rank == 0:
        torch.save({"model": model.module.state_dict()}, os.path.join(args.run_dir, "final.pt"))
    os.close(log)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
