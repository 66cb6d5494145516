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
        [sys.executable, "-m", "es_pipe.tools.cli", *args], capture_output=True, text=True, cwd=ROOT
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
    assert "7/7" in out.stderr  # the progress bar knows its total: the folder is listed first


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
    assert out.returncode == 2 and "cannot shard" in out.stderr
    assert not list(tmp_path.glob("o-*"))
    missing = es_pipe_cli("shard", str(tmp_path / "nope"), str(tmp_path / "o-%d.tar"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


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


BAD_PATTERNS = [
    "out/%05000000d.tar",
    "out/train.tar",
    "out/%s-%d.tar",
    "out/%d-%d.tar",
    "out/%6d.tar",
    "out/%x.tar",
    "out/%%06d.tar",
    "out/x-%",
]


def _no_shards_and_a_short_error(tmp_path, returncode, stderr):
    assert returncode == 2
    assert "%d or %0Nd" in stderr and "e.g. 'out/train-%06d.tar'" in stderr
    assert len(stderr) < 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def _raw_folder(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "s0.txt").write_text("text")
    return raw


def test_shard_checks_the_output_pattern_before_formatting_it(tmp_path):
    """Issue 11: 'out/%999999999d.tar' took 73 s and 6.1 GB, and echoed a 1 GB path."""
    raw = _raw_folder(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "es_pipe.tools.cli", "shard", str(raw), "out/%999999999d.tar"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    _no_shards_and_a_short_error(tmp_path, out.returncode, out.stderr)


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_shard_refuses_bad_output_patterns(tmp_path, monkeypatch, capsys, pattern):
    from es_pipe.tools.cli import main

    raw = _raw_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    returncode = main(["shard", str(raw), pattern])
    _no_shards_and_a_short_error(tmp_path, returncode, capsys.readouterr().err)


def test_write_shards_accepts_the_usual_patterns(tmp_path):
    from es_pipe.shard_writer import write_shards

    samples = [{"__key__": f"s{i}", "txt": "x"} for i in range(3)]
    for pattern in ("a-%d.tar", "b-%06d.tar", "c-%020d.tar", "100%%-d-%03d.tar"):
        urls = write_shards(samples, str(tmp_path / pattern), samples_per_shard=2, index=False)
        assert [u.rsplit("/", 1)[1] for u in urls] == [pattern % 0, pattern % 1]


def _folder_with_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET")
    (outside / "deep").mkdir()
    (outside / "deep" / "more.txt").write_text("MORE")
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "s0.txt").write_text("zero")
    (raw / "s1.txt").symlink_to(raw / "s0.txt")  # a link inside the folder: fine
    return raw, outside


@pytest.mark.parametrize("link", ["file", "folder"])
def test_shard_does_not_follow_links_out_of_the_source(tmp_path, capsys, link):
    from es_pipe.tools.cli import main

    raw, outside = _folder_with_links(tmp_path)
    if link == "file":
        (raw / "sub" / "host.txt").symlink_to(outside / "secret.txt")
    else:
        (raw / "sub" / "elsewhere").symlink_to(outside)
    out_dir = tmp_path / "out"
    pattern = str(out_dir / "t-%03d.tar")
    if link == "file":  # the real command once; main() in-process otherwise (faster)
        out = es_pipe_cli("shard", str(raw), pattern)
        returncode, stderr = out.returncode, out.stderr
    else:
        returncode, stderr = main(["shard", str(raw), pattern]), capsys.readouterr().err
    assert returncode == 2
    assert "symbolic link" in stderr and "--follow-symlinks" in stderr
    assert str(outside) in stderr
    assert not out_dir.exists() or list(out_dir.iterdir()) == []

    assert main(["shard", str(raw), pattern, "--follow-symlinks"]) == 0
    got = {s["__key__"]: s["txt"] for s in WebDatasetSource(str(out_dir / "t-000.tar"))}
    assert got["s0"] == got["s1"] == b"zero"
    if link == "file":
        assert got["sub/host"] == b"SECRET"
    else:
        assert got["sub/elsewhere/secret"] == b"SECRET"
        assert got["sub/elsewhere/deep/more"] == b"MORE"


def test_samples_from_folder_refuses_links_out_and_survives_loops(tmp_path):
    from es_pipe.errors import ConfigError
    from es_pipe.shard_writer import samples_from_folder

    raw, outside = _folder_with_links(tmp_path)
    (raw / "sub" / "loop").symlink_to(raw)  # a folder link back into the folder
    assert len(samples_from_folder(str(raw))) == 2
    assert [s["__key__"] for s in samples_from_folder(str(raw))] == ["s0", "s1"]
    followed = [s["__key__"] for s in samples_from_folder(str(raw), follow_symlinks=True)]
    assert followed == ["s0", "s1"]  # every real folder once: no endless loop
    (raw / "sub" / "leak.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(ConfigError, match=r"leak\.txt.*outside the folder.*follow_symlinks"):
        next(samples_from_folder(str(raw)))
