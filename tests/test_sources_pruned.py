"""The pruned-row hook: dropped before decoding; Parquet row groups not read at all."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from _sources_helpers import FORMATS, SIZES, all_idents, ident, make_shards, source

from es_pipe.errors import ConfigError


def _pruned(urls):
    # shard 3 (12 rows, row groups [0..3], [4..7], [8..11]): whole first group + some rows
    return {
        urls[3]: np.array([0, 1, 2, 3, 5, 11], dtype=np.int64),
        urls[0]: np.arange(5, dtype=np.int64),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("as_callable", [False, True])
def test_pruned_rows_are_dropped_and_ordinals_kept(tmp_path, fmt, as_callable):
    urls = make_shards(str(tmp_path), fmt)
    pruned = _pruned(urls)
    calls = []

    def fn(url, epoch):
        calls.append(epoch)
        return pruned.get(url)

    src = source(fmt, urls, shuffle=True, seed=1, epoch=4, pruned=fn if as_callable else pruned)
    got = [ident(s) for s in src]
    gone = {(u, int(j)) for u, arr in pruned.items() for j in arr}
    assert sorted(got) == sorted(set(all_idents(urls)) - gone)
    assert src.stats["pruned"] == 11 and src.stats["samples"] == sum(SIZES) - 11
    if as_callable:
        assert set(calls) == {4}
    if fmt == "parquet":
        keyed = source(fmt, urls, key_column="id", pruned=pruned)
        for s in keyed:
            assert s["__key__"] == f"s{urls.index(s['__shard__'])}_{s['__index__']}"


def test_parquet_fully_pruned_row_groups_are_not_read(tmp_path, monkeypatch):
    urls = make_shards(str(tmp_path), "parquet")
    asked = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        asked.append(list(kw.get("row_groups") or []))
        return real(self, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    src = source("parquet", [urls[3]], pruned=_pruned(urls))
    assert [s["__index__"] for s in src] == [4, 6, 7, 8, 9, 10]
    assert asked == [[1, 2]]  # row group 0 (rows 0..3) entirely pruned: never read
    asked.clear()
    src = source("parquet", [urls[3]], pruned={urls[3]: np.arange(12)})
    assert list(src) == [] and asked == []


# tar: pruned payloads are never copied, and beyond a read they are seeked over:
# tests/test_tar_reader.py::test_pruned_payloads_are_seeked_over_not_read counts the bytes.


def test_invalid_pruned_arrays(tmp_path):
    urls = make_shards(str(tmp_path), "parquet")
    with pytest.raises(ConfigError, match="sorted, unique"):
        list(source("parquet", urls, pruned={urls[0]: np.array([3, 1])}))
    with pytest.raises(ConfigError, match="integer"):
        list(source("parquet", urls, pruned={urls[0]: np.array([0.5])}))
    with pytest.raises(ConfigError, match="mapping"):
        source("parquet", urls, pruned=[1, 2])
