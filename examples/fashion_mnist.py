"""Fashion-MNIST image classification with Evolved Sampling: a small CNN on CPU.

Needs the dataset package (offline, about 30 MB):

    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist

Run:  python examples/fashion_mnist.py                          # ES, 3 epochs, 20k images
      python examples/fashion_mnist.py --method uniform         # plain training, to compare
      python examples/fashion_mnist.py --method es-history      # no extra scoring pass
      python examples/fashion_mnist.py --train-samples 2000 --epochs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from torch import nn

import es_pipe

ROOT = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IDX files: images at byte offset 16, labels at byte offset 8, gzip-compressed."""
    images, labels = ROOT / f"{split}-images-idx3-ubyte.gz", ROOT / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists():
        sys.exit(
            f"Fashion-MNIST not found at {ROOT}. Install it with:\n"
            "    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
        )
    with gzip.open(images) as fx, gzip.open(labels) as fy:
        x = np.frombuffer(fx.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        y = np.frombuffer(fy.read(), np.uint8, offset=8)
    return torch.from_numpy(x.copy()).float().div(255).sub(0.286).div(0.353), torch.from_numpy(
        y.astype(np.int64)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["es", "es-history", "uniform"], default="es")
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="b: trained per step")
    parser.add_argument("--meta-batch-size", type=int, default=128, help="B: scored per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_x, train_y = load("train")
    train_x, train_y = train_x[: args.train_samples], train_y[: args.train_samples]
    test_x, test_y = load("t10k")

    # Samples only need a stable identity; the collate function fetches the pixels.
    def epoch_of_samples():
        for i in torch.randperm(len(train_x)).tolist():
            yield {"__key__": str(i), "__shard__": "fmnist-train", "__index__": i}

    class Epochs:  # every iter() is a fresh, reshuffled epoch
        def __iter__(self):
            return epoch_of_samples()

    def collate(samples):
        idx = torch.tensor([s["__index__"] for s in samples])
        return train_x[idx], train_y[idx]

    if args.method == "uniform":  # plain training: the stage passes every sample through
        b = args.batch_size
        sampler = es_pipe.Selector(es_pipe.Uniform(), meta_batch_size=b, batch_size=b)
    else:
        sampler = es_pipe.Selector(
            es_pipe.Evolved(beta1=0.2, beta2=0.8),
            args.meta_batch_size,
            args.batch_size,
            burn_in=es_pipe.Epochs(0.1 * args.epochs),
            anneal=es_pipe.Epochs(0.1 * args.epochs),
            total_epochs=args.epochs,
            scoring="history" if args.method == "es-history" else "forward",
        )
    loader = tn.Loader(es_pipe.SelectStage(Epochs(), sampler, collate_fn=collate))

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = args.epochs * -(-len(train_x) // sampler.meta_batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps + 1)
    trained = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for meta in loader:
            losses = None
            if meta.needs_losses:
                model.eval()
                with torch.inference_mode():
                    x, y = meta.data
                    losses = F.cross_entropy(model(x), y, reduction="none")
            sub = meta.select(losses)
            model.train()
            x, y = sub.data
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            optimizer.zero_grad()
            per_sample.mean().backward()
            optimizer.step()
            schedule.step()
            if sampler.scoring == "history":
                sub.report(per_sample.detach())
            trained += len(sub)
        model.eval()
        with torch.inference_mode():
            acc = (model(test_x).argmax(1) == test_y).float().mean().item()
        print(
            f"epoch {epoch + 1}: test accuracy {acc:.4f}, {trained} samples back-propagated, "
            f"{time.perf_counter() - start:.1f} s"
        )


if __name__ == "__main__":
    main()
