"""Parquet shard manifests: schema, round trip, readers, layout safety, ranks, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn
from _sweep import SCALES, es_error_or_ok, outcome_of, raises_as_recorded, sweep
from hypothesis import strategies as st

import es_pipe
from es_pipe.errors import ConfigError, EsPipeError, ManifestError
from es_pipe.manifests import Manifests, arrow_schema, safe_name, schema_spec
from es_pipe.tools.cli import main as cli_main


def _columns(n, seed=0):
    gen = np.random.default_rng(seed)
    state = np.zeros(n, np.uint8)
    state[gen.random(n) < 0.2] = 1
    state[(state == 0) & (gen.random(n) < 0.2)] = 0x80
    return {
        "score": gen.random(n).astype(np.float32),
        "loss": gen.random(n).astype(np.float32),
        "visits": gen.integers(0, 9, n).astype(np.uint32),
        "step": gen.integers(0, 1000, n).astype(np.int32),
        "state": state,
    }


def _commit(root, epoch, shards, rank=0, **kw):
    m = Manifests(str(root), rank=rank, **kw)
    for i, shard in enumerate(shards):
        m.write_shard(
            epoch,
            shard,
            _columns(50, i + 10 * epoch),
            keys=pa.array([f"{shard}/k{j}" for j in range(50)]),
            factor=1.25,
        )
    m.finish(epoch)
    return m


def test_written_schema_is_exactly_the_schema_file(tmp_path):
    m = _commit(tmp_path, 0, ["a.tar"])
    m.commit(0)
    (path,) = list((tmp_path / "epoch=0").glob("*.parquet"))
    written = pq.read_schema(path)
    assert written.remove_metadata().equals(arrow_schema(), check_metadata=False)
    spec = schema_spec()
    types = {
        "float32": "float",
        "dictionary<int32,string>": "dictionary<values=string, indices=int32, ordered=0>",
    }
    assert [(f.name, str(f.type), f.nullable) for f in written] == [
        (f["name"], types.get(f["type"], f["type"]), f["nullable"]) for f in spec["fields"]
    ]
    meta = json.loads(written.metadata[spec["metadata_key"].encode()])
    assert set(meta) == set(spec["file_metadata"])
    assert meta["schema_version"] == spec["version"] and meta["es_pipe_version"]


def test_round_trip_is_exact(tmp_path):
    m = Manifests(str(tmp_path))
    cols = _columns(1000)
    keys = pa.array([None if i % 97 == 0 else f"k{i}" for i in range(1000)], pa.string())
    fp = {"url": "x", "size": 3, "etag": None, "mtime": 1.5}
    m.write_shard(
        4,
        "s3://bucket/dir/train-01.tar",
        cols,
        keys=keys,
        factor=1.75,
        fingerprint=fp,
        hyper={"beta1": 0.2},
    )
    m.finish(4)
    m.commit(4)
    got = Manifests(str(tmp_path)).read_shard("s3://bucket/dir/train-01.tar")
    assert got.epoch == 4 and got.rows == 1000 and got.keys.equals(keys)
    for name in ("score", "loss", "visits", "step"):
        assert got.columns[name].dtype == cols[name].dtype
        assert np.array_equal(got.columns[name], cols[name])
    assert np.array_equal(got.columns["streak"], cols["state"] & 0x7F)
    assert np.array_equal(got.columns["pruned"], (cols["state"] & 0x7F) > 0)
    assert np.array_equal(got.columns["weight"] != 1, (cols["state"] & 0x80) > 0)
    assert got.meta["fingerprint"] == fp and got.meta["hyper"] == {"beta1": 0.2}


def test_plain_readers_see_one_table_of_committed_data(tmp_path):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    _commit(tmp_path, 0, ["a.tar", "b.tar"]).commit(0)
    _commit(tmp_path, 1, ["a.tar", "b.tar"]).commit(1)
    _commit(tmp_path, 2, ["a.tar", "b.tar"])  # staged, never committed
    assert any((tmp_path / "_staging").rglob("*.part"))
    table = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 200 and sorted(set(table.column("epoch").to_pylist())) == [0, 1]
    frame = pd.read_parquet(str(tmp_path))
    assert len(frame) == 200 and set(frame["shard"]) == {"a.tar", "b.tar"}
    rows = duckdb.sql(
        f"select epoch, count(*), sum(pruned::int) from '{tmp_path}/**/*.parquet' "
        "group by 1 order by 1"
    ).fetchall()
    ours = [Manifests(str(tmp_path)).read_epoch(e) for e in (0, 1)]
    assert rows == [(e, 100, int(np.sum(t.column("pruned")))) for e, t in enumerate(ours)]
    assert Manifests(str(tmp_path)).latest() == 1


@pytest.mark.parametrize(
    "shard",
    [
        "../../x",
        "/etc/passwd",
        "s3://b/../../..",
        "..",
        "a/b\\..\\c",
        "x" * 500,
        "ünï cödé?*.tar",
        "",
    ],
)
def test_file_names_never_leave_the_root(tmp_path, shard):
    root = tmp_path / "root"
    m = Manifests(str(root))
    m.write_shard(0, shard, _columns(5))
    m.finish(0)
    m.commit(0)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(root in p.parents for p in files)
    name = safe_name(shard)
    assert "/" not in name and not name.startswith(".") and len(name) <= 93
    assert Manifests(str(root)).read_shard(shard).rows == 5


def test_two_ranks_write_one_epoch(tmp_path):
    r0 = _commit(tmp_path, 0, ["a.tar", "b.tar"], rank=0, attempt="job1")
    _commit(tmp_path, 0, ["c.tar"], rank=1, attempt="job1")
    marker = r0.commit(0, expected_ranks=2, timeout=5)
    assert marker["ranks"] == [0, 1] and marker["rows"] == 150
    m = Manifests(str(tmp_path))
    assert set(m.shards(0)) == {"a.tar", "b.tar", "c.tar"}
    assert m.read_epoch(0).num_rows == 150


def test_commit_names_missing_ranks(tmp_path):
    r0 = _commit(tmp_path, 0, ["a.tar"], rank=0, attempt="job1")
    _commit(tmp_path, 0, ["b.tar"], rank=2, attempt="older-job")  # another attempt: ignored
    with pytest.raises(ManifestError, match=r"ranks \[1, 2\] of \[0, 1, 2\]"):
        r0.commit(0, expected_ranks=3, timeout=0.3, poll=0.05)
    assert Manifests(str(tmp_path)).latest() is None


def test_two_ranks_cannot_both_own_a_shard(tmp_path):
    r0 = _commit(tmp_path, 0, ["a.tar"], rank=0, attempt="j")
    _commit(tmp_path, 0, ["a.tar"], rank=1, attempt="j")
    with pytest.raises(ManifestError, match="both wrote"):
        r0.commit(0, expected_ranks=2, timeout=1)


def test_recommit_replaces_later_epochs(tmp_path):
    for e in range(3):
        _commit(tmp_path, e, ["a.tar"]).commit(e)
    with pytest.warns(UserWarning, match="re-committing epoch 1"):
        _commit(tmp_path, 1, ["b.tar"]).commit(1)
    m = Manifests(str(tmp_path))
    assert m.committed() == [0, 1] and set(m.shards(1)) == {"b.tar"}
    assert [p.name for p in (tmp_path / "epoch=1").iterdir()] == [
        m.shards(1)["b.tar"]["path"].split("/")[-1]
    ]


# --------------------------------------------------------------------------- bad input


def test_root_without_epochs_and_uncommitted_epoch(tmp_path):
    m = Manifests(str(tmp_path))
    with pytest.raises(ManifestError, match="no committed epoch"):
        m.latest(required=True)
    _commit(tmp_path, 0, ["a.tar"]).commit(0)
    _commit(tmp_path, 1, ["a.tar"])
    with pytest.raises(ManifestError, match=r"epoch 1 .* is not committed .*staged.*newest is 0"):
        m.marker(1)
    assert m.read_shard("a.tar").epoch == 0


def _only_file(root):
    (path,) = list((root / "epoch=0").glob("*.parquet"))
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_or_truncated_file(tmp_path, damage):
    _commit(tmp_path, 0, ["a.tar"]).commit(0)
    path = _only_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"not parquet at all" * 10)
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"{path.name}.*corrupt or truncated"):
        Manifests(str(tmp_path)).read_shard("a.tar")


def test_unparseable_parquet_with_matching_checksum(tmp_path):
    _commit(tmp_path, 0, ["a.tar"]).commit(0)
    path = _only_file(tmp_path)
    junk = b"PAR1" + b"\0" * 100 + b"PAR1"
    path.write_bytes(junk)
    marker_path = tmp_path / "_commits" / "epoch=00000000.json"
    marker = json.loads(marker_path.read_text())
    import zlib

    marker["files"][0].update(size=len(junk), crc32=zlib.crc32(junk))
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        Manifests(str(tmp_path)).read_shard("a.tar")


def test_unknown_schema_version(tmp_path):
    _commit(tmp_path, 0, ["a.tar"]).commit(0)
    marker_path = tmp_path / "_commits" / "epoch=00000000.json"
    marker = json.loads(marker_path.read_text())
    marker["schema_version"] = 99
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(ManifestError, match="schema version 99"):
        Manifests(str(tmp_path)).read_shard("a.tar")


def test_unknown_schema_version_in_file(tmp_path):
    from es_pipe.manifests import build_table, encode_table, file_meta
    from es_pipe.manifests.writer import STATE_BITS

    table = build_table("a.tar", _columns(3), bits=STATE_BITS)
    data = encode_table(table, {"schema_version": 7})
    schema = pq.read_schema(pa.BufferReader(data))
    with pytest.raises(ManifestError, match="schema version 7"):
        file_meta(schema, "x.parquet")


def test_marker_naming_a_path_outside_the_root(tmp_path):
    _commit(tmp_path, 0, ["a.tar"]).commit(0)
    marker_path = tmp_path / "_commits" / "epoch=00000000.json"
    marker = json.loads(marker_path.read_text())
    marker["files"][0]["path"] = "../../etc/passwd"
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(ManifestError, match="not a plain path"):
        Manifests(str(tmp_path)).marker(0)


# --------------------------------------------------------------------------- sampler


def _write_shards(tmp_path, n_shards=2, per=40):
    """Real files as shards (the fingerprint is taken from them)."""
    urls = []
    for s in range(n_shards):
        path = tmp_path / "data" / f"shard-{s}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes(range(per)))
        urls.append(str(path))
    return urls


def _samples(urls, per=40, key="k"):
    return [
        {
            "x": torch.tensor([float((i * 31) % 11)]),
            "__key__": f"{key}{i}",
            "__shard__": url,
            "__index__": i,
        }
        for url in urls
        for i in range(per)
    ]


def _run(root, samples, epochs, prune=None):
    eswp = es_pipe.ESWP(prune=prune, manifests=str(root))
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=1, eswp=eswp)
    loader = tn.Loader(es_pipe.SelectStage(samples, sampler))
    for _ in range(epochs):
        for meta in loader:
            meta.select(meta.data["x"][:, 0] + 0.5)
    return sampler


def test_sampler_resumes_scores_and_decisions_exactly(tmp_path):
    urls = _write_shards(tmp_path)
    prune = es_pipe.Pruning(ratio=0.5, anneal=0)
    first = _run(tmp_path / "m", _samples(urls), 2, prune=prune)
    assert Manifests(str(tmp_path / "m")).committed() == [0, 1]
    again = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        4,
        seed=1,
        rank=0,
        world_size=1,
        eswp=es_pipe.ESWP(manifests=str(tmp_path / "m"), prune=prune),
    )
    assert (again.epoch, again.step) == (first.epoch, first.step)
    for url in urls:
        expected = first.pruned(url)
        got = again.pruned(url)  # the sources' hook: restores the shard on first call
        assert expected is not None and np.array_equal(got, expected)
        for column, values in first.store.shard(url).items():
            assert np.array_equal(again.store.shard(url)[column], values), column
    assert again.eswp.stats["restored"] == len(urls)


def test_fingerprint_mismatch(tmp_path):
    urls = _write_shards(tmp_path)
    _run(tmp_path / "m", _samples(urls), 1)
    with open(urls[0], "ab") as handle:
        handle.write(b"more")
    fresh = es_pipe.Selector(
        es_pipe.Evolved(), 8, 4, seed=1, eswp=es_pipe.ESWP(manifests=str(tmp_path / "m"))
    )
    with pytest.raises(ManifestError, match=r"shard-0\.bin.*fingerprint.*on_mismatch='fresh'"):
        fresh.pruned(urls[0])
    lenient = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        4,
        seed=1,
        eswp=es_pipe.ESWP(manifests=str(tmp_path / "m"), on_mismatch="fresh"),
    )
    with pytest.warns(UserWarning, match="starting this shard fresh"):
        assert lenient.pruned(urls[0]) is None
    assert urls[0] not in lenient.store.shards
    lenient.pruned(urls[1])  # the untouched shard restores fine
    assert urls[1] in lenient.store.shards


def test_key_the_shard_does_not_have(tmp_path):
    urls = _write_shards(tmp_path)
    _run(tmp_path / "m", _samples(urls), 1)
    with pytest.raises(ManifestError, match=r"has key 'k\d+', but the shard yields 'other\d+'"):
        _run(tmp_path / "m", _samples(urls, key="other"), 1)


def test_crash_leftovers_are_ignored(tmp_path):
    """A half-written staged file and a stray file in a committed epoch dir are harmless."""
    _commit(tmp_path, 0, ["a.tar"]).commit(0)
    staged = tmp_path / "_staging" / "epoch=1"
    staged.mkdir(parents=True)
    (staged / "a.tar-0.r0-dead.parquet.part").write_bytes(b"PAR1 half")
    m = Manifests(str(tmp_path))
    assert m.latest() == 1 - 1 and m.read_epoch().num_rows == 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _commit(tmp_path, 1, ["a.tar"]).commit(1)
    assert Manifests(str(tmp_path)).latest() == 1
    assert not os.path.exists(staged)


@pytest.mark.parametrize("pruned", ["3", -1, True])
def test_a_marker_with_a_bad_pruned_count_is_refused(tmp_path, pruned):
    m = Manifests(str(tmp_path))
    m.write_shard(0, "a.tar", _columns(5))
    m.finish(0)
    m.commit(0)
    path = tmp_path / "_commits" / "epoch=00000000.json"
    marker = json.loads(path.read_text())
    marker["files"][0]["pruned"] = pruned
    path.write_text(json.dumps(marker))
    with pytest.raises(ManifestError, match="'pruned' is not a count"):
        Manifests(str(tmp_path)).marker(0)


def test_a_file_as_the_manifest_root_is_refused_before_training(tmp_path):
    (tmp_path / "f.txt").write_text("hello")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        es_pipe.Selector(
            es_pipe.Evolved(), 8, 4, eswp=es_pipe.ESWP(manifests=str(tmp_path / "f.txt"))
        )
    assert (tmp_path / "f.txt").read_text() == "hello"


# --------------------------------------------------------------------------- the package's API


def test_one_fingerprint_with_an_explicit_policy_for_what_is_no_file(tmp_path):
    """Sources and manifests share one fingerprint function; only the policy for a URL
    that names no file differs, and it is an argument."""
    from es_pipe.errors import ShardError
    from es_pipe.manifests import fingerprint as manifest_fingerprint
    from es_pipe.sources.shards import fingerprint

    shard = tmp_path / "a.tar"
    shard.write_bytes(b"12345")
    m = Manifests(str(tmp_path / "m"))
    same = fingerprint(str(shard))
    assert same == manifest_fingerprint(str(shard)) == m.fingerprint(str(shard))
    assert same["size"] == 5 and same["url"] == str(shard)
    missing = str(tmp_path / "gone.tar")
    with pytest.raises(ShardError, match="does not exist"):
        fingerprint(missing)
    assert fingerprint(missing, missing="none") is None
    assert manifest_fingerprint(missing) is None and m.fingerprint(missing) is None
    assert fingerprint(str(tmp_path), missing="none") is None  # a folder: no file
    with pytest.raises(ConfigError, match="'raise' or 'none'"):
        fingerprint(str(shard), missing="skip")


def test_the_reader_reads_what_the_writer_committed_and_writes_nothing(tmp_path):
    """``ManifestReader`` (what ``es-pipe inspect`` uses) reads a root written by
    ``Manifests`` through public methods only, and leaves every byte of it unchanged."""
    from es_pipe.manifests import ManifestReader

    _commit(tmp_path, 0, ["a.tar", "b.tar"]).commit(0)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    reader = ManifestReader(str(tmp_path))
    assert reader.committed() == [0] and reader.latest() == 0
    assert [f["shard"] for f in reader.files(0)] == ["a.tar", "b.tar"]
    assert [f["shard"] for f in reader.files(0, "b.tar")] == ["b.tar"]
    streamed = {e["shard"]: t for e, t in reader.iter_files(0, ["row", "score"])}
    assert streamed["a.tar"].column_names == ["row", "score"]
    whole = reader.read_epoch(0)
    assert whole.num_rows == sum(t.num_rows for t in streamed.values()) == 100
    table, meta, path = reader.read_file(0, reader.files(0, "a.tar")[0])
    assert meta["shard"] == "a.tar" and meta["epoch"] == 0 and path.endswith(".parquet")
    assert table.num_rows == 50
    assert reader.read_shard("a.tar").columns["score"].tolist() == (
        table.column("score").to_numpy().tolist()
    )
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    empty = ManifestReader(str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match="no committed epoch"):
        empty.latest(required=True)
    assert "no committed epoch" in empty.nothing_committed()


# --------------------------------------------------------------------------- swept bad inputs
# Hypothesis sweeps (tests/_sweep.py): every input gives a correct result or an es_pipe
# error with a message, never a raw exception or a hang; a rejected call changes no state.


def _json_mutations():
    """Edits of a commit marker's JSON: drop, retype or replace a field, anywhere."""
    json_values = st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-5, 2**40),
            st.floats(allow_nan=False),
            st.text(max_size=6),
        ),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=6,
    )
    paths = st.sampled_from(
        [
            "",
            "files",
            "files.0",
            "files.0.path",
            "files.0.size",
            "files.0.crc32",
            "files.0.shard",
            "files.1",
            "hyper",
            "hyper.step",
            "epoch",
            "schema_version",
            "format",
            "rows",
            "committed",
        ]
    )
    return st.tuples(paths, st.sampled_from(["drop", "set"]), json_values)


