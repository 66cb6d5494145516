"""Insert the ES stage into an existing webdataset pipeline: ``es_pipe.SelectStage``, last.

The stage goes last, in the trainer's process: it needs the trainer's losses. Everything
before it (shard listing, tar reading, decoding) is your pipeline, unchanged. The one thing
to add is the sample's identity: webdataset gives ``__key__`` and ``__url__``; name the
shard ``__shard__`` so that scores follow (shard, key) across epochs.

Run:  python examples/webdataset_pipeline.py [--samples 4000 --epochs 3]
(it writes a few small synthetic shards to a temporary folder first).
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
import webdataset as wds
from torch import nn

import es_pipe


def write_shards(folder: Path, samples: int, per_shard: int = 1000) -> list[str]:
    """Synthetic 2-class data, 32 float32 features per sample, as raw bytes (no pickle)."""
    rng = np.random.default_rng(0)
    urls = []
    for start in range(0, samples, per_shard):
        url = str(folder / f"part-{start // per_shard:04d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(start, min(samples, start + per_shard)):
                label = int(rng.integers(2))
                x = rng.normal(size=32).astype(np.float32) + (0.5 if label else -0.5)
                sink.write({"__key__": f"{i:06d}", "x.bin": x.tobytes(), "cls": str(label)})
        urls.append(url)
    return urls


def decode(sample: dict) -> dict:
    return {
        "__key__": sample["__key__"],
        "__shard__": sample["__url__"],  # the shard: scores follow (shard, key)
        "x": torch.frombuffer(bytearray(sample["x.bin"]), dtype=torch.float32),
        "y": int(sample["cls"]),
    }


def select_stage(samples, sampler: es_pipe.Selector) -> tn.Loader:
    """The pipeline's last step: the ES stage over the samples of one epoch."""
    return tn.Loader(es_pipe.SelectStage(samples, sampler))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(beta1=0.2, beta2=0.8), meta_batch_size=128, batch_size=32
    )
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    with tempfile.TemporaryDirectory() as folder:
        urls = write_shards(Path(folder), args.samples)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.shuffle(100),  # shard order
            wds.tarfile_to_samples(),
            wds.shuffle(1000),
            wds.map(decode),
            partial(select_stage, sampler=sampler),  # <- the ES stage, last
        )
        for epoch in range(args.epochs):
            trained = correct = 0
            for meta in pipeline:  # one epoch per iteration of the pipeline
                with torch.inference_mode():
                    losses = F.cross_entropy(
                        model(meta.data["x"]), meta.data["y"], reduction="none"
                    )
                sub = meta.select(losses)
                logits = model(sub.data["x"])
                loss = F.cross_entropy(logits, sub.data["y"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                trained += len(sub)
                correct += int((logits.argmax(1) == sub.data["y"]).sum())
            print(
                f"epoch {epoch + 1}: trained on {trained} of {args.samples} samples, "
                f"train accuracy on them {correct / trained:.3f}, "
                f"{sampler.store.held} samples scored"
            )


if __name__ == "__main__":
    main()
