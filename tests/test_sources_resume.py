"""Exact resume from per-shard cursors, also on another topology; Loader and DataLoader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from _sources_helpers import FORMATS, all_idents, ident, make_shards, source

from es_pipe.errors import ConfigError
from es_pipe.sources import SourceDataset, WebDatasetSource, merge_states

SHUFFLES = {
    "tar": {"shuffle": True, "shuffle_buffer": 4},
    "parquet": {"shuffle": True, "shuffle_rows": True},
    "arrow": {"shuffle": True, "shuffle_rows": True},
}


def _take(src, n):
    return [ident(next(src)) for _ in range(n)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shuffled", [False, True])
def test_exact_resume_at_several_points(tmp_path, fmt, shuffled):
    urls = make_shards(str(tmp_path), fmt)
    kw = SHUFFLES[fmt] if shuffled else {}
    ref = [ident(s) for s in source(fmt, urls, seed=7, epoch=2, **kw)]
    assert sorted(ref) == all_idents(urls)
    for cut in (0, 1, 4, 6, 17, 44, 45):
        src = source(fmt, urls, seed=7, epoch=2, **kw)
        head = _take(src, cut)
        state = json.loads(json.dumps(src.state_dict()))  # JSON-friendly
        fresh = source(fmt, urls, seed=0, epoch=0, **kw)  # seed/epoch come from the state
        fresh.reset(state)
        assert head + [ident(s) for s in fresh] == ref, cut


def test_state_is_small_and_per_shard(tmp_path):
    urls = make_shards(str(tmp_path), "tar")
    src = source("tar", urls)
    _take(src, 7)  # 5 of shard 0, 2 of shard 1
    st = src.state_dict()
    assert st["done"] == [[0, 1]] and st["cursors"] == {urls[1]: 2}
    assert st["epoch"] == 0 and st["stream"] == [0, 1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_on_another_topology(tmp_path, fmt):
    urls = make_shards(str(tmp_path), fmt)
    kw = dict(SHUFFLES[fmt], seed=11)
    old = [
        source(fmt, urls, rank=r, world_size=2, worker=w, num_workers=3, **kw)
        for r in range(2)
        for w in range(3)
    ]
    consumed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, src in enumerate(old):
            for _ in range(k * 2):  # uneven progress, some streams finish
                try:
                    consumed.append(ident(next(src)))
                except StopIteration:
                    break
    merged = json.loads(json.dumps(merge_states([s.state_dict() for s in old])))
    for ranks, workers in ((1, 1), (2, 1), (1, 4), (3, 2)):
        rest = []
        for r in range(ranks):
            for w in range(workers):
                src = source(
                    fmt, urls, rank=r, world_size=ranks, worker=w, num_workers=workers, **kw
                )
                src.reset(merged)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rest += [ident(s) for s in src]
        assert sorted(consumed + rest) == all_idents(urls), (ranks, workers)


def test_per_stream_state_on_wrong_stream_is_refused(tmp_path):
    urls = make_shards(str(tmp_path), "tar")
    a = source("tar", urls, rank=0, world_size=2)
    _take(a, 3)
    b = source("tar", urls, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="merge_states"):
        b.reset(a.state_dict())
    with pytest.raises(ConfigError, match="one state per stream"):
        merge_states([a.state_dict()])
    other = source("tar", urls[:-1], rank=0, world_size=2)
    with pytest.raises(ConfigError, match="different shard list"):
        other.reset(a.state_dict())


def test_resume_with_equalize_pad(tmp_path):
    urls = make_shards(str(tmp_path), "parquet")
    ref = [ident(s) for s in source("parquet", urls, rank=1, world_size=4, equalize="pad")]
    assert len(ref) == 12 and len(set(ref)) == 10  # 2 padded repeats
    for cut in (2, 7, 10, 11, 12):
        src = source("parquet", urls, rank=1, world_size=4, equalize="pad")
        head = _take(src, cut)
        fresh = source("parquet", urls, rank=1, world_size=4, equalize="pad")
        fresh.reset(src.state_dict())
        assert head + [ident(s) for s in fresh] == ref


def test_torchdata_loader_resume_and_epochs(tmp_path):
    from torchdata.nodes import Loader

    urls = make_shards(str(tmp_path), "tar")
    loader = Loader(WebDatasetSource(urls, shuffle=True, seed=2))
    e0 = [ident(s) for s in loader]
    e1 = [ident(s) for s in loader]
    assert sorted(e0) == sorted(e1) == all_idents(urls) and e0 != e1
    loader = Loader(WebDatasetSource(urls, shuffle=True, seed=2))
    it = iter(loader)
    head = [ident(next(it)) for _ in range(13)]
    state = loader.state_dict()
    loader2 = Loader(WebDatasetSource(urls, shuffle=True, seed=2))
    loader2.load_state_dict(state)
    assert head + [ident(s) for s in loader2] == e0


def test_stateful_dataloader_resume_same_and_other_worker_count(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    urls = make_shards(str(tmp_path), "parquet")

    def make(workers, state=None):
        ds = SourceDataset(source("parquet", urls, shuffle=True, seed=4))
        if state is not None:
            ds.load_state_dict(state)
        return StatefulDataLoader(ds, batch_size=None, num_workers=workers)

    loader = make(2)
    it = iter(loader)
    head = [(s["__shard__"], int(s["__index__"])) for s in (next(it) for _ in range(15))]
    state = loader.state_dict()
    del it
    same = make(2)
    same.load_state_dict(state)
    rest = [(s["__shard__"], int(s["__index__"])) for s in same]
    assert sorted(head + rest) == all_idents(urls)
    worker_states = SourceDataset.states_from_loader(state)
    assert len(worker_states) == 2
    other = make(1, merge_states(worker_states))
    rest = [(s["__shard__"], int(s["__index__"])) for s in other]
    assert sorted(head + rest) == all_idents(urls)


def test_set_epoch_keeps_a_loaded_state_of_that_epoch(tmp_path):
    """The stage calls SourceDataset.set_epoch(sampler.epoch) before every epoch: a state
    loaded for that epoch (an elastic resume of DataLoader workers) still resumes there;
    a state of another epoch is forgotten, and the new epoch starts fresh."""
    urls = make_shards(str(tmp_path), "parquet")
    src = source("parquet", urls, shuffle=True, seed=4, epoch=2)
    head = _take(src, 10)
    state = src.state_dict()
    rest = [ident(s) for s in src]
    ds = SourceDataset(source("parquet", urls, shuffle=True, seed=4))
    ds.load_state_dict(state)
    ds.set_epoch(2)
    assert [ident(s) for s in ds] == rest and sorted(head + rest) == all_idents(urls)
    ds.load_state_dict(state)
    ds.set_epoch(3)
    assert [ident(s) for s in ds] == [
        ident(s) for s in source("parquet", urls, shuffle=True, seed=4, epoch=3)
    ]


_CHILD = """
import json, sys
from es_pipe.sources import WebDatasetSource, epoch_order
src = WebDatasetSource(sys.argv[1:], shuffle=True, seed=9, epoch=3, shuffle_buffer=3)
print(json.dumps({"order": epoch_order(50, 9, 3, True).tolist(),
                  "samples": [[s["__shard__"], s["__index__"]] for s in src]}))
