"""DataLoader workers and ESWP (issue 15, item 5): the pruning hook a worker holds is fresh
for every epoch, so the samples ESWP prunes are not read, with persistent workers too;
where a configuration cannot skip them, the stage warns once with the count.

Reads are counted where they happen: the tar reader's samples are decoded by the
DataLoader's ``collate_fn`` in the worker processes, which counts them in a file per
worker (the workers are real processes)."""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torchdata.nodes as tn
import webdataset as wds
from torch.utils.data import DataLoader

import es_pipe
from es_pipe import Pruning
from es_pipe.sources import SourceDataset, WebDatasetSource

SHARDS, PER_SHARD, EPOCHS = 4, 40, 3


@pytest.fixture
def tars(tmp_path):
    urls = []
    for s in range(SHARDS):
        url = str(tmp_path / f"part-{s}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(PER_SHARD):
                sink.write({"__key__": f"{i:06d}", "x.bin": np.float32([i % 10]).tobytes()})
        urls.append(url)
    return urls


def _decode(counts: str, sample: dict) -> dict:
    """Decode one sample in the worker and count it as read (one file per process)."""
    with open(os.path.join(counts, f"{os.getpid()}.txt"), "a") as f:
        f.write("1\n")
    x = torch.frombuffer(bytearray(sample["x.bin"]), dtype=torch.float32)
    return {"x": x, **{k: sample[k] for k in ("__key__", "__shard__", "__index__")}}


def _reads(counts: Path) -> int:
    return sum(len(p.read_text().split()) for p in counts.glob("*.txt"))


class _Opaque:
    """An iterable the stage cannot look into: it never calls the dataset's set_epoch."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader = loader

    def __iter__(self):
        return iter(self._loader)


def _run(
    tars,
    tmp_path,
    *,
    persistent: bool,
    manifests: bool,
    context: str | None = None,
    workers: int = 2,
    opaque: bool = False,
):
    counts = tmp_path / "reads"
    counts.mkdir()
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        20,
        20,
        seed=0,
        total_epochs=EPOCHS,
        eswp=es_pipe.ESWP(
            prune=Pruning(ratio=0.5, anneal=0),
            manifests=str(tmp_path / "manifests") if manifests else None,
        ),
    )
    source = WebDatasetSource(tars, shuffle=True, seed=0, pruned=sampler.pruned)
    loader = DataLoader(
        SourceDataset(source),
        batch_size=None,
        num_workers=workers,
        persistent_workers=persistent,
        collate_fn=partial(_decode, str(counts)),
        multiprocessing_context=context,
    )
    stage = es_pipe.SelectStage(_Opaque(loader) if opaque else loader, sampler)
    sizes, reads = [], []
    it = tn.Loader(stage)
    for _ in range(EPOCHS):
        before = _reads(counts)
        sizes.append(0)
        for meta in it:
            meta.select(meta.data["x"][:, 0] + 0.1)  # low x: low loss, pruned
            sizes[-1] += len(meta)
        reads.append(_reads(counts) - before)
    return stage, sizes, reads


@pytest.mark.parametrize("persistent", [True, False])
def test_workers_skip_the_pruned_samples_reads(tars, tmp_path, persistent):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        stage, sizes, reads = _run(tars, tmp_path, persistent=persistent, manifests=True)
    n = SHARDS * PER_SHARD
    assert sizes[0] == n and all(size < n for size in sizes[1:])  # ESWP pruned
    assert reads == sizes  # the workers read exactly what trains: no pruned sample read
    assert stage.pruned_by_stage == 0


def test_spawned_persistent_workers_get_the_hook_without_the_score_table(tars, tmp_path):
    """Under spawn the hook is pickled: a light view travels (decisions of the epoch, the
    manifest root to read later epochs from), not the sampler's scores or open files."""
    stage, sizes, reads = _run(
        tars, tmp_path, persistent=True, manifests=True, context="spawn", workers=1
    )
    assert sizes[1] < SHARDS * PER_SHARD
    assert reads == sizes and stage.pruned_by_stage == 0


@pytest.mark.parametrize("persistent", [True, False])
def test_workers_skip_without_set_epoch(tars, tmp_path, persistent):
    """Behind an iterable the stage cannot look into, nobody calls set_epoch: the workers'
    sources read a stale epoch's shard order, but their hook answers for the sampler's
    epoch (shared memory), so the pruned samples are still not read."""
    stage, sizes, reads = _run(tars, tmp_path, persistent=persistent, manifests=True, opaque=True)
    assert sizes[1] < SHARDS * PER_SHARD
    assert reads == sizes and stage.pruned_by_stage == 0


def test_non_persistent_workers_skip_without_manifests(tars, tmp_path):
    stage, sizes, reads = _run(tars, tmp_path, persistent=False, manifests=False)
    assert sizes[1] < SHARDS * PER_SHARD
    assert reads == sizes and stage.pruned_by_stage == 0


def test_persistent_workers_without_manifests_warn_once_with_the_count(tars, tmp_path):
    """The decisions live only in the trainer's memory: a persistent worker cannot see
    them. Training stays right (the stage drops the pruned samples), and says so once."""
    with pytest.warns(
        UserWarning, match=r"epoch 1: the source read and decoded (\d+) samples that ESWP pruned"
    ) as caught:
        stage, sizes, reads = _run(tars, tmp_path, persistent=True, manifests=False)
    lost = [w for w in caught if "ESWP pruned" in str(w.message)]
    assert len(lost) == 1
    n = SHARDS * PER_SHARD
    assert reads == [n] * EPOCHS  # every sample read every epoch
    assert stage.pruned_by_stage == sum(n - size for size in sizes) > 0
    dropped_epoch1 = n - sizes[1]
    assert f"decoded {dropped_epoch1} samples" in str(lost[0].message)


def test_the_epoch_reaches_persistent_workers(tars, tmp_path):
    """Without a stage: set_epoch on the dataset reaches persistent workers' copies (the
    shard order follows the epoch, as in a fresh worker)."""

    def order(persistent: bool, epochs: list[int]) -> list[list[str]]:
        ds = SourceDataset(WebDatasetSource(tars, shuffle=True, seed=3))
        loader = DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=persistent)
        out = []
        for epoch in epochs:
            ds.set_epoch(epoch)
            out.append([s["__shard__"] + s["__key__"] for s in loader])
        return out

    assert order(True, [5, 2, 9]) == order(False, [5, 2, 9])


