"""Byte-level LM pretraining with ESWP on N processes: torchrun, DDP, per-rank shards.

    torchrun --nproc_per_node=2 examples/torchrun_lm.py             # gloo on CPU
    torchrun --nproc_per_node=8 examples/torchrun_lm.py --epochs 4  # nccl on GPUs
    torchrun --nproc_per_node=4 examples/torchrun_lm.py --resume    # continue, on 4 ranks

Each rank reads its own shards (dealt per epoch from the seed), selects b of every B samples
of its own meta-batches, keeps the scores of the shards it reads and writes their Parquet
manifests; rank 0 commits each epoch once every rank has written. Nothing is all-gathered:
DDP's gradient all-reduce is the only collective. ``equalize="pad"`` gives every rank the
same number of steps per epoch (DDP hangs when one rank runs out first); the repeats it
costs are printed. ``--resume`` continues after the last committed epoch, on any number of
processes: the data position and the scores come from the manifests, the model from the
checkpoint rank 0 saved with that epoch (mid-epoch checkpoints: see ``es_pipe.elastic``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchdata.nodes as tn

import es_pipe
from es_pipe.demo import ByteLM, build_corpus, decode, load_tokens
from es_pipe.sources import WebDatasetSource


def per_sample_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="none")
    return loss.view(tokens.shape[0], -1).mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("es-pipe-out/torchrun_lm"))
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="b: trained per step")
    parser.add_argument("--meta-batch-size", type=int, default=64, help="B: scored per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)

    # 1. Shards: written once by rank 0, read by every rank.
    shards = {"samples": args.samples, "val_samples": 256, "window": args.window, "shard_size": 256}
    if rank == 0:
        build_corpus(args.out / "shards", **shards)
    dist.barrier()
    corpus = build_corpus(args.out / "shards", **shards)
    counts = dict(zip(corpus["train"], corpus["train_counts"]))

    # 2. ESWP. Rank and world size come from torch.distributed; manifests= is shared by all.
    eswp = es_pipe.ESWP(
        prune=es_pipe.Pruning(ratio=0.3, anneal=0.34),
        manifests=str(args.out / "manifests"),
        resume=args.resume,
    )
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        args.meta_batch_size,
        args.batch_size,
        burn_in=es_pipe.Epochs(0.5),
        total_epochs=args.epochs,
        eswp=eswp,
        seed=0,
    )
    # 3. This rank's shards, reshuffled every epoch, pruned samples skipped unread. No
    #    epoch=: the stage sets the source's epoch from the sampler's (also on --resume).
    source = WebDatasetSource(
        corpus["train"],
        shuffle=True,
        seed=0,
        equalize="pad",
        num_samples=counts,
        pruned=sampler.pruned,
    )
    loader = tn.Loader(es_pipe.SelectStage(tn.Mapper(source, decode), sampler))

    model = torch.nn.parallel.DistributedDataParallel(
        ByteLM(args.window - 1).to(device), device_ids=[device.index] if cuda else None
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    checkpoints = args.out / "checkpoints"
    sampler.start()  # claims the manifests folder; with --resume, after its newest commit
    if sampler.epoch > 0:  # resumed from the manifests: the model of the same epoch
        state = torch.load(checkpoints / f"epoch{sampler.epoch - 1}.pt", weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    held_out = load_tokens(corpus["val"]).to(device)
    while sampler.epoch < args.epochs:
        epoch = sampler.epoch
        for meta in loader:
            tokens = meta.data["tokens"].to(device)
            losses = None
            if meta.needs_losses:  # a gradient-free pass over this rank's meta-batch
                with torch.no_grad():
                    losses = per_sample_loss(model.module, tokens)
            sub = meta.select(losses)
            loss = per_sample_loss(model, sub.data["tokens"].to(device))
            if sub.weights is not None:
                loss = loss * sub.weights
            optimizer.zero_grad()
            loss.mean().backward()  # DDP all-reduces the gradients: the only collective
            optimizer.step()
        stats = source.last_epoch_stats  # the epoch is committed: every rank passed it
        if rank == 0:
            save(checkpoints / f"epoch{epoch}.pt", model, optimizer)
        with torch.no_grad():
            val = per_sample_loss(model.module, held_out).mean().item()
        report = torch.tensor(
            [stats["samples"], stats["padded"], sampler.store.held], device=device
        )
        dist.all_reduce(report)  # for the printout only
        if rank == 0:
            samples, padded, held = report.tolist()
            print(
                f"epoch {epoch + 1}: held-out loss {val:.4f} nats/byte at step {sampler.step} "
                f"on {world} ranks, {int(samples)} samples read ({int(padded)} repeated "
                f"to equalise), {int(held) // world} scores held per rank; epoch commit "
                f"{sampler.last_commit.seconds:.2f}s ({sampler.last_commit.wait_seconds:.2f}s "
                "waiting for the other ranks)"
            )
    if rank == 0:
        print(f"manifests: {args.out / 'manifests'} (es-pipe inspect {args.out / 'manifests'})")
    dist.destroy_process_group()


def save(path: Path, model, optimizer) -> None:
    """The model and optimizer of a committed epoch (the replicas are equal under DDP)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


if __name__ == "__main__":
    main()
