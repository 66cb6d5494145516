"""Evolved Sampling over LitData chunks (``litdata.optimize``), with ``from_litdata``.

``litdata.StreamingDataset`` yields bare items: no identity for the scores to follow, and a
``state_dict`` that only litdata's own loader can call. ``from_litdata`` takes the same
arguments and adds ``__shard__`` (the chunk file), ``__index__`` (the item's ordinal in it)
and ``__key__``, stable across workers, shuffling, epochs and resumes; its ``state_dict()``
works under the stage. DataLoader workers: ``litdata_loader(ds, num_workers=N)`` (litdata's
``StreamingDataLoader`` handing over single items, resuming through litdata's own state).

Install litdata without torchvision (which would replace a CPU torch):
``pip install 'es_pipe[litdata]' && pip install --no-deps litdata==0.2.76`` (``make`` does).

Run:  python examples/litdata_es.py [--samples 4000 --epochs 3 --workers 2]
(offline: it writes small synthetic chunks to a temporary folder first).
"""

from __future__ import annotations

import argparse
import tempfile

import litdata
import numpy as np
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from torch import nn

import es_pipe
from es_pipe.litdata_source import from_litdata, litdata_loader


def sample(i: int) -> dict[str, object]:
    """One synthetic 2-class sample with 16 features (``optimize`` calls it per input)."""
    rng = np.random.default_rng(i)
    label = int(rng.integers(2))
    x = rng.normal(size=16).astype(np.float32) + (0.4 if label else -0.4)
    return {"x": x, "label": label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="0: read in this process")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def make() -> tuple[es_pipe.Selector, object]:
        sampler = es_pipe.Selector(
            es_pipe.Evolved(beta1=0.2, beta2=0.8), meta_batch_size=128, batch_size=32
        )
        ds = from_litdata(folder, shuffle=True, seed=0)  # + key_field="id" for your own ids
        upstream = litdata_loader(ds, num_workers=args.workers) if args.workers else ds
        return sampler, tn.Loader(es_pipe.SelectStage(upstream, sampler))  # the ES stage, last

    def step(meta: es_pipe.MetaBatch) -> int:
        with torch.inference_mode():
            losses = F.cross_entropy(model(meta.data["x"]), meta.data["label"], reduction="none")
        sub = meta.select(losses)
        loss = F.cross_entropy(model(sub.data["x"]), sub.data["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(sub)

    with tempfile.TemporaryDirectory() as folder:
        litdata.optimize(
            fn=sample,
            inputs=list(range(args.samples)),
            output_dir=folder,
            chunk_bytes="64KB",
            num_workers=1,
            start_method="fork",  # litdata's default, spawn, would also apply to the workers
        )
        sampler, loader = make()
        for epoch in range(args.epochs):
            trained = sum(step(meta) for meta in loader)
            print(
                f"epoch {epoch + 1}: trained on {trained} of {args.samples} samples, "
                f"{sampler.store.held} samples scored"
            )

        # Checkpoint in the middle of an epoch, resume "in a new process": the same
        # meta-batches follow. Save the loader's and the sampler's state with your model.
        sampler, loader = make()
        it = iter(loader)
        for _ in range(3):
            step(next(it))
        state = {"loader": loader.state_dict(), "scores": sampler.state_dict()}
        expected = next(it)
        sampler, loader = make()
        loader.load_state_dict(state["loader"])
        sampler.load_state_dict(state["scores"])
        first = next(iter(loader))
        same = list(zip(first.data["__shard__"], first.keys)) == list(
            zip(expected.data["__shard__"], expected.keys)
        )
        chunk = first.data["__shard__"][0].rsplit("/", 1)[-1]
        print(
            f"resumed at {chunk} item {int(first.data['__index__'][0])}: "
            f"same as uninterrupted: {same}"
        )


if __name__ == "__main__":
    main()
