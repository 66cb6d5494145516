"""Bad input: a clear ShardError naming the shard (and key), or warn-and-count with skip."""

from __future__ import annotations

import gc
import io
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _sources_helpers import EXT, make_shards, source, write_shard
from _sweep import (
    SCALES,
    es_error_or_ok,
    few_faults,
    outcome_of,
    raises_as_recorded,
    small,
    sweep,
    weird_scalars,
)
from hypothesis import strategies as st

from es_pipe.errors import ConfigError, EsPipeError, ShardError
from es_pipe.shard_writer import write_shards
from es_pipe.sources import ArrowSource, ParquetSource, ShardList, WebDatasetSource


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _good_tar(path, n=10, size=1500):
    members = []
    for i in range(n):
        members += [(f"k{i:03d}.txt", bytes([65 + i % 26]) * size), (f"k{i:03d}.cls", b"%d" % i)]
    return _tar(path, members)


def _offsets(path):
    with tarfile.open(path) as tf:
        return [(m.name, m.offset, m.offset_data) for m in tf.getmembers()]


def _read(src):
    return list(src)


def test_missing_shard(tmp_path):
    good = _good_tar(tmp_path / "a.tar")
    missing = str(tmp_path / "nope.tar")
    with pytest.raises(ShardError, match=r"nope.tar.*does not exist"):
        _read(WebDatasetSource([missing, good]))
    src = WebDatasetSource([missing, good], on_error="skip")
    with pytest.warns(UserWarning) as rec:
        got = _read(src)
    assert len(got) == 10 and src.stats["skipped_shards"] == 1
    assert any("skipped 0 bad samples and the rest of 1 bad shards" in str(w.message) for w in rec)
    pq_missing = str(tmp_path / "nope.parquet")
    with pytest.raises(ShardError, match=r"nope.parquet.*does not exist"):
        _read(ParquetSource([pq_missing]))


def test_truncated_inside_member_data(tmp_path):
    path = _good_tar(tmp_path / "t.tar")
    _, _, data_at = _offsets(path)[10]  # k005.txt
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: data_at + 100])
    with pytest.raises(ShardError, match=r"t.tar.*truncated or corrupt.*'k005'"):
        _read(WebDatasetSource([path]))


@pytest.mark.parametrize("damage", ["cut_at_header", "garbage_header", "no_end_blocks"])
def test_truncated_or_corrupt_tar_never_yields_partial_sample(tmp_path, damage):
    path = _good_tar(tmp_path / "t.tar")
    other = _good_tar(tmp_path / "u.tar")
    name, header_at, _ = _offsets(path)[11]  # k005.cls: the 2nd file of sample 5
    assert name == "k005.cls"
    raw = bytearray(Path(path).read_bytes())
    if damage == "cut_at_header":
        raw = raw[:header_at]
    elif damage == "garbage_header":
        raw[header_at : header_at + 512] = b"\x7f" * 512
    else:
        last = _offsets(path)[-1][2]
        raw = raw[: last + 512]  # members intact, end-of-archive blocks gone
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"t.tar.*end-of-archive"):
        _read(WebDatasetSource([path]))
    src = WebDatasetSource([path, other], on_error="skip")
    with pytest.warns(UserWarning, match=r"t.tar"):
        got = _read(src)
    assert all({"txt", "cls"} <= set(s) for s in got)  # never a partial sample
    from_t = [s["__key__"] for s in got if s["__shard__"] == path]
    expect = [f"k{i:03d}" for i in range(9 if damage == "no_end_blocks" else 5)]
    assert from_t == expect
    assert src.stats["skipped_shards"] == 1 and len(got) == len(expect) + 10


def test_not_a_tar(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"hello world" * 100)
    with pytest.raises(ShardError, match=r"x.tar"):
        _read(WebDatasetSource([str(path)]))


def test_tar_member_without_key(tmp_path):
    path = _tar(tmp_path / "a.tar", [("k0.txt", b"a"), ("README", b"b"), ("k1.txt", b"c")])
    with pytest.raises(ShardError, match=r"a.tar.*'README' has no key"):
        _read(WebDatasetSource([path]))
    src = WebDatasetSource([path], on_error="skip")
    with pytest.warns(UserWarning, match=r"no key"):
        got = _read(src)
    assert [s["__key__"] for s in got] == ["k0", "k1"] and src.stats["skipped_samples"] == 1


