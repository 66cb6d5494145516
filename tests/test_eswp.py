"""ESWP as an optional part of the sampler (issue 13): ``Selector(Evolved(), B, b,
eswp=es_pipe.ESWP(...))``, no I/O in constructors (the run starts at the first reset or
use), the epoch commit visible as ``sampler.last_commit``, and the deprecated keywords.
Real Parquet shards, real manifest folders, real training loops."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn

import es_pipe
from es_pipe.errors import ConfigError, ManifestError
from es_pipe.manifests import COMMITS, LEASE
from es_pipe.sources import ParquetSource

SIZES = (40, 29, 35)


@pytest.fixture
def urls(tmp_path):
    out = []
    for s, n in enumerate(SIZES):
        x = np.random.default_rng(s).normal(size=(n, 4)).astype(np.float32)
        path = tmp_path / "data" / f"d{s}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"key": [f"d{s}-{i:03d}" for i in range(n)], "x": list(x)}), path)
        out.append(str(path))
    return out


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _run(urls, sampler, epochs):
    """Train ``epochs`` epochs; the picks (shard, key) and the loss weights of each step."""
    source = ParquetSource(urls, key_column="key", shuffle=True, seed=3, pruned=sampler.pruned)
    loader = tn.Loader(es_pipe.SelectStage(source, sampler))
    picks = []
    for _ in range(epochs):
        for meta in loader:
            sub = meta.select(meta.data["x"][:, 0].abs() + 0.1)
            keys = [sub.data["__key__"][i] for i in range(len(sub.data["__key__"]))]
            weights = None if sub.weights is None else sub.weights.tolist()
            picks.append((keys, weights))
    return picks


def _rule():
    return es_pipe.Pruning(ratio=0.5, anneal=0)


def test_the_old_keywords_warn_and_behave_identically(urls, tmp_path):
    new = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        4,
        seed=2,
        total_epochs=3,
        eswp=es_pipe.ESWP(_rule(), str(tmp_path / "new")),
    )
    with pytest.warns(DeprecationWarning, match=r"prune=, manifests=.*eswp=es_pipe.ESWP"):
        old = es_pipe.Selector(
            es_pipe.Evolved(),
            8,
            4,
            seed=2,
            total_epochs=3,
            prune=_rule(),
            manifests=str(tmp_path / "old"),
        )
    assert isinstance(old.eswp, es_pipe.ESWP)
    assert _run(urls, old, 3) == _run(urls, new, 3)
    assert old.step == new.step and old.epoch == new.epoch == 3
    for a, b in zip(old.state_dict()["scores"].values(), new.state_dict()["scores"].values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    markers = [es_pipe.Manifests(str(tmp_path / n)).marker(2)["hyper"] for n in ("old", "new")]
    assert markers[0] == markers[1] and markers[0]["prune"] == _rule().describe()
    assert sum(old.eswp.stats.values()) and old.eswp.stats == new.eswp.stats
    with pytest.warns(DeprecationWarning, match="sampler.eswp"):
        assert old.boundary is old.eswp


def test_constructing_does_no_io_and_the_first_reset_starts_the_run(urls, tmp_path):
    root = tmp_path / "m"
    first = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=2, eswp=es_pipe.ESWP(_rule(), str(root)))
    _run(urls, first, 2)
    first.eswp.manifests.release_lease()  # as at the first job's exit
    before = _files(root)
    assert LEASE not in before
    again = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=2, eswp=es_pipe.ESWP(_rule(), str(root)))
    source = ParquetSource(urls, key_column="key", pruned=again.pruned)
    loader = tn.Loader(es_pipe.SelectStage(source, again))
    assert _files(root) == before  # nothing claimed, nothing read into the sampler
    assert (again._epoch, again._step) == (0, 0)
    iter(loader)  # the first reset: the folder is claimed and the run resumed
    assert _files(root) == before | {LEASE}  # claimed for this run
    assert (again.epoch, again.step) == (2, first.step)


def test_a_hook_asked_before_the_first_meta_batch_sees_the_restored_epoch(urls, tmp_path):
    root = tmp_path / "m"
    first = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=2, eswp=es_pipe.ESWP(_rule(), str(root)))
    _run(urls, first, 2)
    expected = {u: first.pruned(u) for u in urls}  # epoch 2's decisions
    assert any(v is not None for v in expected.values())
    again = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=2, eswp=es_pipe.ESWP(_rule(), str(root)))
    got = {u: again.pruned(u) for u in urls}  # the first use starts the run
    assert again.epoch == 2
    for url in urls:
        assert (got[url] is None) == (expected[url] is None)
        if got[url] is not None:
            assert np.array_equal(got[url], expected[url])


def test_a_bad_folder_is_refused_at_the_first_reset_and_left_alone(urls, tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / COMMITS).write_text("not a folder")
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, eswp=es_pipe.ESWP(manifests=str(root)))
    loader = tn.Loader(es_pipe.SelectStage(ParquetSource(urls, key_column="key"), sampler))
    with pytest.raises(ManifestError, match="Remove it, or give manifests= a folder"):
        iter(loader)
    assert _files(root) == {COMMITS} and (root / COMMITS).read_text() == "not a folder"


def test_the_epoch_commit_is_visible_and_logged(urls, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="es_pipe")
    sampler = es_pipe.Selector(
        es_pipe.Evolved(), 8, 4, eswp=es_pipe.ESWP(_rule(), str(tmp_path / "m"))
    )
    assert sampler.last_commit is None
    _run(urls, sampler, 1)
    done = sampler.last_commit
    assert isinstance(done, es_pipe.EpochCommit)
    assert (done.epoch, done.step, done.files, done.committed) == (0, sampler.step, 3, True)
    assert done.seconds >= done.wait_seconds >= 0
    assert "epoch 0 committed under" in caplog.text and "sampler.last_commit" in caplog.text
    _run(urls, sampler, 1)
    assert sampler.last_commit.epoch == 1 and sampler.last_commit.pruned > 0
    # without manifests: decisions only, nothing committed
    memory = es_pipe.Selector(es_pipe.Evolved(), 8, 4, eswp=es_pipe.ESWP(_rule()))
    _run(urls, memory, 2)
    assert memory.last_commit.committed is False and memory.last_commit.files == 0
    assert memory.last_commit.pruned > 0


def test_recommended_builds_through_eswp_without_deprecation(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        sampler = es_pipe.Selector.recommended(
            8, total_epochs=3, manifests=str(tmp_path / "m"), run_id="exp"
        )
    assert isinstance(sampler.eswp, es_pipe.ESWP)
    assert sampler.eswp.prune.ratio == 0.8 and sampler.run_id == "exp"
    assert sampler.hyper()["prune"] == sampler.eswp.prune.describe()
    with pytest.raises(ConfigError, match=r"builds its own es_pipe\.ESWP"):
        es_pipe.Selector.recommended(8, total_epochs=3, prune=es_pipe.Pruning())


def test_misuse_of_eswp_is_refused():
    with pytest.raises(ConfigError, match=r"needs prune=.*manifests="):
        es_pipe.ESWP()
    with pytest.raises(ConfigError, match="commit_timeout"):
        es_pipe.ESWP(es_pipe.Pruning(), commit_timeout=0)
    eswp = es_pipe.ESWP(es_pipe.Pruning(anneal=0))
    es_pipe.Selector(es_pipe.Evolved(), 8, 4, eswp=eswp)
    with pytest.raises(ConfigError, match="one ESWP per sampler"):
        es_pipe.Selector(es_pipe.Evolved(), 8, 4, eswp=eswp)
    with pytest.raises(ConfigError, match="both given"):
        es_pipe.Selector(
            es_pipe.Evolved(), 8, 4, eswp=es_pipe.ESWP(es_pipe.Pruning()), resume=False
        )
    with pytest.raises(ConfigError, match="eswp="):
        es_pipe.Selector(es_pipe.Evolved(), 8, 4, eswp=es_pipe.Pruning())
    with pytest.raises(TypeError, match="prunes"):
        es_pipe.Selector(es_pipe.Evolved(), 8, 4, prunes=es_pipe.Pruning())


def test_the_old_module_names_still_import():
    import importlib
    import sys

    sys.modules.pop("es_pipe.boundary", None)
    with pytest.warns(DeprecationWarning, match="es_pipe.boundary is deprecated"):
        boundary = importlib.import_module("es_pipe.boundary")
    assert boundary.EpochBoundary is es_pipe.ESWP
    from es_pipe.pruning import Pruning

    assert Pruning is es_pipe.Pruning
