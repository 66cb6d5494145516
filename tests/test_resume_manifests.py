"""A checkpoint taken inside an epoch of an ESWP run with manifests, restored by a fresh
sampler (as a restarted process builds it: resumed from the manifests first), reproduces the
uninterrupted run: the same meta-batches and selections, the same scores, and the same
committed manifests (keys, scores, pruning decisions and streaks); without manifests, the
same stream. Found with the kill -9 suite (test_faults_kill.py); these are its regressions,
in one process."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn

import es_pipe
from es_pipe.manifests import Manifests
from es_pipe.sources import ParquetSource

SIZES, EPOCHS = [24, 17, 30], 3


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-shards")
    out = []
    for s, n in enumerate(SIZES):
        x = np.random.default_rng(s).normal(size=(n, 4)).astype(np.float32)
        table = pa.table({"key": [f"s{s}-{i:03d}" for i in range(n)], "x": list(x)})
        pq.write_table(table, folder / f"d{s}.parquet", row_group_size=8)
        out.append(str(folder / f"d{s}.parquet"))
    return out


def _build(urls, root):
    """The run's objects, as a (re)started process builds them; ``root=None``: ESWP
    without manifests."""
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        3,
        total_epochs=EPOCHS,
        seed=5,
        rank=0,
        world_size=1,
        eswp=es_pipe.ESWP(
            prune=es_pipe.Pruning(ratio=0.5, anneal=0),
            manifests=None if root is None else str(root),
        ),
    )
    source = ParquetSource(urls, key_column="key", shuffle=True, seed=5, pruned=sampler.pruned)
    return sampler, tn.Loader(es_pipe.SelectStage(source, sampler))


def _train(sampler, loader, trace, save_at=None, go_on=False):
    """Train to the end; with ``save_at``, checkpoint after that many steps are in
    ``trace`` and return the checkpoint, there (``go_on=False``) or at the end."""
    saved = None
    while True:
        it = iter(loader)
        if sampler.epoch >= EPOCHS:
            return saved
        for meta in it:
            losses = meta.data["x"][:, 0].abs() + 0.1 * (sampler.step % 5)
            sub = meta.select(losses)
            weights = None if sub.weights is None else sub.weights.tolist()
            trace.append((sampler.epoch, meta.keys, sub.keys, weights))
            if len(trace) == save_at:
                buffer = io.BytesIO()
                torch.save({"loader": loader.state_dict(), "scores": sampler.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                if not go_on:
                    return saved


def _epochs(root):
    m = Manifests(str(root))
    return {e: m.read_epoch(e).to_pydict() for e in m.committed()}


@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize("beyond", [False, True], ids=["killed-at-checkpoint", "killed-later"])
@pytest.mark.parametrize("split", [4, 11, 14, 19])  # epoch 0, 1 (pruned), 2, 2 near its end
def test_mid_epoch_checkpoint_resumes_exactly_with_manifests(urls, tmp_path, split, beyond):
    full: list = []
    _train(*_build(urls, tmp_path / "full"), full)
    assert len(full) > 19 and any(w is not None and max(w) > 1 for *_, w in full)
    expected = _epochs(tmp_path / "full")

    head: list = []
    # beyond: the run went on and committed later epochs before it died; the restart
    # resumes from the manifests, goes back to the checkpoint and commits them again
    saved = _train(*_build(urls, tmp_path / "cut"), head, save_at=split, go_on=beyond)
    assert head == (full if beyond else full[:split])
    sampler, loader = _build(urls, tmp_path / "cut")
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    tail: list = []
    _train(sampler, loader, tail)
    assert head[:split] + tail == full
    got = _epochs(tmp_path / "cut")
    assert sorted(got) == sorted(expected)
    for epoch, table in expected.items():
        for column, values in table.items():
            assert got[epoch][column] == values, (epoch, column)


@pytest.mark.parametrize("split", [11, 14])  # inside the pruned epoch 1, inside epoch 2
def test_mid_epoch_checkpoint_resumes_exactly_without_manifests(urls, split):
    """Without manifests, the checkpoint itself carries the epoch's pruning decisions."""
    full: list = []
    _train(*_build(urls, None), full)
    head: list = []
    saved = _train(*_build(urls, None), head, save_at=split)
    sampler, loader = _build(urls, None)
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    tail: list = []
    _train(sampler, loader, tail)
    assert head + tail == full
