"""The demo's task: a byte-level language model on the Python standard library.

Every machine running es_pipe has this corpus. Its source files (``sysconfig``'s stdlib,
site-packages left out) become WebDataset tar shards of fixed-length byte windows, whole
files held out for validation; a small transformer learns next-byte prediction. The demo,
the benchmarks and the examples share these parts.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from torch import Tensor, nn

from es_pipe.demo import harness
from es_pipe.sources import WebDatasetSource

SHARD_SIZE = 1024  # samples per tar shard


# --------------------------------------------------------------------------- corpus


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, site-packages and dist-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _windows(files: Sequence[Path], window: int) -> list[bytes]:
    out: list[bytes] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        out.extend(data[i : i + window] for i in range(0, len(data) - window + 1, window))
    return out


def build_corpus(
    out: Path,
    *,
    samples: int,
    val_samples: int,
    window: int,
    seed: int = 0,
    shard_size: int = SHARD_SIZE,
) -> dict[str, Any]:
    """Write ``train-*.tar`` and ``val-*.tar`` shards of ``window``-byte samples under
    ``out``; one file in ten (by a hash of its path) is held out for validation. Reuses
    shards written earlier with the same parameters. ``meta["train_counts"]`` holds the
    shards' sample counts."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"samples": samples, "val_samples": val_samples, "window": window, "seed": seed}
    spec["shard_size"] = shard_size
    index = out / "corpus.json"
    if index.exists():
        known = json.loads(index.read_text())
        if known.get("spec") == spec and all(Path(u).exists() for u in known["train"]):
            return known
    import webdataset as wds

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    held = [zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0 for p in files]
    splits = {
        "train": (_windows([f for f, h in zip(files, held) if not h], window), samples),
        "val": (_windows([f for f, h in zip(files, held) if h], window), val_samples),
    }
    rng = np.random.default_rng(seed)
    meta: dict[str, Any] = {"spec": spec, "root": str(root), "files": len(files)}
    for old in out.glob("*.tar"):
        old.unlink()
    for split, (pool, wanted) in splits.items():
        if wanted > len(pool):
            raise SystemExit(
                f"es-pipe demo: asked for {wanted} {split} windows of {window} bytes, the "
                f"standard library has {len(pool)}; lower --samples or --window"
            )
        chosen = rng.choice(len(pool), size=wanted, replace=False)
        urls, counts = [], []
        for start in range(0, wanted, shard_size):
            url = out / f"{split}-{start // shard_size:05d}.tar"
            members = chosen[start : start + shard_size]
            with wds.TarWriter(str(url)) as sink:
                for i in members:
                    sink.write({"__key__": f"{int(i):08d}", "bin": pool[int(i)]})
            urls.append(str(url))
            counts.append(len(members))
        meta[split] = urls
        meta[f"{split}_counts"] = counts
        meta[f"{split}_pool"] = len(pool)
    index.write_text(json.dumps(meta, indent=1))
    return meta


# --------------------------------------------------------------------------- reading


def read_shards(urls: Sequence[str], seed: int = 0, pruned: Any = None) -> WebDatasetSource:
    """The demo's shards as a source: shard order and order within a shard (a seeded
    buffer) reshuffled every epoch; ESWP's pruned samples skipped before decoding."""
    return WebDatasetSource(list(urls), shuffle=True, seed=seed, shuffle_buffer=256, pruned=pruned)


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw bytes -> a tensor of byte values (the model's tokens)."""
    tokens = torch.frombuffer(bytearray(sample["bin"]), dtype=torch.uint8).long()
    return {k: sample[k] for k in ("__key__", "__shard__", "__index__")} | {"tokens": tokens}


def load_tokens(urls: Sequence[str]) -> Tensor:
    """All samples of ``urls`` as one ``[n, window]`` tensor (the held-out set)."""
    every = WebDatasetSource(list(urls), rank=0, world_size=1)  # on every rank, all of it
    return torch.stack([decode(s)["tokens"] for s in every])


# --------------------------------------------------------------------------- model


class ByteLM(nn.Module):
    """A small causal transformer over bytes (vocabulary 256)."""

    mask: Tensor

    def __init__(self, window: int, d_model: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.position = nn.Parameter(torch.randn(window, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(window))

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def sample_losses(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Mean next-byte cross-entropy (nats/byte) of every sample."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="none")
    return loss.view(tokens.shape[0], -1).mean(1)


def lm_task(corpus: dict[str, Any], *, d_model: int = 64, layers: int = 2) -> harness.Task:
    """The byte-level LM on the demo shards as a harness task."""
    window = corpus["spec"]["window"]
    held_out = load_tokens(corpus["val"])

    def evaluate(model: nn.Module) -> float:
        losses = [sample_losses(model, {"tokens": part}) for part in held_out.split(256)]
        return float(torch.cat(losses).mean())

    return harness.Task(
        name="stdlib-lm",
        make_model=lambda seed: ByteLM(window - 1, d_model, layers),
        make_source=lambda seed, pruned: tn.Mapper(
            read_shards(corpus["train"], seed, pruned), decode
        ),
        sample_losses=sample_losses,
        evaluate=evaluate,
        n_train=corpus["spec"]["samples"],
        metric="val_loss",
        higher_is_better=False,
    )


# --------------------------------------------------------------------------- cli
