"""Every sample exactly once per epoch across ranks x workers; equalisation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _sources_helpers import (
    FORMATS,
    SIZES,
    all_idents,
    base_url,
    ident,
    make_shards,
    real_shards,
    source,
)

from es_pipe.sources import ShardList, SourceDataset, WebDatasetSource


def _read_all_streams(fmt, urls, ranks, workers, epoch=0, **kw):
    out = []
    per_stream = []
    for r in range(ranks):
        for w in range(max(workers, 1)):
            wk = {} if workers == 0 else {"worker": w, "num_workers": workers}
            src = source(
                fmt, urls, rank=r, world_size=ranks, shuffle=True, seed=3, epoch=epoch, **wk, **kw
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = [ident(s) for s in src]
            per_stream.append(got)
            out += got
    return out, per_stream


@pytest.mark.parametrize("fs", ["local", "memory"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_sample_once_across_ranks_and_workers(tmp_path, fmt, fs):
    urls = make_shards(base_url(tmp_path, fs), fmt)
    expected = all_idents(urls)
    for ranks in (1, 2, 4):
        for workers in (0, 1, 3):
            got, _ = _read_all_streams(fmt, urls, ranks, workers)
            assert sorted(got) == expected, (ranks, workers)


def test_epochs_differ_and_each_is_complete(tmp_path):
    urls = make_shards(str(tmp_path), "parquet")
    src = source("parquet", urls, shuffle=True, seed=5, shuffle_rows=True)
    e0 = [ident(s) for s in src]
    src.reset()
    e1 = [ident(s) for s in src]
    assert src.epoch == 1
    assert sorted(e0) == sorted(e1) == all_idents(urls)
    assert e0 != e1
    src.set_epoch(0)
    src.reset()
    assert [ident(s) for s in src] == e0


def test_extra_reset_without_iterating_does_not_skip_an_epoch(tmp_path):
    urls = make_shards(str(tmp_path), "tar")
    src = source("tar", urls, shuffle=True)
    src.reset()
    src.reset()
    assert src.epoch == 0


def test_real_dataloader_worker_processes(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    urls = make_shards(str(tmp_path), "tar")
    ds = SourceDataset(WebDatasetSource(urls, shuffle=True, seed=1))
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=2)
    got = [(s["__shard__"], int(s["__index__"])) for s in loader]
    assert sorted(got) == all_idents(urls)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_equalize_pad_and_drop(tmp_path, fmt):
    urls = make_shards(str(tmp_path), fmt)
    counts = dict(zip(urls, SIZES, strict=True))
    _, none_streams = _read_all_streams(fmt, urls, 4, 0, num_samples=counts)
    lengths = [len(s) for s in none_streams]
    assert len(set(lengths)) > 1  # the uneven split this test is about
    got, streams = _read_all_streams(fmt, urls, 4, 0, equalize="pad", num_samples=counts)
    assert [len(s) for s in streams] == [max(lengths)] * 4
    assert set(got) == set(all_idents(urls))  # nothing lost; repeats are the padding
    assert len(got) - len(set(got)) == 4 * max(lengths) - sum(SIZES)
    got, streams = _read_all_streams(fmt, urls, 4, 0, equalize="drop", num_samples=counts)
    assert [len(s) for s in streams] == [min(lengths)] * 4
    assert len(got) == len(set(got))  # no repeats; the surplus is dropped


def test_equalize_needs_counts_for_tar(tmp_path):
    from es_pipe.errors import ConfigError

    urls = make_shards(str(tmp_path), "tar")
    with pytest.raises(ConfigError, match="sample count"):
        next(source("tar", urls, equalize="pad"))


def test_more_streams_than_shards(tmp_path):
    sizes = [4, 6]
    urls = make_shards(str(tmp_path), "parquet", sizes)
    src = source("parquet", urls, rank=3, world_size=4)
    with pytest.warns(UserWarning, match="no shard to read"):
        assert list(src) == []
    src = source("parquet", urls, rank=3, world_size=4, equalize="pad")
    assert len(list(src)) == 6
    rep = source("parquet", urls, rank=0, world_size=4).split_report()
    assert rep["samples_per_stream"] == [4, 6, 0, 0] and rep["imbalance"] == pytest.approx(1.4)


def test_index_file_and_split_report(tmp_path):
    from es_pipe.shard_writer import write_shards

    samples = [{"__key__": f"k{i:03d}", "txt": str(i)} for i in range(23)]
    write_shards(samples, f"{tmp_path}/t-%02d.tar", "tar", 5)
    shards = ShardList.from_index(f"{tmp_path}/index.txt")
    assert shards.num_samples == (5, 5, 5, 5, 3)
    rep = WebDatasetSource(shards, rank=0, world_size=2).split_report()
    assert sorted(rep["samples_per_stream"]) == [10, 13]


def test_set_epoch_with_non_persistent_workers(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    urls = make_shards(str(tmp_path), "parquet")
    ds = SourceDataset(source("parquet", urls, shuffle=True, seed=8, shuffle_rows=True))
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=2)
    epochs = []
    for e in range(2):
        ds.set_epoch(e)
        epochs.append([(s["__shard__"], int(s["__index__"])) for s in loader])
    assert sorted(epochs[0]) == sorted(epochs[1]) == all_idents(urls)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("fmt", ["tar", "parquet", "arrow", "arrow-stream"])
def test_equalize_drop_with_more_streams_than_shards_is_an_error(tmp_path, fmt):
    """Issue 11 item 6: every rank yielded 0 samples, every epoch, without a word."""
    from es_pipe.errors import ConfigError

    sizes = [4, 6, 5]
    urls = real_shards(tmp_path, fmt, sizes)
    counts = dict(zip(urls, sizes, strict=True))
    for ranks, workers in ((4, 1), (2, 2), (8, 1)):
        for r in range(ranks):
            for w in range(workers):
                src = source(
                    fmt,
                    urls,
                    rank=r,
                    world_size=ranks,
                    worker=w,
                    num_workers=workers,
                    equalize="drop",
                    num_samples=counts,
                )
                with pytest.raises(ConfigError) as err:
                    list(src)
                message = str(err.value)
                assert "0 samples on every rank" in message
                assert f"3 shards for {ranks * workers} streams" in message
                for fix in ("fewer ranks", "more (smaller) shards", "equalize='pad'"):
                    assert fix in message
    # as many streams as shards: drop cuts every stream to the shortest shard
    kw = {"world_size": 3, "equalize": "drop", "num_samples": counts}
    assert [len(list(source(fmt, urls, rank=r, **kw))) for r in range(3)] == [4, 4, 4]


def test_equalize_drop_refuses_a_stream_pruned_empty(tmp_path):
    from es_pipe.errors import ConfigError

    urls = real_shards(tmp_path, "tar", [4, 6, 5])
    counts = dict(zip(urls, [4, 6, 5], strict=True))
    pruned = {urls[1]: np.arange(6)}  # every sample of the shard stream 1 reads
    src = source(
        "tar", urls, rank=0, world_size=3, equalize="drop", num_samples=counts, pruned=pruned
    )
    with pytest.raises(ConfigError, match=r"hold no sample this epoch.*equalize='pad'"):
        list(src)
    padded = source(
        "tar", urls, rank=1, world_size=3, equalize="pad", num_samples=counts, pruned=pruned
    )
    with pytest.warns(UserWarning, match="nothing left to pad"):
        assert list(padded) == []
