"""Child process of the kill -9 suite (``test_faults_kill.py``).

A small real training run through es_pipe: real shards (WebDataset tar or Parquet, written
with ``es_pipe.shard_writer``; read in a seeded shard order and shuffled inside each shard),
a source with ``pruned=sampler.pruned``, the
``SelectStage`` stage under ``torchdata.nodes.Loader``, an ESWP sampler with Parquet
manifests, a tiny deterministic torch model, 3 epochs. It checkpoints every ``EVERY`` steps
(loader + sampler + model + optimizer, ``torch.save`` to a temporary file, fsync,
``os.replace``) and appends every step (meta-batch read, sub-batch trained, weights, loss)
to an fsync'd log, one file per attempt.

A kill spec ``target:n:mode`` makes the child SIGKILL itself at the ``n``-th call of
``target`` (``mode``: ``before`` the call, ``after`` it returns, or ``torn``: half of the
bytes written, then killed). The wrappers are installed here, in the child only; with
``census`` the child only counts the calls of every target and writes them out.

Run as ``python faults_child.py DATA RUN CONFIG SPEC ATTEMPT`` or through ``main`` (the
parent forks it from a pre-imported server: same code, no 2 s torch import per child).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from fsspec.implementations.local import LocalFileSystem

import es_pipe
from es_pipe.eswp import ESWP
from es_pipe.manifests import COMMITS, Manifests
from es_pipe.manifests.commit import Committer
from es_pipe.manifests.fs import ManifestFS
from es_pipe.sampler import Selector
from es_pipe.shard_writer import write_shards
from es_pipe.sources import ParquetSource, WebDatasetSource
from es_pipe.sources.base import ShardedSource
from es_pipe.stage import SelectStage

SIZES = [40, 33, 47, 26]  # samples per shard (uneven: short final meta-batches)
DIM = 8
B, b = 16, 6
EPOCHS = 3
EVERY = 4  # checkpoint every EVERY steps
SEED = 7

# config -> (shard format, scoring, shuffling inside shards)
CONFIGS = {
    "parquet": ("parquet", "forward", {"shuffle_rows": True}),
    "tar": ("tar", "history", {"shuffle_buffer": 8}),
}

# --------------------------------------------------------------------------- data


def features(shard: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(1000 + shard)
    x = gen.normal(size=(n, DIM)).astype(np.float32)
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.3 * gen.normal(size=n)) > 0).astype(np.int64)
    return x, y


def write_data(folder: str) -> dict[str, list[str]]:
    """Both shard sets, written with es_pipe's shard writer; returns format -> URLs."""
    urls: dict[str, list[str]] = {"parquet": [], "tar": []}
    for i, n in enumerate(SIZES):
        x, y = features(i, n)
        keys = [f"s{i}-{j:03d}" for j in range(n)]
        urls["parquet"] += write_shards(
            {"key": np.array(keys), "x": x, "y": y},
            f"{folder}/train{i}-%03d.parquet",
            "parquet",
            10_000,
            row_group_rows=8,
            index=False,
        )
        samples = [
            {"__key__": k, "x.bin": x[j].tobytes(), "cls": int(y[j])} for j, k in enumerate(keys)
        ]
        urls["tar"] += write_shards(
            samples, f"{folder}/train{i}-%03d.tar", "tar", 10_000, index=False
        )
    return urls


def shard_urls(data: str, fmt: str) -> list[str]:
    return [f"{data}/train{i}-000.{fmt}" for i in range(len(SIZES))]


# --------------------------------------------------------------------------- kill points


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, fsync, os.replace: never a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path + ".tmp"
    write_file(tmp, buffer.getvalue())
    replace_file(tmp, path)


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_file(src: str, dst: str) -> None:
    os.replace(src, dst)


_THIS = sys.modules[__name__]

# target -> (owner, attribute); "manifests.marker" is the _put of a commit marker
TARGETS: dict[str, tuple[Any, str]] = {
    # reading
    "source.next": (ShardedSource, "__next__"),
    "source.open": (ShardedSource, "_open_next"),
    "stage.next": (SelectStage, "next"),
    # selecting
    "sampler.select": (Selector, "select"),
    "sampler.observe": (Selector, "observe"),
    # checkpointing
    "ckpt.save": (_THIS, "save_checkpoint"),
    "ckpt.write": (_THIS, "write_file"),
    "ckpt.replace": (_THIS, "replace_file"),
    # committing
    "sampler.end_epoch": (Selector, "end_epoch"),
    "boundary.close_epoch": (ESWP, "close_epoch"),
    "manifests.write_shard": (Manifests, "write_shard"),
    "manifests._put": (ManifestFS, "put"),
    "manifests.finish": (Manifests, "finish"),
    "manifests.commit": (Manifests, "commit"),
    "manifests._publish": (Committer, "_publish"),
    "fs.rm": (LocalFileSystem, "rm"),
}
PSEUDO = {"manifests.marker": "manifests._put"}
CATEGORY = {
    "source": "reading",
    "stage": "reading",
    "sampler.select": "selecting",
    "sampler.observe": "selecting",
    "ckpt": "checkpointing",
}