def test_tar_duplicate_keys(tmp_path):
    path = _tar(
        tmp_path / "a.tar", [("k0.txt", b"a"), ("k1.txt", b"b"), ("k0.txt", b"c"), ("k2.txt", b"d")]
    )
    with pytest.raises(ShardError, match=r"a.tar.*key 'k0' appears twice"):
        _read(WebDatasetSource([path]))
    src = WebDatasetSource([path], on_error="skip")
    with pytest.warns(UserWarning):
        got = _read(src)
    assert [(s["__key__"], s["__index__"]) for s in got] == [("k0", 0), ("k1", 1), ("k2", 3)]
    path2 = _tar(tmp_path / "b.tar", [("k0.txt", b"a"), ("k0.txt", b"b"), ("k1.txt", b"c")])
    with pytest.raises(ShardError, match=r"b.tar.*'k0' has two 'txt' files"):
        _read(WebDatasetSource([path2]))


def test_parquet_wrong_schema(tmp_path):
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"x": np.arange(3), "y": ["a", "b", "c"]}), a)
    pq.write_table(pa.table({"x": np.arange(3.0), "y": ["a", "b", "c"]}), b)
    with pytest.raises(ShardError, match=r"b.parquet.*'x' has type double, expected int64"):
        _read(ParquetSource([a, b]))
    assert len(_read(ParquetSource([a, b], columns=["y"]))) == 6  # projection avoids it
    schema = pa.schema([("x", pa.int32()), ("y", pa.string())])
    with pytest.raises(ShardError, match=r"a.parquet.*expected int32"):
        _read(ParquetSource([a], schema=schema))
    src = ParquetSource([a, b], on_error="skip")
    with pytest.warns(UserWarning, match=r"b.parquet"):
        assert len(_read(src)) == 3
    c = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({"x": np.arange(3)}), c)
    with pytest.raises(ShardError, match=r"c.parquet.*no column 'y'"):
        _read(ParquetSource([a, c]))


def test_parquet_null_and_duplicate_keys(tmp_path):
    a = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["r0", None, "r2", "r0", "r4"], "x": np.arange(5)}), a)
    with pytest.raises(ShardError, match=r"a.parquet.*null key"):
        _read(ParquetSource([a], key_column="id"))
    b = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": ["r0", "r1", "r2", "r0"], "x": np.arange(4)}), b)
    with pytest.raises(ShardError, match=r"b.parquet.*key 'r0' appears more than once"):
        _read(ParquetSource([b], key_column="id"))
    src = ParquetSource([a], key_column="id", on_error="skip")
    with pytest.warns(UserWarning):
        got = _read(src)
    assert [(s["__key__"], s["__index__"]) for s in got] == [("r0", 0), ("r2", 2), ("r4", 4)]
    assert src.stats["skipped_samples"] == 2


def test_no_leaked_file_descriptors(tmp_path):
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("no /proc")
    os.makedirs(tmp_path / "t")
    os.makedirs(tmp_path / "p")
    urls_t = make_shards(str(tmp_path / "t"), "tar")
    urls_p = make_shards(str(tmp_path / "p"), "parquet")
    bad = _good_tar(tmp_path / "bad.tar")
    raw = Path(bad).read_bytes()
    Path(bad).write_bytes(raw[:4000])
    gc.collect()
    before = len(os.listdir(fd_dir))
    for _ in range(3):
        for fmt, urls in (("tar", urls_t), ("parquet", urls_p)):
            src = source(fmt, urls, shuffle=True)
            next(src), next(src)
            src.reset()  # abandons an open shard
            list(src)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            list(WebDatasetSource([bad, *urls_t], on_error="skip"))
        with pytest.raises(ShardError):
            list(WebDatasetSource([bad]))
    gc.collect()
    assert len(os.listdir(fd_dir)) == before