def _apply_json(marker, path, op, value):
    if not path:
        return value
    parts = path.split(".")
    node = marker
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.get(p)
        if node is None:
            return marker
    last = parts[-1]
    key = int(last) if isinstance(node, list) else last
    if isinstance(node, list) and key >= len(node):
        return marker
    if op == "drop":
        del node[key]
    else:
        node[key] = value
    return marker


def _byte_mutation():
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
        st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=32)),
    )


def _mutate_bytes(data: bytes, m) -> bytes:
    b = bytearray(data)
    at = min(int(m[1] * len(b)), max(len(b) - 1, 0))
    if m[0] == "truncate":
        return bytes(b[:at])
    if m[0] == "flip" and b:
        b[at] ^= 1 << m[2]
        return bytes(b)
    if m[0] == "overwrite":
        b[at : at + len(m[2])] = m[2]
    return bytes(b)


def _wrong_parquet(kind: str, good: bytes) -> bytes:
    """A manifest file with the wrong columns or types (es_pipe metadata kept)."""
    table = pq.read_table(io.BytesIO(good))
    if kind == "drop_column":
        table = table.drop_columns(["score"])
    elif kind == "retype":
        i = table.schema.get_field_index("visits")
        table = table.set_column(i, "visits", table.column("visits").cast(pa.float64()))
    elif kind == "extra_column":
        table = table.append_column("extra", pa.array(np.zeros(table.num_rows)))
    elif kind == "rows_shuffled":
        table = table.take(np.arange(table.num_rows)[::-1].copy())
    elif kind == "no_metadata":
        table = table.replace_schema_metadata(None)
    elif kind == "bad_metadata":
        meta = dict(table.schema.metadata)
        key = next(k for k in meta if k != b"ARROW:schema")
        meta[key] = b"{not json"
        table = table.replace_schema_metadata(meta)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _read_everything(root: str) -> str:
    """Every way of reading manifests: the API, the sampler's resume, es-pipe inspect."""
    m = Manifests(root)
    m.latest(required=True)
    m.read_epoch()
    for shard in ("a.tar", "b.tar"):
        m.read_shard(shard)
    es_pipe.Selector(
        es_pipe.Evolved(), 4, 2, eswp=es_pipe.ESWP(manifests=root, prune=es_pipe.Pruning(anneal=0))
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["inspect", root, "--no-progress", "--json"])
    return f"{rc}:{err.getvalue()}"


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_manifest_folders(n, manifest_root, tmp_path):
    """Corrupted commit markers (JSON edits and raw bytes), truncated or flipped Parquet
    manifests, manifests with wrong columns (also with a marker whose size and crc32 were
    fixed to match): ManifestError (or the API works), and ``es-pipe inspect`` exits 2 with
    a message, never a traceback."""
    counter = iter(range(10**9))

    def check(case):
        kind, target, mutation = case
        root = tmp_path / f"r{next(counter)}"
        shutil.copytree(manifest_root, root)
        marker_path = sorted((root / "_commits").iterdir())[-1]
        marker = json.loads(marker_path.read_text())
        entry = marker["files"][target]
        data_path = root / entry["path"]
        if kind == "marker_json":
            marker = _apply_json(marker, *mutation)
            marker_path.write_text(json.dumps(marker))
        elif kind == "marker_bytes":
            marker_path.write_bytes(_mutate_bytes(marker_path.read_bytes(), mutation))
        elif kind == "parquet_bytes":
            data_path.write_bytes(_mutate_bytes(data_path.read_bytes(), mutation))
        else:  # a rewritten manifest whose marker entry matches its bytes
            data = _wrong_parquet(mutation, data_path.read_bytes())
            data_path.write_bytes(data)
            if kind == "parquet_schema_fixed_marker":
                from es_pipe.manifests.fs import crc

                entry["size"], entry["crc32"] = len(data), crc(data)
                marker_path.write_text(json.dumps(marker))

        result, error = es_error_or_ok(lambda: _read_everything(str(root)), (EsPipeError,))
        if error is not None:  # inspect reads less than the API: it may still work
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli_main(["inspect", str(root), "--no-progress"])
            assert rc == 0 or (rc == 2 and "es-pipe inspect: error:" in err.getvalue())
        else:
            assert result.startswith("0:"), result
        return outcome_of(error)

    schema_kinds = st.sampled_from(
        ["drop_column", "retype", "extra_column", "rows_shuffled", "no_metadata", "bad_metadata"]
    )
    strategy = st.one_of(
        st.tuples(st.just("marker_json"), st.integers(0, 1), _json_mutations()),
        st.tuples(st.just("marker_bytes"), st.integers(0, 1), _byte_mutation()),
        st.tuples(st.just("parquet_bytes"), st.integers(0, 1), _byte_mutation()),
        st.tuples(st.just("parquet_schema"), st.integers(0, 1), schema_kinds),
        st.tuples(st.just("parquet_schema_fixed_marker"), st.integers(0, 1), schema_kinds),
    )
    sweep("manifest folders", strategy, check, n)


# One example per library bug the bad-input sweep found in manifest folders (each was a raw
# error or a crash).
REGRESSIONS = {
    "unknown protocol": (ConfigError, "Protocol", lambda: Manifests("foo://x")),
}  # fmt: skip


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions_found_by_the_sweep(name):
    raises_as_recorded(*REGRESSIONS[name])
