"""Child process of the random-time kill -9 harness (``test_faults_killtime.py``).

A small real training run through es_pipe, like ``faults_child.py``'s (the same shards,
written by ``es_pipe.shard_writer``: 4 shards of uneven sizes, so epochs end on short
meta-batches), but nothing inside it knows when it dies: the parent SIGKILLs it at random
wall-clock times. Three configurations:

- ``parquet``: Parquet shards (rows shuffled inside each shard), forward scoring, manifests;
- ``tar``: WebDataset tar shards (a shuffle buffer), history scoring, ESWP, manifests;
- ``eswp``: Parquet shards, forward scoring, ESWP with 1/keep rescaling, ``reweight=True``,
  manifests.

It checkpoints (model, optimizer, ``tn.Loader`` state, score table; ``torch.save`` to a
temporary file, fsync, ``os.replace``) every ``EVERY`` steps, right after the last
``select()`` of an epoch whose final meta-batch is short, and after every epoch's
``for meta in loader`` loop ends. Every step is appended to an fsync'd log, one per
attempt: step, epoch, the keys read and selected, weights and loss (bit for bit), and the
wall-clock time it was logged (the parent uses it to time kills; it is not compared).

Run through ``entry`` (forked from the parent's pre-imported forkserver).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchdata.nodes as tn

import es_pipe
from es_pipe.sources import ParquetSource, WebDatasetSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faults_child import DIM, decode, hexes, names, shard_urls, write_data

B, b = 16, 6
EPOCHS = 3
EVERY = 3  # checkpoint every EVERY steps (and at the ends of epochs)
SEED = 11

# config -> (shard format, scoring, pruning ratio or None, reweight, shuffling inside shards)
CONFIGS: dict[str, tuple[str, str, float | None, bool, dict[str, Any]]] = {
    "parquet": ("parquet", "forward", None, False, {"shuffle_rows": True}),
    "tar": ("tar", "history", 0.3, False, {"shuffle_buffer": 8}),
    "eswp": ("parquet", "forward", 0.5, True, {"shuffle_rows": True}),
}


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, fsync, os.replace: never a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def build(data: str, run: str, config: str) -> tuple[Any, Any, Any, Any]:
    fmt, scoring, ratio, reweight, inside = CONFIGS[config]
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(beta1=0.2, beta2=0.8),
        B,
        b,
        total_epochs=EPOCHS,
        seed=SEED,
        scoring=scoring,
        reweight=reweight,
        eswp=es_pipe.ESWP(
            prune=None if ratio is None else es_pipe.Pruning(ratio=ratio, anneal=0),
            manifests=f"{run}/manifests",
        ),
        rank=0,
        world_size=1,
    )
    urls = shard_urls(data, fmt)
    common = {"shuffle": True, "seed": SEED, "rank": 0, "world_size": 1, "pruned": sampler.pruned}
    common.update(inside)
    if fmt == "parquet":
        node = ParquetSource(urls, key_column="key", columns=["x", "y"], batch_rows=8, **common)
    else:
        node = tn.Mapper(WebDatasetSource(urls, **common), decode)
    loader = tn.Loader(es_pipe.SelectStage(node, sampler))
    return model, opt, sampler, loader


def train(data: str, run: str, config: str, attempt: int) -> None:
    scoring = CONFIGS[config][1]
    torch.set_num_threads(1)
    model, opt, sampler, loader = build(data, run, config)
    ckpt = f"{run}/ckpt.pt"
    steps = 0
    if os.path.exists(ckpt):
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        loader.load_state_dict(saved["loader"])
        sampler.load_state_dict(saved["sampler"])
        steps = saved["steps"]
    log = os.open(f"{run}/log.{attempt}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(record: dict) -> None:
        os.write(log, (json.dumps(record) + "\n").encode())
        os.fsync(log)

    def checkpoint(kind: str, loader_state: dict | None = None) -> None:
        save_checkpoint(
            ckpt,
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "loader": loader.state_dict() if loader_state is None else loader_state,
                "sampler": sampler.state_dict(),
                "steps": steps,
                "kind": kind,
            },
        )

    append({"resume": steps, "t": time.time()})
    while True:
        it = iter(loader)  # applies a loaded checkpoint; may close the epoch it ended in
        if sampler.epoch >= EPOCHS:
            break
        epoch = sampler.epoch
        for meta in it:
            x, y = meta.data["x"], meta.data["y"]
            if scoring == "forward":
                with torch.no_grad():
                    scored = F.cross_entropy(model(x), y, reduction="none")
                sub = meta.select(scored)
            else:
                sub = meta.select(None)
            short = len(meta) < B  # the epoch's final meta-batch, short
            after_select = loader.state_dict() if short else None  # right after select()
            per = F.cross_entropy(model(sub.data["x"]), sub.data["y"], reduction="none")
            if scoring == "history":
                sub.report(per.detach())
            loss = per if sub.weights is None else per * sub.weights
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            steps += 1
            append(
                {
                    "n": steps,
                    "epoch": epoch,
                    "step": sub.step,
                    "read": names(meta.data),
                    "trained": names(sub.data),
                    "weights": hexes(sub.weights),
                    "loss": float(loss.detach().mean()).hex(),
                    "t": time.time(),
                }
            )
            if short:
                checkpoint("short", after_select)
            elif steps % EVERY == 0:
                checkpoint("every")
        checkpoint("end")  # after the epoch's loop ended
    final = {
        "model": model.state_dict(),
        "scores": {
            os.path.basename(name): {
                column: torch.from_numpy(np.ascontiguousarray(values))
                for column, values in sampler.store.shard(name).items()
            }
            for name in sampler.store.shards
        },
        "steps": steps,
    }
    torch.save(final, f"{run}/final.pt")
    os.close(log)


def main(data: str, run: str, config: str, attempt: int) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # re-committing an epoch after a kill is expected
            train(data, run, config, attempt)
        return 0
    except BaseException:
        Path(f"{run}/error.{attempt}.txt").write_text(traceback.format_exc())
        return 1


def entry(data: str, run: str, config: str, attempt: int) -> None:
    """multiprocessing target: exit with main's code."""
    os._exit(main(data, run, config, attempt))


def warm() -> None:
    """One run of each configuration in a temporary folder, in the forkserver: what torch
    and pandas import lazily is imported once, not once per child."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_data(folder)
        for config in CONFIGS:
            os.makedirs(f"{folder}/{config}")
            main(folder, f"{folder}/{config}", config, 0)


if os.environ.pop("ES_PIPE_KILLTIME_WARM", None) == "1":
    warm()