@pytest.mark.parametrize("fmt", ["tar", "parquet", "arrow", "arrow-stream"])
@pytest.mark.parametrize("actual", [20, 37])
def test_sample_counts_are_checked_against_the_index_file(tmp_path, fmt, actual):
    """Issue 11 item 7: a Parquet or Arrow shard rewritten after its index was read with the
    index's count; equalize='drop' on 3 ranks then yielded [20, 30, 30] (a DDP hang)."""
    ext = EXT[fmt]
    for i in range(3):
        write_shard(fmt, tmp_path / f"s{i}.{ext}", [f"k{i}_{j}" for j in range(30)])
    (tmp_path / "index.txt").write_text("".join(f"s{i}.{ext} 30\n" for i in range(3)))
    write_shard(fmt, tmp_path / f"s2.{ext}", [f"k2_{j}" for j in range(actual)])  # stale index
    shards = ShardList.from_index(str(tmp_path / "index.txt"))
    unit = "samples" if fmt == "tar" else "rows"
    for rank in range(2):
        assert len(list(source(fmt, shards, rank=rank, world_size=3, equalize="drop"))) == 30
    # (more samples than the index says, under equalize: the stream stops at the common
    # length before the end of the shard, where a tar or Arrow shard's count is known)
    equalize = "drop" if actual < 30 or fmt == "parquet" else None
    for key_column in (None, "id") if fmt != "tar" else (None,):
        kw = {} if key_column is None else {"key_column": key_column}
        src = source(fmt, shards, rank=2, world_size=3, equalize=equalize, **kw)
        with pytest.raises(ShardError, match=rf"s2\.{ext}' has {actual} {unit}.*says 30"):
            list(src)
    if fmt == "parquet":  # the footer knows the count: not one row is delivered first
        got = []
        with pytest.raises(ShardError, match="index"):
            got.extend(source(fmt, shards, rank=2, world_size=3))
        assert got == []
    skip = source(fmt, shards, rank=2, world_size=3, equalize=equalize, on_error="skip")
    with pytest.warns(UserWarning, match=f"has {actual} {unit}"):
        got = list(skip)
    assert skip.stats["skipped_shards"] == 1 and len(got) < actual


# --------------------------------------------------------------------------- swept bad inputs
# Hypothesis sweeps (tests/_sweep.py): every input gives a correct result or an es_pipe
# error with a message, never a raw exception or a hang; a rejected call changes no state.


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    tars = write_shards(
        [{"__key__": f"k{i}", "txt": f"t{i}"} for i in range(12)], f"{base}/t-%03d.tar", "tar", 4
    )
    table = pa.table({"id": [f"r{i}" for i in range(12)], "x": np.arange(12)})
    pqs = write_shards(table, f"{base}/p-%03d.parquet", "parquet", 4, row_group_rows=2)
    arrows = []
    for i in range(3):
        url = f"{base}/a-{i:03d}.arrow"
        with pa.OSFile(url, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table.slice(4 * i, 4))
        arrows.append(url)
    (base / "dir.tar").mkdir()
    (base / "empty.tar").write_bytes(b"")
    (base / "text.parquet").write_text("not parquet")
    return {"tar": tars, "parquet": pqs, "arrow": arrows, "base": str(base)}


SOURCE_CLASSES = {"tar": WebDatasetSource, "parquet": ParquetSource, "arrow": ArrowSource}


