"""Byte-level LM pretraining with Evolved Sampling, as a script to copy and adapt.

    shards (WebDataset tar) -> decode -> ES stage -> trainer
                                 ^-- losses of the meta-batch --'

Run:  python examples/lm_pretrain.py                  # a couple of minutes on 2 CPU cores
      python examples/lm_pretrain.py --samples 512 --epochs 1   # a smoke run
      python examples/lm_pretrain.py --history        # no extra scoring forward pass

The corpus is the Python standard library's source, sharded by ``es_pipe.demo.build_corpus``
(swap in your own shard list). At the end it prints where the time went, including the
ES stage's share of a training step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchdata.nodes as tn

import es_pipe
from es_pipe.demo import ByteLM, build_corpus, load_tokens
from es_pipe.sources import WebDatasetSource


def decode(sample: dict) -> dict:
    """Raw window bytes -> token ids; keep the identity fields the stage scores by."""
    tokens = torch.frombuffer(bytearray(sample["bin"]), dtype=torch.uint8).long()
    return {k: sample[k] for k in ("__key__", "__shard__", "__index__")} | {"tokens": tokens}


def per_sample_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="none")
    return loss.view(tokens.shape[0], -1).mean(1)  # one loss per sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("es-pipe-out/lm_pretrain"))
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="b: trained per step")
    parser.add_argument("--meta-batch-size", type=int, default=128, help="B: scored per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--history", action="store_true", help="score from training losses: no extra forward pass"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    # 1. Sources: WebDataset shards, reshuffled every epoch.
    corpus = build_corpus(
        args.out / "shards", samples=args.samples, val_samples=256, window=args.window
    )
    source = WebDatasetSource(corpus["train"], shuffle=True, seed=0, shuffle_buffer=256)
    # 2. Decode (put a tn.ParallelMapper here for heavier decoding).
    decoded = tn.Mapper(source, decode)
    # 3. The ES stage: buffers B samples, takes their losses back, emits b of them.
    sampler = es_pipe.Selector(
        es_pipe.Evolved(beta1=0.2, beta2=0.8),
        meta_batch_size=args.meta_batch_size,
        batch_size=args.batch_size,
        burn_in=es_pipe.Epochs(0.1 * args.epochs),
        anneal=es_pipe.Epochs(0.1 * args.epochs),
        total_epochs=args.epochs,
        scoring="history" if args.history else "forward",
        seed=0,
    )
    loader = tn.Loader(es_pipe.SelectStage(decoded, sampler))

    # 4. The trainer.
    model = ByteLM(args.window - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * -(-args.samples // args.meta_batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps + 1)
    held_out = load_tokens(corpus["val"])
    clock = {"data": 0.0, "score": 0.0, "stage": 0.0, "train": 0.0}
    for epoch in range(args.epochs):
        t = time.perf_counter()
        for meta in loader:  # one epoch
            now = time.perf_counter()
            clock["data"] += now - t
            losses = None
            if meta.needs_losses:  # a gradient-free pass over the meta-batch
                with torch.inference_mode():
                    losses = per_sample_loss(model, meta.data["tokens"])
            t = time.perf_counter()
            clock["score"] += t - now
            sub = meta.select(losses)  # b of B, drawn by ES weights
            now = time.perf_counter()
            clock["stage"] += now - t
            loss_each = per_sample_loss(model, sub.data["tokens"])
            optimizer.zero_grad()
            loss_each.mean().backward()
            optimizer.step()
            schedule.step()
            t = time.perf_counter()
            clock["train"] += t - now
            if args.history:
                sub.report(loss_each.detach())  # scores from the training losses
                clock["stage"] += time.perf_counter() - t
            t = time.perf_counter()
        with torch.inference_mode():
            val = per_sample_loss(model, held_out).mean().item()
        print(
            f"epoch {epoch + 1}: held-out loss {val:.4f} nats/byte "
            f"({sampler.step} steps, {sampler.store.held} samples scored)"
        )
    total = sum(clock.values())
    print("time: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.1f}%)" for k, v in clock.items()))
    print(
        f"ES stage (selection + score update): {1e3 * clock['stage'] / sampler.step:.2f} ms "
        f"per step, {100 * clock['stage'] / total:.2f}% of a training step"
    )


if __name__ == "__main__":
    main()
