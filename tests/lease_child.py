"""Child process of ``test_manifest_lease.py``: one training job on a manifests folder.

A small model trained through es_pipe's stage on real Parquet shards, ESWP with manifests
(resuming after the newest committed epoch when the folder holds this run's epochs), a
little slower than it needs to be (``--sleep`` seconds per step) so that the parent can
start a second job, SIGSTOP or SIGKILL this one while it trains. Once it holds the folder
(the sampler has started) it writes ``ready`` to ``--log``, then ``epoch step`` after every
step; before every step it waits while the file ``--pause`` exists (the parent's way to
hold it mid-epoch, never inside a commit). The outcome goes to ``--out`` as JSON: ``ok``,
or the error's type and message (an es_pipe error is an expected outcome: exit 3).

    python lease_child.py --data DIR --root ROOT --out OUT.json --log LOG [--epochs 4]
        [--sleep 0.02] [--lease-timeout 600] [--takeover] [--pause FILE]

The attempt id comes from ``ES_PIPE_ATTEMPT`` (the parent names each job).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import torchdata.nodes as tn

import es_pipe
from es_pipe.sources import ParquetSource

SHARDS, ROWS, DIM = 3, 40, 8


def write_data(folder: str) -> list[str]:
    """The job's shards: 3 Parquet files of 40 rows (written once by the parent)."""
    gen = np.random.default_rng(0)
    urls = []
    for s in range(SHARDS):
        x = gen.normal(size=(ROWS, DIM)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        path = os.path.join(folder, f"train-{s}.parquet")
        table = pa.table({"key": [f"s{s}-{i:03d}" for i in range(ROWS)], "x": list(x), "y": y})
        pq.write_table(table, path, row_group_size=8)
        urls.append(path)
    return urls


def urls(folder: str) -> list[str]:
    return [os.path.join(folder, f"train-{s}.parquet") for s in range(SHARDS)]


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manifests = es_pipe.Manifests(
        args.root, lease_timeout=args.lease_timeout, takeover=args.takeover
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eswp = es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5, anneal=0), manifests=manifests)
        sampler = es_pipe.Selector(
            es_pipe.Evolved(), 16, 8, total_epochs=args.epochs, seed=5, eswp=eswp
        )
        sampler.start()  # claims the folder (the first iter(loader) would, too)
    started = sampler.epoch
    source = ParquetSource(urls(args.data), key_column="key", pruned=sampler.pruned)
    loader = tn.Loader(es_pipe.SelectStage(source, sampler))
    with open(args.log, "a") as log:
        log.write("ready\n")
        log.flush()
        while sampler.epoch < args.epochs:
            for meta in loader:
                while args.pause and os.path.exists(args.pause):
                    time.sleep(0.01)
                with torch.no_grad():
                    scored = F.cross_entropy(
                        model(meta.data["x"]), meta.data["y"], reduction="none"
                    )
                sub = meta.select(scored)
                loss = F.cross_entropy(model(sub.data["x"]), sub.data["y"], reduction="none")
                opt.zero_grad()
                (loss * sub.weights if sub.weights is not None else loss).mean().backward()
                opt.step()
                log.write(f"{sampler.epoch} {sampler.step}\n")
                log.flush()
                time.sleep(args.sleep)
    return {
        "ok": True,
        "attempt": manifests.attempt,
        "started_at_epoch": started,
        "warnings": [str(w.message) for w in caught],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.02)
    p.add_argument("--lease-timeout", type=float, default=600.0)
    p.add_argument("--takeover", action="store_true")
    p.add_argument("--pause", help="wait before each step while this file exists")
    args = p.parse_args()
    try:
        result = train(args)
        code = 0
    except es_pipe.EsPipeError as exc:
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        code = 3
    except BaseException as exc:
        result = {"ok": False, "error": type(exc).__name__, "trace": traceback.format_exc()}
        code = 1
    result["pid"] = os.getpid()
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(args.out + ".tmp", args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
