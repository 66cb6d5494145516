"""The epoch commit's fast path writes the same data: what the codec builds from the
pruning state byte, how the files are encoded, the markers and done-files as JSON, and
publishing into an epoch folder that is missing, present or half-published."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from es_pipe.manifests import Manifests, codec, layout
from es_pipe.manifests.writer import STATE_BITS

SHARDS = ["s3://b/train-0000.tar", "s3://b/train-0001.tar", "s3://b/train-0002.tar"]


def _columns(n: int, seed: int) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    # every state the pruning rule writes: kept, kept + upweighted, streaks 1, 2 and 127
    state = gen.choice(np.array([0, 0x80, 1, 2, 3, 0x7F], np.uint8), n)
    return {
        "score": gen.random(n, np.float32),
        "loss": gen.random(n, np.float32),
        "visits": gen.integers(0, 9, n).astype(np.uint32),
        "step": gen.integers(0, 1000, n).astype(np.int32),
        "state": state,
    }


def _epoch(root: str, epoch: int, n: int = 3000) -> tuple[Manifests, dict]:
    m = Manifests(root)
    cols = {s: _columns(n, i + 7 * epoch) for i, s in enumerate(SHARDS)}
    m.write_shards(
        epoch,
        [
            {
                "shard": s,
                "columns": cols[s],
                "keys": pa.array([f"{i:05d}-{j}" for j in range(n)]),
                "factor": 1.5,
                "hyper": {"step": epoch},
            }
            for i, s in enumerate(SHARDS)
        ],
    )
    m.finish(epoch)
    return m, cols


def test_columns_from_the_state_byte_match_a_per_sample_reference(tmp_path):
    m, cols = _epoch(str(tmp_path), 0)
    marker = m.commit(0)
    by_shard = {e["shard"]: e for e in marker["files"]}
    for shard in SHARDS:
        state = cols[shard]["state"]
        got = m.read_shard(shard).columns
        # the reference, one sample at a time (what the vectorised build must equal)
        streak = [int(s) & 0x7F for s in state]
        weight = [1.5 if int(s) & 0x80 else 1.0 for s in state]
        assert got["streak"].tolist() == streak
        assert got["pruned"].tolist() == [s > 0 for s in streak]
        assert got["weight"].tolist() == weight
        assert by_shard[shard]["pruned"] == sum(s > 0 for s in streak)
        assert by_shard[shard]["repruned"] == sum(s >= 2 for s in streak)
        assert by_shard[shard]["rows"] == len(state)


def test_a_short_or_missing_state_means_kept(tmp_path):
    cols = _columns(10, 0)
    short = codec.build_table("a", {**cols, "state": cols["state"][:4]}, bits=STATE_BITS)
    assert short.column("streak").to_pylist()[4:] == [0] * 6
    assert short.column("weight").to_pylist()[4:] == [1.0] * 6
    none = codec.build_table("a", {k: v for k, v in cols.items() if k != "state"}, bits=STATE_BITS)
    assert none.column("pruned").to_pylist() == [False] * 10
    none.validate(full=True)
    assert none.column("key").null_count == 10


def test_files_read_back_with_pyarrow_polars_and_datasets(tmp_path):
    m, _ = _epoch(str(tmp_path), 0)
    m.commit(0)
    files = sorted((tmp_path / "epoch=0").glob("*.parquet"))
    assert len(files) == len(SHARDS)
    for path in files:
        meta = pq.ParquetFile(path).metadata
        row = meta.row_group(0).column(meta.schema.names.index("row"))
        assert "DELTA_BINARY_PACKED" in row.encodings  # ordinals delta-packed
        assert row.statistics.min == 0 and row.statistics.max == 2999
        assert pq.read_table(path).column("row").to_pylist() == list(range(3000))
        frame = pl.read_parquet(path)
        assert frame["row"].to_list() == list(range(3000))
    table = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 3 * 3000


def test_marker_and_done_file_are_json_with_one_line_per_file(tmp_path):
    m, _ = _epoch(str(tmp_path), 0)
    done_path = tmp_path / layout.staging(0, m.attempt, "_done", "rank=0.json")
    done_text = done_path.read_text()
    done = json.loads(done_text)
    assert done["format"] == codec.DONE_FORMAT and len(done["files"]) == len(SHARDS)
    marker = m.commit(0)
    text = (tmp_path / layout.marker_name(0)).read_text()
    assert json.loads(text) == marker
    lines = text.splitlines()
    for entry in marker["files"]:  # each file entry on a line of its own, whole
        assert sum(json.dumps(entry) in line for line in lines) == 1
    assert text.endswith("}\n")
    assert Manifests(str(tmp_path)).marker(0) == marker


def test_publish_into_a_missing_and_a_half_published_epoch_folder(tmp_path):
    m, cols = _epoch(str(tmp_path), 0)
    m.commit(0)
    m, cols = _epoch(str(tmp_path), 1)
    # a first commit of epoch 1 published one file and died before its marker
    staged = sorted((tmp_path / "_staging" / "epoch=1").rglob("*.parquet.part"))
    entry = json.loads(
        (tmp_path / layout.staging(1, m.attempt, "_done", "rank=0.json")).read_text()
    )["files"][0]
    os.makedirs(tmp_path / "epoch=1")
    os.replace(tmp_path / entry["staged"], tmp_path / entry["path"])
    assert len(staged) == len(SHARDS)
    marker = m.commit(1)
    assert len(marker["files"]) == len(SHARDS)
    for shard in SHARDS:
        got = Manifests(str(tmp_path)).read_shard(shard)
        assert got.epoch == 1
        assert np.array_equal(got.columns["score"], cols[shard]["score"])
    assert not (tmp_path / "_staging" / "epoch=1").exists()
