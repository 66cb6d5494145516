"""End to end: a small model trained 4 epochs through SelectStage with prune= and
manifests=, over real Parquet shards read by ParquetSource with the sampler's pruned-row hook;
then `es-pipe inspect` on the run's manifests, PNG included."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn

import es_pipe
from es_pipe.manifests import Manifests
from es_pipe.sources import ParquetSource
from es_pipe.tools.cli import main as cli_main

SHARDS, PER, EPOCHS = 3, 96, 4


def _write_shards(folder):
    gen = np.random.default_rng(0)
    urls = []
    for s in range(SHARDS):
        x = gen.normal(size=(PER, 8)).astype(np.float32)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
        table = pa.table({"key": [f"s{s}-{i:04d}" for i in range(PER)], "x": list(x), "y": y})
        path = folder / f"train-{s:03d}.parquet"
        pq.write_table(table, path, row_group_size=16)
        urls.append(str(path))
    return urls


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    urls = _write_shards(folder)
    root = str(folder / "manifests")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(beta1=0.2, beta2=0.8),
        32,
        16,
        total_epochs=EPOCHS,
        seed=3,
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5, anneal=0.25), manifests=root),
    )
    source = ParquetSource(urls, key_column="key", pruned=sampler.pruned)
    stage = es_pipe.SelectStage(source, sampler)
    loader = tn.Loader(stage)
    losses, weights_seen, delivered = [], [], []
    for _ in range(EPOCHS):
        for meta in loader:
            with torch.no_grad():
                scored = torch.nn.functional.cross_entropy(
                    model(meta.data["x"]), meta.data["y"], reduction="none"
                )
            sub = meta.select(scored)
            loss = torch.nn.functional.cross_entropy(
                model(sub.data["x"]), sub.data["y"], reduction="none"
            )
            if sub.weights is not None:
                weights_seen.append(sub.weights)
                loss = loss * sub.weights
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            losses.append(float(loss.detach().mean()))
        delivered.append(source.stats["samples"])
    return {
        "root": root,
        "urls": urls,
        "source": source,
        "stage": stage,
        "losses": losses,
        "weights": weights_seen,
        "folder": folder,
        "delivered": delivered,
    }


def test_manifests_committed_each_epoch_and_pruned_rows_skipped(run):
    m = Manifests(run["root"])
    assert m.committed() == list(range(EPOCHS))
    total = SHARDS * PER
    pruned = [
        int(np.sum(m.read_epoch(e, columns=["pruned"]).column("pruned"))) for e in range(EPOCHS)
    ]
    # epoch 0: everything; epoch e+1 reads exactly what manifest e did not prune
    assert run["delivered"] == [total] + [total - p for p in pruned[:-1]]
    assert pruned[0] > 0 and pruned[1] > 0 and pruned[2] == pruned[3] == 0  # anneal: last 1
    assert run["stage"].pruned_by_stage == 0  # the source hook did the skipping
    assert run["weights"] and max(float(w.max()) for w in run["weights"]) > 1.0
    assert np.mean(run["losses"][-5:]) < np.mean(run["losses"][:5])


def test_inspect_on_a_real_run(run, capsys, tmp_path):
    root = run["root"]
    png = tmp_path / "pruning.png"
    assert cli_main(["inspect", root, "--plot", str(png), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "epochs" in out and "pruned%" in out and "train-000.parquet" in out
    assert f"where epoch <= {EPOCHS - 1}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 400) and len(data) > 10_000

    assert (
        cli_main(
            [
                "inspect",
                root,
                "--json",
                "--diff",
                "0",
                "1",
                "--shard",
                "train-001",
                "--key",
                "s1-0005",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    m = Manifests(root)
    first = m.read_epoch(0)
    assert [e["samples"] for e in report["epochs"]] == [SHARDS * PER] * EPOCHS
    assert report["epochs"][0]["pruned"] == int(np.sum(first.column("pruned")))
    assert report["shard"].endswith("train-001.parquet")
    assert [h["epoch"] for h in report["key_history"]] == list(range(EPOCHS))
    assert {h["row"] for h in report["key_history"]} == {5}
    diff = report["diff"]
    assert diff["samples_both"] == PER
    assert diff["newly_pruned"] + diff["pruned_both"] == diff["pruned_b"]

    assert cli_main(["inspect", root, "--epoch", "9"]) == 2
    assert "epoch 9" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "no committed epoch" in capsys.readouterr().err


def _inspect_json(capsys, *args):
    assert cli_main(["inspect", *map(str, args), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_counts_read_skipped_returned_per_epoch(run, capsys):
    """Issue 15 item 6: per epoch, how many samples were read (what the source delivered),
    skipped, returned and pruned; not the cumulative `seen`."""
    report = _inspect_json(capsys, run["root"])
    m = Manifests(run["root"])
    pruned = [
        m.read_epoch(e, columns=["pruned"]).column("pruned").to_numpy() for e in range(EPOCHS)
    ]
    epochs = report["epochs"]
    assert [e["read"] for e in epochs] == run["delivered"]
    assert [e["skipped"] for e in epochs] == [0] + [int(p.sum()) for p in pruned[:-1]]
    assert [e["pruned"] for e in epochs] == [int(p.sum()) for p in pruned]
    # returned in E = left out of E-1 and read in E: row by row from the manifests' data
    truth = [0, 0] + [int((pruned[e - 2] & ~pruned[e - 1]).sum()) for e in range(2, EPOCHS)]
    assert [e["returned"] for e in epochs] == truth and truth[2] > 0


def test_inspect_returned_counts_samples_pruned_twice(tmp_path, capsys):
    """`returned` with max_streak > 1: a sample left out of two epochs in a row returns
    only after the second (the markers' `repruned` count)."""
    m = Manifests(str(tmp_path))
    rows = 8
    streaks = [  # the pruning state written at the end of epochs 0..3
        [1, 1, 1, 1, 0, 0, 0, 0],  # 0-3 left out of epoch 1
        [2, 2, 0, 0, 1, 0, 0, 0],  # 0, 1 left out of epoch 2 too; 4 newly
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    for epoch, streak in enumerate(streaks):
        columns = {
            "score": np.ones(rows, np.float32),
            "loss": np.ones(rows, np.float32),
            "visits": np.ones(rows, np.uint32),
            "step": np.full(rows, epoch, np.int32),
            "state": np.asarray(streak, np.uint8),
        }
        m.write_shard(epoch, "shard-a", columns)
        m.finish(epoch)
        m.commit(epoch)
    epochs = _inspect_json(capsys, tmp_path)["epochs"]
    assert [e["skipped"] for e in epochs] == [0, 4, 3, 0]
    assert [e["read"] for e in epochs] == [8, 4, 5, 8]
    assert [e["returned"] for e in epochs] == [0, 0, 2, 3]
    assert [e["pruned"] for e in epochs] == [4, 3, 0, 0]


def test_inspect_reads_only_the_epochs_it_shows(run, tmp_path, capsys):
    """`inspect --epoch N` reads epoch N's files only (issue 11): in a copy of the root
    whose other epochs' files are damaged (same size, other bytes: a read fails its
    crc32), it gives the same report as on the intact root."""
    import shutil

    copy = tmp_path / "manifests"
    shutil.copytree(run["root"], copy)
    m = Manifests(str(copy))
    for epoch in m.committed():
        if epoch == 1:
            continue
        for entry in m.marker(epoch)["files"]:
            path = copy / entry["path"]
            path.write_bytes(b"\xff" * path.stat().st_size)
    intact = _inspect_json(capsys, run["root"], "--epoch", 1)
    damaged = _inspect_json(capsys, copy, "--epoch", 1)
    for field in ("epochs", "detail", "shards", "distribution"):
        assert damaged[field] == intact[field], field
    assert damaged["detail"]["samples"] == SHARDS * PER and damaged["detail"]["scored"] > 0
    # the damage is real: an epoch whose files are read fails
    assert cli_main(["inspect", str(copy), "--epoch", "0", "--no-progress"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_restart_restores_from_manifests(run):
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        32,
        16,
        total_epochs=EPOCHS,
        seed=3,
        rank=0,
        world_size=1,
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5, anneal=0.25), manifests=run["root"]),
    )
    assert sampler.epoch == EPOCHS
    m = Manifests(run["root"])
    for url in run["urls"]:
        assert sampler.pruned(url) is None  # the last manifest prunes nothing (annealing)
        got = m.read_shard(url)
        assert np.array_equal(sampler.store.shard(url)["score"], got.columns["score"])
    # the decisions of an older epoch, for a source reading it
    pruned1 = sampler.pruned(run["urls"][0], 1)
    expected = np.flatnonzero(m.read_shard(run["urls"][0], 0).columns["pruned"])
    assert np.array_equal(pruned1, expected)
