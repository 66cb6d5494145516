"""Run identity (issue 11, item 1): ``resume=True`` only continues the committed epochs of
the same run. Real Parquet shards, real training loops, real manifest folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torchdata.nodes as tn

import es_pipe
from es_pipe.errors import ConfigError, ManifestError
from es_pipe.manifests import COMMITS, Manifests
from es_pipe.sources import ParquetSource

SIZES = [24, 17, 30]


def _shards(folder, sizes=SIZES, tag="d"):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s, n in enumerate(sizes):
        x = np.random.default_rng(s).normal(size=(n, 4)).astype(np.float32)
        table = pa.table({"key": [f"{tag}{s}-{i:03d}" for i in range(n)], "x": list(x)})
        pq.write_table(table, folder / f"{tag}{s}.parquet", row_group_size=8)
        out.append(str(folder / f"{tag}{s}.parquet"))
    return out


def _train(urls, root, epochs=1, B=8, b=3, beta1=0.2, beta2=0.8, **kw):
    """A run as a (re)started process builds it; trains ``epochs`` more epochs."""
    eswp_kw = {k: kw.pop(k) for k in ("resume", "run_id") if k in kw}
    eswp = es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5, anneal=0), manifests=root, **eswp_kw)
    policy = es_pipe.Evolved(beta1, beta2)
    sampler = es_pipe.Selector(policy, B, b, seed=5, eswp=eswp, rank=0, world_size=1, **kw)
    source = ParquetSource(urls, key_column="key", shuffle=True, seed=5, pruned=sampler.pruned)
    loader = tn.Loader(es_pipe.SelectStage(source, sampler))
    if not epochs:  # the first iter(loader) is where the run starts (claims, resumes)
        iter(loader)
    for _ in range(epochs):
        for meta in loader:
            meta.select(meta.data["x"][:, 0].abs() + 0.1)
    return sampler


def test_commits_record_the_run_identity_and_the_same_run_resumes(tmp_path):
    urls = _shards(tmp_path / "data")
    root = str(tmp_path / "m")
    first = _train(urls, root, epochs=2, run_id="exp-1")
    run = Manifests(root).marker(1)["run"]
    assert run["run_id"] == "exp-1" and len(run["fingerprint"]) == 16
    assert run["shards"]["count"] == len(urls)
    again = _train(urls, root, epochs=1, run_id="exp-1")
    assert again.eswp.stats["restored"] == len(urls)
    assert Manifests(root).committed() == [0, 1, 2]
    assert again.step > first.step


@pytest.mark.parametrize(
    "change",
    [{"B": 16}, {"b": 4}, {"run_id": "exp-2"}, {"beta1": 0.5, "beta2": 0.5}],
    ids=["B", "b", "run_id", "betas"],
)
def test_another_runs_folder_is_refused(tmp_path, change):
    urls = _shards(tmp_path / "data")
    root = str(tmp_path / "m")
    _train(urls, root, epochs=2, run_id="exp-1")
    kw = {"run_id": "exp-1", **change}
    with pytest.raises(ManifestError, match=r"another run.*resume=False.*resume='force'"):
        _train(urls, root, epochs=0, **kw)
    assert Manifests(root).committed() == [0, 1]  # nothing was touched


def test_resume_force_adopts_and_resume_false_starts_over(tmp_path):
    urls = _shards(tmp_path / "data")
    root = str(tmp_path / "m")
    first = _train(urls, root, epochs=2)
    with pytest.warns(UserWarning, match="adopting them anyway"):
        forced = _train(urls, root, epochs=0, B=16, resume="force")
    assert (forced.epoch, forced.step) == (2, first.step)
    fresh = _train(urls, root, epochs=0, B=16, resume=False)
    assert (fresh.epoch, fresh.step) == (0, 0)
    with pytest.raises(ConfigError, match="resume="):
        _train(urls, root, epochs=0, resume="yes")


def test_other_data_in_the_same_folder_is_refused_before_the_epoch_ends(tmp_path):
    """Same hyper-parameters, other shards: the first shards read are not in the commits."""
    urls = _shards(tmp_path / "data")
    other = _shards(tmp_path / "other", tag="o")
    root = str(tmp_path / "m")
    _train(urls, root, epochs=2)
    with pytest.raises(ManifestError, match=r"none of the first 3 shards.*relocate="):
        _train(other, root, epochs=1)
    assert Manifests(root).committed() == [0, 1]


def test_moved_data_is_refused_then_relocated(tmp_path):
    urls = _shards(tmp_path / "data")
    root = str(tmp_path / "m")
    first = _train(urls, root, epochs=2)
    moved = tmp_path / "moved"
    os.rename(tmp_path / "data", moved)  # a move keeps size and mtime: same fingerprints
    new_urls = [u.replace(str(tmp_path / "data"), str(moved)) for u in urls]
    with pytest.raises(ManifestError, match="relocate="):
        _train(new_urls, root, epochs=1)
    relocate = {str(tmp_path / "data") + "/": str(moved) + "/"}
    manifests = es_pipe.Manifests(root, relocate=relocate)
    again = _train(new_urls, manifests, epochs=1)
    assert again.eswp.stats["restored"] == len(urls)
    for old, new in zip(urls, new_urls):
        assert np.array_equal(
            Manifests(root).read_shard(old, 1).columns["visits"],
            manifests.read_shard(new, 1).columns["visits"],
        )
    assert again.step > first.step
    newest = Manifests(root).marker(2)
    assert sorted(e["shard"] for e in newest["files"]) == sorted(new_urls)


def test_markers_of_an_older_es_pipe_are_accepted_with_a_warning(tmp_path):
    urls = _shards(tmp_path / "data")
    root = tmp_path / "m"
    first = _train(urls, str(root), epochs=1)
    path = root / COMMITS / "epoch=00000000.json"
    marker = json.loads(path.read_text())
    del marker["run"]
    path.write_text(json.dumps(marker))
    with pytest.warns(UserWarning, match="no run identity"):
        again = _train(urls, str(root), epochs=0, B=16)
    assert (again.epoch, again.step) == (1, first.step)


def test_relocate_is_checked():
    with pytest.raises(ConfigError, match="relocate="):
        Manifests("x", relocate={"": 3})
