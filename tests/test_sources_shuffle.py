"""Row shuffling in Parquet shards mixes row groups, so that a meta-batch holds samples from
across the shard (selection compares them), and resumes exactly mid-window."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from es_pipe import ConfigError
from es_pipe.sources import ParquetSource

ROWS, GROUP = 2000, 250


@pytest.fixture()
def shard(tmp_path):
    url = str(tmp_path / "train-000.parquet")
    pq.write_table(pa.table({"x": np.arange(ROWS, dtype=np.int64)}), url, row_group_size=GROUP)
    return url


def _rows(source, n=None):
    out = []
    for sample in source:
        out.append(int(sample["__index__"]))
        if n is not None and len(out) == n:
            break
    return out


def test_a_meta_batch_spans_many_row_groups(shard):
    epoch = _rows(ParquetSource([shard], shuffle_rows=True, seed=4))
    assert sorted(epoch) == list(range(ROWS))  # every row once
    groups = {i // GROUP for i in epoch[:64]}
    assert len(groups) >= 4, groups  # 64 rows drawn across >= 4 of the 8 row groups
    # the previous behaviour, one row group at a time, stays available
    narrow = _rows(ParquetSource([shard], shuffle_rows=True, seed=4, shuffle_window=1), 64)
    assert len({i // GROUP for i in narrow}) == 1


def test_resume_inside_a_window(shard):
    full = _rows(ParquetSource([shard], shuffle_rows=True, seed=4, shuffle_window=1000))
    first = ParquetSource([shard], shuffle_rows=True, seed=4, shuffle_window=1000)
    head = _rows(first, 1300)  # stops inside the second window
    state = first.get_state()
    again = ParquetSource([shard], shuffle_rows=True, seed=4, shuffle_window=1000)
    again.reset(state)
    assert head + _rows(again) == full


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "big"])
def test_shuffle_window_is_checked(shard, bad):
    with pytest.raises(ConfigError, match="shuffle_window"):
        ParquetSource([shard], shuffle_rows=True, shuffle_window=bad)
