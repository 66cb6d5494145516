"""Evolved Sampling over a Hugging Face ``datasets`` stream, with ``es_pipe.from_hf``.

``load_dataset("parquet", data_files=..., streaming=True)`` gives examples without an
identity: no file name, and ``map(with_indices=True)`` counts per worker and per epoch, so
the scores of different samples would pile onto one key. ``es_pipe.from_hf`` takes the same
arguments and adds ``__shard__`` (the file), ``__index__`` (the row in it) and ``__key__``
(the row, or ``key_column``), which stay the same across workers, epochs, ``shuffle()`` and
resumes. Resume mid-epoch through HF's own ``state_dict()`` / ``load_state_dict()``.

Run:  python examples/hf_datasets.py [--samples 4000 --epochs 3]
(offline: it writes a few small synthetic Parquet files to a temporary folder first).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from torch import nn

import es_pipe


def write_files(folder: Path, samples: int, per_file: int = 500) -> str:
    """Synthetic 2-class data, 16 features per sample, in Parquet files; returns a glob."""
    rng = np.random.default_rng(0)
    for start in range(0, samples, per_file):
        n = min(per_file, samples - start)
        y = rng.integers(2, size=n)
        x = rng.normal(size=(n, 16)).astype(np.float32) + np.where(y[:, None] == 1, 0.4, -0.4)
        table = pa.table({"x": list(x), "label": y})
        pq.write_table(table, folder / f"train-{start // per_file:04d}.parquet")
    return str(folder / "train-*.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(beta1=0.2, beta2=0.8), meta_batch_size=128, batch_size=32
    )

    with tempfile.TemporaryDirectory() as folder:
        files = write_files(Path(folder), args.samples)
        # the one line: load_dataset("parquet", data_files=files, streaming=True) + identity
        ds = es_pipe.from_hf("parquet", data_files=files)
        ds = ds.shuffle(seed=0, buffer_size=256).with_format("torch")
        loader = tn.Loader(es_pipe.SelectStage(ds, sampler))  # the ES stage, last
        for epoch in range(args.epochs):
            ds.set_epoch(epoch)  # HF reshuffles files and buffer; identities stay
            trained = 0
            for meta in loader:
                with torch.inference_mode():
                    losses = F.cross_entropy(
                        model(meta.data["x"]), meta.data["label"], reduction="none"
                    )
                sub = meta.select(losses)
                loss = F.cross_entropy(model(sub.data["x"]), sub.data["label"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                trained += len(sub)
            print(
                f"epoch {epoch + 1}: trained on {trained} of {args.samples} samples, "
                f"{sampler.store.held} samples scored"
            )

        # Resume mid-stream through HF's own state_dict (save it with your checkpoint).
        stream = es_pipe.from_hf("parquet", data_files=files)
        it = iter(stream)
        for _ in range(args.samples // 3):
            next(it)
        state = stream.state_dict()
        expected = next(it)
        restarted = es_pipe.from_hf("parquet", data_files=files)  # a new process would
        restarted.load_state_dict(state)
        first = next(iter(restarted))
        same = (first["__shard__"], first["__index__"]) == (
            expected["__shard__"],
            expected["__index__"],
        )
        name = Path(first["__shard__"]).name
        print(f"resumed at {name} row {first['__index__']}: same as uninterrupted: {same}")


if __name__ == "__main__":
    main()
