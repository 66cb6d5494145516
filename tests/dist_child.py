"""One rank of the distributed tests: a real process, under torchrun or started by hand with
RANK/WORLD_SIZE. It reads shared WebDataset shards through es_pipe's source and ESWP stage
and writes what it did to ``--out`` for the parent to check.

The loss of a sample is a fixed function of its key and the epoch, so the scores and the
pruning decisions do not depend on how the samples were split across ranks: every topology
must commit the same manifests. With ``--ddp`` each step also trains a DDP model (gloo), so
unequal step counts across ranks would hang the job instead of passing silently.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import signal
import sys
import traceback
import zlib

import torch
import torch.distributed as dist
import torchdata.nodes as tn

import es_pipe
from es_pipe.sources import ShardList, WebDatasetSource


def sample_losses(keys: list[str], epoch: int) -> torch.Tensor:
    return torch.tensor([(zlib.crc32(f"{k}/{epoch}".encode()) % 1000) / 250.0 for k in keys])


def identity(sample: dict) -> dict:
    return {k: sample[k] for k in ("__key__", "__shard__", "__index__")}


def keys_of(samples: list[dict]) -> list[str]:
    return [s["__key__"] for s in samples]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--manifests", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--prune", type=float, default=0.5)
    p.add_argument("--equalize", default=None)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--stop-at", type=int, default=None, help="checkpoint after this step, exit")
    p.add_argument("--resume", default=None, help="folder of the old ranks' checkpoints")
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--commit-timeout", type=float, default=60.0)
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    try:
        run(args, rank, world)
    except Exception as exc:
        with open(os.path.join(args.out, f"error-rank{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        sys.exit(1)


def run(args: argparse.Namespace, rank: int, world: int) -> None:
    model = optimizer = None
    if args.ddp:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        4,
        seed=0,
        eswp=es_pipe.ESWP(
            prune=es_pipe.Pruning(ratio=args.prune, anneal=0) if args.prune else None,
            manifests=args.manifests,
            commit_timeout=args.commit_timeout,
        ),
    )
    source = WebDatasetSource(
        ShardList.from_index(args.index),
        shuffle=True,
        seed=0,
        equalize=args.equalize,
        pruned=sampler.pruned,
    )
    stage = es_pipe.SelectStage(tn.Mapper(source, identity), sampler, collate_fn=keys_of)
    loader = tn.Loader(stage)
    if args.resume:
        old = [
            torch.load(path, weights_only=True)
            for path in sorted(glob.glob(os.path.join(args.resume, "ckpt-rank*.pt")))
        ]
        if len(old) == world:
            mine = old[rank]
            sampler.load_state_dict(mine["scores"])
            loader.load_state_dict(mine["loader"])
        else:
            sampler.load_state_dict(es_pipe.merge_scores([o["scores"] for o in old]))
            loader.load_state_dict(es_pipe.merge_checkpoints([o["loader"] for o in old]))

    with open(os.path.join(args.out, f"steps-rank{rank}.jsonl"), "a") as log:
        epochs = train(args, rank, loader, sampler, source, model, optimizer, log)
    if epochs is None:
        return  # stopped after a checkpoint
    with open(os.path.join(args.out, f"summary-rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "epochs": epochs}, f)
    if args.ddp:
        dist.destroy_process_group()


def train(args, rank, loader, sampler, source, model, optimizer, log) -> list[dict] | None:
    epochs: list[dict] = []
    while sampler.epoch < args.epochs:
        epoch, steps = sampler.epoch, 0
        for meta in loader:
            losses = sample_losses(meta.data, epoch)
            sub = meta.select(losses)
            steps += 1
            record = {"epoch": epoch, "step": sub.step, "scored": meta.data, "picked": sub.data}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if model is not None:
                x = sample_losses(sub.data, epoch)[:, None]
                optimizer.zero_grad()
                model(x).pow(2).mean().backward()  # all-reduce: equal step counts or a hang
                optimizer.step()
            if rank == args.kill_rank and sampler.step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if sampler.step == args.stop_at:
                state = {"loader": loader.state_dict(), "scores": sampler.state_dict()}
                path = os.path.join(args.out, f"ckpt-rank{rank}.pt")
                torch.save(state, path + ".tmp")
                os.replace(path + ".tmp", path)
                return None
        stats = source.last_epoch_stats
        epochs.append(
            {
                "epoch": epoch,
                "steps": steps,
                "samples": stats["samples"],
                "padded": stats["padded"],
                "dropped": stats["dropped"],
                "pruned": stats["pruned"],
                "held": sampler.store.held,
            }
        )
    return epochs


if __name__ == "__main__":
    main()