"""


def test_identical_order_in_separate_processes(tmp_path):
    from es_pipe.sources import epoch_order

    urls = make_shards(str(tmp_path), "tar")
    here = [
        list(ident(s))
        for s in WebDatasetSource(urls, shuffle=True, seed=9, epoch=3, shuffle_buffer=3)
    ]
    # A fixed hash seed in the child that differs from this interpreter's random one:
    # the order must not depend on hash().
    env = dict(
        os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join(p for p in sys.path if p)
    )
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, *urls],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    out = json.loads(res.stdout)
    assert out["samples"] == here
    assert out["order"] == epoch_order(50, 9, 3, True).tolist()
    assert out["order"] != list(range(50))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_refused_state_leaves_the_source_reading_where_it_was(tmp_path, fmt):
    """A state from another stream, another shard list or no state at all is refused
    before anything changes: the open shard stays open, no sample is lost, the epoch,
    seed and state stay those of the stream."""
    urls = make_shards(str(tmp_path), fmt)
    truth = [ident(s) for s in source(fmt, urls, shuffle=True, seed=5, rank=0, world_size=2)]
    src = source(fmt, urls, shuffle=True, seed=5, rank=0, world_size=2)
    head = _take(src, 3)  # inside the first shard (5 samples or more)
    before = src.state_dict()
    wrong_stream = source(fmt, urls, shuffle=True, seed=9, rank=1, world_size=2)
    _take(wrong_stream, 1)
    other_list = source(fmt, urls[:-1], rank=0, world_size=2)
    _take(other_list, 1)
    for bad in (wrong_stream.state_dict(), other_list.state_dict(), {"version": 99}):
        with pytest.raises(ConfigError):
            src.reset(bad)
        assert src.state_dict() == before and src.seed == 5
    assert head + [ident(s) for s in src] == truth
