"""The coming epoch's length is known before it starts, pruning included: what a
learning-rate schedule needs when ESWP shortens epochs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn

import es_pipe
from es_pipe.sources import ParquetSource

SHARDS, ROWS, B = 3, 40, 8


@pytest.fixture()
def shards(tmp_path):
    urls = []
    for s in range(SHARDS):
        url = str(tmp_path / f"part-{s}.parquet")
        pq.write_table(pa.table({"x": np.arange(ROWS, dtype=np.float32) + 100 * s}), url)
        urls.append(url)
    return urls


@pytest.mark.parametrize("scoring", ["forward", "history"])
def test_epoch_plan_matches_the_epoch_that_follows(shards, scoring):
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        B,
        B if scoring == "history" else B // 2,
        scoring=scoring,
        total_epochs=4,
        seed=3,
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.6, anneal=0.25)),
    )
    source = ParquetSource(shards, pruned=sampler.pruned, seed=1)
    stage = es_pipe.SelectStage(source, sampler)
    loader = tn.Loader(stage)
    plans, seen = [], []
    for _ in range(4):
        plans.append(stage.epoch_plan())
        steps = samples = 0
        for meta in loader:
            x = meta.data["x"].float()
            losses = (x % 7) / 7.0  # a fixed per-sample loss: low ones get pruned
            sub = meta.select(losses if meta.needs_losses else None)
            if scoring == "history":
                sub.report(torch.ones(len(sub)) * (sub.data["x"].float() % 7) / 7.0)
            steps += 1
            samples += len(meta)
        seen.append((samples, steps))
    assert [(p["samples"], p["steps"]) for p in plans] == seen
    assert [p["epoch"] for p in plans] == [0, 1, 2, 3]
    assert seen[0][0] == SHARDS * ROWS and min(s for s, _ in seen[1:3]) < SHARDS * ROWS


def test_epoch_plan_needs_a_visible_source():
    sampler = es_pipe.Selector(es_pipe.Evolved(), 4, 2)
    stage = es_pipe.SelectStage([{"__key__": str(i), "x": i} for i in range(8)], sampler)
    with pytest.raises(es_pipe.ConfigError, match="epoch_plan"):
        stage.epoch_plan()