def test_a_source_without_the_hook_warns_once_a_list_only_logs(tars, caplog):
    """An es_pipe source could skip the pruned samples: without pruned= it is told once,
    with the count. A list has nothing to skip with: a log line, no warning."""

    def train(upstream) -> es_pipe.SelectStage:
        sampler = es_pipe.Selector(
            es_pipe.Evolved(),
            20,
            20,
            seed=0,
            total_epochs=EPOCHS,
            eswp=es_pipe.ESWP(prune=Pruning(ratio=0.5, anneal=0)),
        )
        stage = es_pipe.SelectStage(upstream, sampler)
        for _ in range(EPOCHS):
            for meta in tn.Loader(stage):
                meta.select(meta.data["x"][:, 0] + 0.1)
        return stage

    decode = _decode_only
    with pytest.warns(UserWarning, match=r"decoded \d+ samples that ESWP pruned") as caught:
        stage = train(tn.Mapper(WebDatasetSource(tars), decode))
    assert sum("ESWP pruned" in str(w.message) for w in caught) == 1
    assert stage.pruned_by_stage > 0
    rows = [decode(s) for s in tn.Loader(WebDatasetSource(tars))]
    caplog.set_level("INFO", logger="es_pipe")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        stage = train(rows)
    assert stage.pruned_by_stage > 0 and "ESWP pruned" in caplog.text


def _decode_only(sample: dict) -> dict:
    x = torch.frombuffer(bytearray(sample["x.bin"]), dtype=torch.float32)
    return {"x": x, **{k: sample[k] for k in ("__key__", "__shard__", "__index__")}}
