"""`es-pipe shard` on real files, read back by the sources."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from es_pipe.sources import ParquetSource, WebDatasetSource


def es_pipe_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "es_pipe.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_shard_a_folder_into_tars(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(7):
        (raw / f"s{i}.txt").write_text(f"text {i}")
        (raw / f"s{i}.cls").write_text(str(i % 2))
    out = es_pipe_cli(
        "shard", str(raw), str(tmp_path / "out" / "train-%03d.tar"), "--per-shard", "3"
    )
    assert out.returncode == 0, out.stderr
    assert "wrote 3 tar shards" in out.stdout
    samples = list(WebDatasetSource(str(tmp_path / "out" / "train-{000..002}.tar")))
    assert sorted(s["__key__"] for s in samples) == [f"s{i}" for i in range(7)]
    assert {s["txt"] for s in samples} == {f"text {i}".encode() for i in range(7)}


def test_shard_a_parquet_table(tmp_path):
    table = pa.table({"id": [f"r{i}" for i in range(10)], "v": np.arange(10)})
    pq.write_table(table, tmp_path / "t.parquet")
    pattern = str(tmp_path / "p-%02d.parquet")
    out = es_pipe_cli("shard", str(tmp_path / "t.parquet"), pattern, "--per-shard", "4")
    assert out.returncode == 0, out.stderr
    rows = list(ParquetSource(str(tmp_path / "p-*.parquet"), key_column="id"))
    assert sorted(int(r["v"]) for r in rows) == list(range(10))


def test_shard_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    out = es_pipe_cli("shard", str(tmp_path / "x.csv"), str(tmp_path / "o-%d.tar"))
    assert out.returncode == 1 and "cannot shard" in out.stderr
    assert not list(tmp_path.glob("o-*"))
    missing = es_pipe_cli("shard", str(tmp_path / "nope"), str(tmp_path / "o-%d.tar"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_help_teaches():
    out = es_pipe_cli("--help")
    assert out.returncode == 0 and "examples:" in out.stdout and "shard" in out.stdout


def test_a_bad_sample_midway_leaves_no_shards_behind(tmp_path):
    from es_pipe.errors import ConfigError
    from es_pipe.shard_writer import write_shards

    samples = [{"__key__": f"s{i}", "txt": "ok"} for i in range(7)]
    samples.append({"__key__": "s7", "txt": object()})  # not writable: fails in shard 3
    with pytest.raises(ConfigError, match="cannot write"):
        write_shards(samples, str(tmp_path / "t-%02d.tar"), samples_per_shard=3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ("demo", "--epochs", "0"),
        ("demo", "--lr", "nan"),
        ("shard", "x", "o-%d.tar", "--per-shard", "-3"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(args, tmp_path):
    out = es_pipe_cli(*args, "--out", str(tmp_path)) if args[0] == "demo" else es_pipe_cli(*args)
    assert out.returncode == 2 and "must be" in out.stderr
    assert list(tmp_path.iterdir()) == []
