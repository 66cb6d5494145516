"""write_shards and samples_from_folder; shard lists from patterns, globs and fingerprints."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from es_pipe.errors import ConfigError, ShardError
from es_pipe.shard_writer import samples_from_folder, write_shards
from es_pipe.sources import ParquetSource, ShardList, WebDatasetSource, fingerprint


def test_folder_to_tar_roundtrip(tmp_path):
    src_dir = tmp_path / "files"
    (src_dir / "sub").mkdir(parents=True)
    for i in range(7):
        (src_dir / f"img{i}.jpg").write_bytes(b"J" * i)
        (src_dir / f"img{i}.cls").write_text(str(i % 3))
    (src_dir / "sub" / "x.json").write_text("{}")
    urls = write_shards(samples_from_folder(str(src_dir)), f"{tmp_path}/out/s-%04d.tar", "tar", 3)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    got = list(WebDatasetSource(ShardList.from_index(f"{tmp_path}/out/index.txt")))
    assert [s["__key__"] for s in got] == [f"img{i}" for i in range(7)] + ["sub/x"]
    assert got[3]["jpg"] == b"JJJ" and got[3]["cls"] == b"0" and got[7]["json"] == b"{}"
    (src_dir / "README").write_text("no extension")
    with pytest.raises(ConfigError, match="README"):
        list(samples_from_folder(str(src_dir)))


def test_numpy_table_to_parquet_and_tar_on_memory_fs():
    n = 25
    data = {"tokens": np.arange(n * 4).reshape(n, 4), "y": np.arange(n) % 2}
    urls = write_shards(data, "memory://wr/p-%02d.parquet", "parquet", 10)
    assert len(urls) == 3 and ShardList.from_index("memory://wr/index.txt").num_samples == (
        10,
        10,
        5,
    )
    got = list(ParquetSource("memory://wr/p-*.parquet"))
    assert len(got) == n and isinstance(got[4]["tokens"], np.ndarray)
    assert got[4]["tokens"].tolist() == [16, 17, 18, 19] and got[4]["__shard__"] == urls[0]
    turls = write_shards(data, "memory://wr/t-%02d.tar", "tar", 10, index=False)
    s = list(WebDatasetSource(turls))[13]
    assert np.load(io.BytesIO(s["tokens"]), allow_pickle=False).tolist() == [52, 53, 54, 55]
    assert s["y"] == b"1" and s["__key__"] == "000000013"


def test_iterable_to_parquet_and_bad_keys(tmp_path):
    samples = ({"__key__": f"k{i}", "text": f"t{i}"} for i in range(5))
    urls = write_shards(samples, f"{tmp_path}/p-%d.parquet", "parquet", 2)
    got = list(ParquetSource(urls, key_column="__key__", columns=["text"]))
    assert [(s["__key__"], s["text"]) for s in got] == [(f"k{i}", f"t{i}") for i in range(5)]
    with pytest.raises(ConfigError, match="contains a dot"):
        write_shards([{"__key__": "a.b", "x": b""}], f"{tmp_path}/x-%d.tar")
    with pytest.raises(ConfigError, match="not a relative name"):
        write_shards([{"__key__": "../evil", "x": b""}], f"{tmp_path}/y-%d.tar")
    with pytest.raises(ConfigError, match="printf"):
        write_shards([], f"{tmp_path}/nofield.tar")


def test_shard_list_forms_and_fingerprint(tmp_path):
    for i in range(3):
        (tmp_path / f"a-{i}.tar").write_bytes(b"x" * (i + 1))
    brace = ShardList.from_spec(f"{tmp_path}/a-{{0..2}}.tar")
    glob = ShardList.from_spec(f"{tmp_path}/a-*.tar")
    assert brace.urls == glob.urls == tuple(f"{tmp_path}/a-{i}.tar" for i in range(3))
    assert ShardList.from_spec(list(brace.urls)).digest == brace.digest
    with pytest.raises(ConfigError, match="empty"):
        ShardList.from_spec(f"{tmp_path}/zzz-*.tar")
    with pytest.raises(ConfigError, match="more than once"):
        ShardList.from_spec([brace.urls[0], brace.urls[0]])
    fp = fingerprint(brace.urls[2])
    assert fp["size"] == 3 and fp["mtime"] is not None and fp["url"] == brace.urls[2]
    with pytest.raises(ShardError, match="does not exist"):
        fingerprint(f"{tmp_path}/missing.tar")
    pa_url = "memory://fp/x.bin"
    import fsspec

    with fsspec.open(pa_url, "wb") as f:
        f.write(b"abcd")
    assert fingerprint(pa_url)["size"] == 4
    assert ShardList.from_spec("memory://fp/*.bin").urls == ("memory://fp/x.bin",)


def test_rank_from_environment(monkeypatch):
    from es_pipe.sources.shards import resolve_rank

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank(None, None) == (2, 4)
    assert resolve_rank(1, 3) == (1, 3)
    with pytest.raises(ConfigError):
        resolve_rank(3, 3)
    _ = pa  # keep the import used


def _parquet(path, values):
    pq.write_table(pa.table({"v": values}), str(path))


def test_a_literal_path_with_glob_or_brace_characters_is_that_file(tmp_path):
    """Issue 11 item 9: ``tr[1].parquet`` was globbed and read ``tr1.parquet``."""
    _parquet(tmp_path / "tr[1].parquet", [10, 11])
    _parquet(tmp_path / "tr1.parquet", [99])
    _parquet(tmp_path / "tr2.parquet", [98])
    _parquet(tmp_path / "x{a,b}.parquet", [7])
    _parquet(tmp_path / "xa.parquet", [97])
    literal = str(tmp_path / "tr[1].parquet")
    assert [int(r["v"]) for r in ParquetSource([literal])] == [10, 11]
    assert ShardList.from_spec(literal).urls == (literal,)
    braces = str(tmp_path / "x{a,b}.parquet")
    assert [int(r["v"]) for r in ParquetSource(braces)] == [7]
    # a brace expansion that names an existing file is taken literally too
    both = str(tmp_path / "{tr[1],tr2}.parquet")
    assert ShardList.from_spec(both).urls == (literal, str(tmp_path / "tr2.parquet"))
    # no such file: still a glob
    glob = ShardList.from_spec(str(tmp_path / "tr[12].parquet")).urls
    assert glob == (str(tmp_path / "tr1.parquet"), str(tmp_path / "tr2.parquet"))


def test_shard_list_literal_never_expands(tmp_path):
    _parquet(tmp_path / "tr1.parquet", [99])
    missing = str(tmp_path / "tr[1].parquet")  # would glob to tr1.parquet
    shards = ShardList.literal([missing], num_samples=[3])
    assert shards.urls == (missing,) and shards.num_samples == (3,)
    with pytest.raises(ShardError, match="does not exist"):
        list(ParquetSource(shards))
    with pytest.raises(ConfigError, match="list of URLs"):
        ShardList.literal(missing)


def test_parquet_shards_default_to_row_groups_that_pruning_can_skip(tmp_path):
    """write_shards (and es-pipe shard) write 1024-row groups by default, not pyarrow's
    one group per shard: a resume or a run whose pruning covers a whole group skips it."""
    from es_pipe.shard_writer import ROW_GROUP_ROWS

    table = pa.table({"x": np.arange(5000, dtype=np.int64)})
    (url,) = write_shards(table, f"{tmp_path}/p-%03d.parquet", "parquet", 5000, index=False)
    md = pq.ParquetFile(url).metadata
    assert ROW_GROUP_ROWS == 1024
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [1024] * 4 + [904]
    pruned = {url: np.arange(1024, 3072)}  # groups 1 and 2, whole
    got = [int(s["x"]) for s in ParquetSource([url], pruned=pruned)]
    assert got == list(range(1024)) + list(range(3072, 5000))
    (given,) = write_shards(
        table, f"{tmp_path}/q-%03d.parquet", "parquet", 5000, row_group_rows=2500, index=False
    )
    assert pq.ParquetFile(given).metadata.num_row_groups == 2
