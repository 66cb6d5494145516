"""Attributes a class shows from one of its parts (``es_pipe.forward.Forward``): read live
from the part, and read-only like a property without a setter (an assignment must not
quietly shadow the part's value on the instance)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from es_pipe.manifests import ManifestReader
from es_pipe.shard_writer import write_shards
from es_pipe.sources import ParquetSource


def test_a_source_shows_its_parts_values_live_and_refuses_assignment(tmp_path):
    table = pa.table({"id": [f"r{i}" for i in range(8)], "x": np.arange(8)})
    urls = write_shards(table, f"{tmp_path}/p-%03d.parquet", "parquet", 2)
    src = ParquetSource(urls, rank=1, world_size=2, on_error="skip", epoch=3)
    assert (src.rank, src.world_size, src.on_error, src.epoch) == (1, 2, "skip", 3)
    assert src.equalize is None and src.last_epoch_stats is None
    got = list(src)
    assert len(got) == 4  # this rank's half
    assert src.last_epoch_stats is not None  # read anew: the epoch's stats, once it ended
    assert (src.last_epoch_stats["epoch"], src.last_epoch_stats["samples"]) == (3, 4)
    with pytest.raises(AttributeError, match="'rank' of 'ParquetSource' object has no setter"):
        src.rank = 0
    assert src.rank == 1 and "rank" not in vars(src)


def test_a_manifest_reader_shows_its_filesystems_values(tmp_path):
    reader = ManifestReader(str(tmp_path))
    assert reader.url == str(tmp_path) and reader.root == str(tmp_path)
    assert reader.retries == 0 and reader.retry is reader.store.retry
    with pytest.raises(AttributeError, match="no setter"):
        reader.retries = 5
    assert ManifestReader.retries.__doc__ == "Filesystem calls retried so far."