def _epoch(src) -> list[dict]:
    return list(src)


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_source_options(n, shard_sets):
    """Source options from the README: accepted ones read every sample exactly once (or
    the equalized count); the others raise a ConfigError at construction or reset."""

    def check(case):
        fmt, kw = case
        urls = shard_sets[fmt]
        other = ("columns", "key_column", "batch_rows", "shuffle_rows")
        other = other if fmt == "tar" else ("shuffle_buffer",)
        kw = {k: v for k, v in kw.items() if k not in other}
        if kw.get("num_samples") == "right":
            kw["num_samples"] = dict.fromkeys(urls, 4)

        samples, error = es_error_or_ok(
            lambda: _epoch(SOURCE_CLASSES[fmt](urls, **kw)), (EsPipeError,)
        )
        if error is None:
            ids = [(s["__shard__"], s["__index__"]) for s in samples]
            whole = kw.get("rank") in (None, 0) and kw.get("world_size") in (None, 1)
            whole &= kw.get("num_workers") in (None, 1)
            if kw.get("equalize") is None and not kw.get("pruned") and whole:
                assert sorted(ids) == sorted((u, j) for u in urls for j in range(4))
            assert len(set(ids)) == len(ids) or kw.get("equalize") == "pad"
        return outcome_of(error)

    pruned_ok = st.lists(st.integers(0, 6), max_size=4, unique=True).map(
        lambda v: lambda u, e: np.array(sorted(v), dtype=np.int64)
    )
    valid = {
        "shuffle": st.booleans(),
        "seed": st.integers(0, 2**64),
        "epoch": st.integers(0, 5),
        "rank": st.just(0),
        "world_size": st.just(1),
        "worker": st.just(0),
        "num_workers": st.just(1),
        "equalize": st.sampled_from([None, "drop", "pad"]),
        "on_error": st.sampled_from(["raise", "skip"]),
        "pruned": st.one_of(st.none(), pruned_ok),
        "num_samples": st.just("right"),
        "shuffle_buffer": st.integers(0, 8),
        "columns": st.sampled_from([None, ["x"], ["id", "x"]]),
        "key_column": st.sampled_from([None, "id"]),
        "batch_rows": st.integers(1, 5),
        "shuffle_rows": st.booleans(),
    }
    bad = {
        "shuffle": weird_scalars,
        "seed": small,
        "epoch": small,
        "rank": st.one_of(st.none(), small),
        "world_size": st.one_of(st.none(), small),
        "worker": st.one_of(st.none(), small),
        "num_workers": st.one_of(st.none(), small),
        "equalize": st.sampled_from(["x", 1, [], "DROP"]),
        "on_error": st.sampled_from(["x", None, ["raise"]]),
        "pruned": st.one_of(
            weird_scalars,
            st.lists(st.integers(-2, 6), max_size=4).map(lambda v: lambda u, e: np.array(v)),
            st.lists(weird_scalars, max_size=3).map(lambda v: lambda u, e: v),
            st.lists(st.integers(-2, 6), max_size=3).map(lambda v: {"x": v}),
        ),
        "num_samples": st.one_of(
            weird_scalars, st.dictionaries(st.text(max_size=3), weird_scalars, max_size=2)
        ),
        "shuffle_buffer": small,
        "columns": st.one_of(
            weird_scalars, st.just(["nope"]), st.just("x"), st.lists(weird_scalars, max_size=2)
        ),
        "key_column": st.one_of(weird_scalars, st.just("x"), st.just("nope")),
        "batch_rows": small,
        "shuffle_rows": weird_scalars,
    }
    options = few_faults(valid, bad)  # keys a format does not take are dropped in check

    fmts = st.sampled_from(list(SOURCE_CLASSES))
    sweep("source options", st.tuples(fmts, options), check, n)


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_shard_lists(n, shard_sets):
    """Shard lists: empty, non-existent, directories, weird URLs, duplicates, non-strings,
    other formats, broken brace patterns: a ShardError/ConfigError, never a raw error."""
    base = shard_sets["base"]
    entries = st.one_of(
        st.sampled_from(shard_sets["tar"] + shard_sets["parquet"] + shard_sets["arrow"]),
        st.sampled_from(
            [
                "",
                " ",
                "\x00",
                "/",
                ".",
                "..",
                f"{base}/nope.tar",
                f"{base}/dir.tar",
                f"{base}/empty.tar",
                f"{base}/text.parquet",
                f"{base}/*.nothing",
                f"{base}/t-{{000..002}}.tar",
                f"{base}/t-{{000..",
                f"{base}/t-}}.tar",
                f"{base}/[",
                "memory://nowhere/x.tar",
                "foo://bar/x",
                "file:///nope",
                "s3:/",
                "http://",
                f"{base}/t-*.tar",
                f"{base}/p-*.parquet",
            ]
        ),
        st.text(max_size=12),
        weird_scalars,
    )
    spec = st.one_of(
        entries,
        st.lists(entries, max_size=4),
        st.tuples(entries, entries),
        st.just([]),
        st.sets(st.sampled_from(shard_sets["tar"])),
    )

    def check(case):
        fmt, urls = case
        samples, error = es_error_or_ok(lambda: _epoch(SOURCE_CLASSES[fmt](urls)), (EsPipeError,))
        if error is None:
            assert all(s["__shard__"] for s in samples)
        return outcome_of(error)

    sweep("shard lists", st.tuples(st.sampled_from(list(SOURCE_CLASSES)), spec), check, n)


# One example per library bug the bad-input sweep found in the sources' arguments (each was a raw
# error or a crash).
REGRESSIONS = {
    "rank of a str": (ConfigError, "rank",
                      lambda: WebDatasetSource("x.tar", rank="0", world_size=1)),
    "open brace": (ConfigError, "braces", lambda: WebDatasetSource("x-{000..")),
    "negative seed": (ConfigError, "seed", lambda: ParquetSource("x.parquet", seed=-1)),
    "columns of a str": (ConfigError, "columns",
                         lambda: ParquetSource("x.parquet", columns="xy")),
}  # fmt: skip


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions_found_by_the_sweep(name):
    raises_as_recorded(*REGRESSIONS[name])