def category(target: str) -> str:
    for prefix, name in CATEGORY.items():
        if target.startswith(prefix):
            return name
    return "committing"


def _torn(target: str, args: tuple, kwargs: dict) -> None:
    """Write half of the bytes the call would write, where it would write them; die."""
    if target == "ckpt.write":
        path, data = args
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        die()
    if target in ("manifests._put", "manifests.marker"):
        self, path, data = args
        if isinstance(self.fs, LocalFileSystem):
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            if kwargs.get("atomic"):  # what put writes first: its hidden temporary
                path = os.path.join(directory, f".{name}.{self.token}.tmp")
            with open(path, "wb") as handle:
                handle.write(memoryview(data)[: len(data) // 2])
        die()
    raise ValueError(f"no torn mode for {target}")


def install(spec: str | None) -> Counter:
    """Wrap every target: count its calls, and kill at the one ``spec`` names."""
    counts: Counter = Counter()
    lock = threading.Lock()
    kill_target, kill_n, mode = None, 0, "before"
    if spec and spec != "census":
        kill_target, n, mode = spec.split(":")
        kill_n = int(n)

    def hit(name: str) -> bool:
        with lock:
            counts[name] += 1
            return name == kill_target and counts[name] == kill_n

    def wrap(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            hits = [hit(name)]
            if name == "manifests._put" and f"/{COMMITS}/" in args[1]:
                hits.append(hit("manifests.marker"))
            mine = any(hits)
            if mine and mode == "before":
                die()
            if mine and mode == "torn":
                _torn(kill_target, args, kwargs)
            result = original(*args, **kwargs)
            if mine and mode == "after":
                die()
            return result

        return wrapper

    for name, (owner, attr) in TARGETS.items():
        setattr(owner, attr, wrap(name, getattr(owner, attr)))
    return counts


# --------------------------------------------------------------------------- the run


def decode(sample: dict) -> dict:
    return {
        "x": torch.from_numpy(np.frombuffer(sample["x.bin"], np.float32).copy()),
        "y": int(sample["cls"]),
        "__key__": sample["__key__"],
        "__shard__": sample["__shard__"],
        "__index__": sample["__index__"],
    }


def names(data: dict) -> list[list[str]]:
    """``[shard file name, key]`` of every sample of a collated batch."""
    shards = [os.path.basename(s) for s in data["__shard__"]]
    return [[s, k] for s, k in zip(shards, data["__key__"])]


def hexes(values: torch.Tensor | None) -> list[str] | None:
    return None if values is None else [float(v).hex() for v in values.tolist()]


def train(data: str, run: str, config: str, attempt: int) -> None:
    fmt, scoring, inside = CONFIGS[config]
    torch.set_num_threads(1)
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
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5, anneal=0), manifests=f"{run}/manifests"),
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
    loader = tn.Loader(SelectStage(node, sampler))

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

    append({"resume": steps})
    while True:
        it = iter(loader)  # applies a loaded checkpoint; may close the epoch it ended in
        if sampler.epoch >= EPOCHS:
            break
        for meta in it:
            x, y = meta.data["x"], meta.data["y"]
            epoch = sampler.epoch
            if scoring == "forward":
                with torch.no_grad():
                    scored = F.cross_entropy(model(x), y, reduction="none")
                sub = meta.select(scored)
            else:
                sub = meta.select(None)
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
                    "phase": sub.phase,
                    "read": names(meta.data),
                    "trained": names(sub.data),
                    "weights": hexes(sub.weights),
                    "loss": float(loss.detach().mean()).hex(),
                }
            )
            if steps % EVERY == 0:
                save_checkpoint(
                    ckpt,
                    {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "loader": loader.state_dict(),
                        "sampler": sampler.state_dict(),
                        "steps": steps,
                    },
                )
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


def main(data: str, run: str, config: str, spec: str | None, attempt: int) -> int:
    """One child: install the kill point (or the census), train to the end or to the kill."""
    try:
        counts = install(spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(data, run, config, attempt)
        messages = [str(w.message) for w in caught]
        Path(f"{run}/warnings.{attempt}.json").write_text(json.dumps(messages))
        if spec == "census":
            Path(f"{run}/census.json").write_text(json.dumps(dict(counts), sort_keys=True))
        return 0
    except BaseException:
        Path(f"{run}/error.{attempt}.txt").write_text(traceback.format_exc())
        return 1


def warm() -> None:
    """One small run of each configuration, in a temporary folder: the modules torch and
    pandas import lazily on a first optimizer step, save or read are then imported once,
    in the server the children are forked from, not once per child."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_data(folder)
        for config in CONFIGS:
            os.makedirs(f"{folder}/{config}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(folder, f"{folder}/{config}", config, 0)


if os.environ.pop("ES_PIPE_FAULTS_WARM", None) == "1":
    warm()


def entry(data: str, run: str, config: str, spec: str | None, attempt: int) -> None:
    """multiprocessing target: exit with main's code."""
    os._exit(main(data, run, config, spec, attempt))


if __name__ == "__main__":
    spec_arg = sys.argv[4] if sys.argv[4] != "-" else None
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], spec_arg, int(sys.argv[5])))
