"""Benchmark tasks for the harness: Fashion-MNIST (clean or with corrupted labels) and the
byte-level LM of ``es-pipe demo``."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from es_pipe.demo import harness

FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
NOISE_SEED = 12345
VAL_SIZE = 5000  # the last 5,000 training images: the validation split for tuning


class MissingDataset(SystemExit):
    pass


def load_fmnist(split: str, root: Path = FMNIST_DIR) -> tuple[Tensor, Tensor]:
    """Images (float, normalised, [n, 1, 28, 28]) and labels of ``train`` or ``t10k``."""
    images, labels = root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise MissingDataset(
            f"Fashion-MNIST is not installed ({images} is missing). Install it with:\n"
            "    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
            "(or `make bench`, which does this for you)"
        )
    with gzip.open(images) as fx, gzip.open(labels) as fy:
        x = np.frombuffer(fx.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        y = np.frombuffer(fy.read(), np.uint8, offset=8)
    x = (torch.from_numpy(x.copy()).float() / 255.0 - 0.2860) / 0.3530
    return x, torch.from_numpy(y.copy()).long()


def corrupt(labels: Tensor, fraction: float, seed: int = NOISE_SEED) -> Tensor:
    """Replace ``fraction`` of the labels, chosen with a fixed seed, by a different class
    drawn uniformly (symmetric label noise)."""
    rng = np.random.default_rng(seed)
    out = labels.clone()
    picked = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    shift = torch.from_numpy(rng.integers(1, 10, size=len(picked)))
    out[picked] = (labels[picked] + shift) % 10
    return out


class SmallCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
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


class IndexEpochs:
    """Every ``iter()`` is one epoch: sample dicts carrying only their identity, in an
    order reshuffled by ``(seed, epoch)``; the collate function fetches the tensors."""

    def __init__(self, n: int, name: str, seed: int) -> None:
        self.n, self.name, self.seed, self.epoch = n, name, seed, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        self.epoch += 1
        return ({"__key__": str(i), "__shard__": self.name, "__index__": int(i)} for i in order)


def fmnist_task(
    *, train_samples: int = 10000, noise: float = 0.0, evaluate_on: str = "test"
) -> harness.Task:
    """A small CNN on a subset of Fashion-MNIST's first 55,000 training images; the held-out
    metric is accuracy on the 10,000 test images (``evaluate_on="test"``) or on the
    5,000-image validation split cut from the end of the training set (``"val"``: for
    choosing hyper-parameters). With ``noise``, that fraction of training and validation
    labels is corrupted (fixed seed); test labels stay clean."""
    x, y = load_fmnist("train")
    if noise:
        y = corrupt(y, noise)
    if train_samples > len(x) - VAL_SIZE:
        raise SystemExit(f"--train-samples at most {len(x) - VAL_SIZE}")
    train_x, train_y = x[:train_samples], y[:train_samples]
    if evaluate_on == "val":
        held_x, held_y = x[-VAL_SIZE:], y[-VAL_SIZE:]
    else:
        held_x, held_y = load_fmnist("t10k")

    def collate(samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        idx = torch.tensor([s["__index__"] for s in samples])
        return {"x": train_x[idx], "y": train_y[idx]}

    def sample_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")

    def evaluate(model: nn.Module) -> float:
        hits = sum(
            int((model(xs).argmax(1) == ys).sum())
            for xs, ys in zip(held_x.split(1000), held_y.split(1000))
        )
        return hits / len(held_y)

    name = "fmnist" + (f"-noisy{round(noise * 100)}" if noise else "")
    return harness.Task(
        name=name,
        make_model=lambda seed: SmallCNN(),
        make_source=lambda seed, pruned: IndexEpochs(train_samples, name, seed),
        sample_losses=sample_losses,
        evaluate=evaluate,
        n_train=train_samples,
        metric=f"{evaluate_on}_acc",
        higher_is_better=True,
        collate_fn=collate,
    )


def lm_task(out: Path, *, samples: int, window: int, val_samples: int = 512) -> harness.Task:
    """The demo's byte-level LM on Python stdlib shards written under ``out``."""
    from es_pipe.demo import build_corpus
    from es_pipe.demo import lm_task as make

    corpus = build_corpus(out, samples=samples, val_samples=val_samples, window=window)
    return make(corpus)
