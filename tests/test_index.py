"""`es-pipe index` on shards that es_pipe did not write (webdataset.TarWriter, pyarrow),
and the CLI's contract for expected failures: one line on stderr, exit status 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import ROOT

from es_pipe.errors import ConfigError, ShardError
from es_pipe.indexing import count_samples, index_shards
from es_pipe.sources import ArrowSource, ParquetSource, ShardList, WebDatasetSource

SIZES = (5, 7, 11)


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "es_pipe.tools.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def one_clear_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "shards counted" not in line  # the progress bar's
    ]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def tar_writer_shards(folder: Path, sizes=SIZES) -> list[str]:
    """Tars written by webdataset itself: no es_pipe index, two members per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i, n in enumerate(sizes):
        url = str(folder / f"wds-{i}.tar")
        with wds.TarWriter(url) as sink:
            for j in range(n):
                sink.write({"__key__": f"s{i}_{j:02d}", "txt": f"{i} {j}", "cls": str(j % 3)})
        urls.append(url)
    return urls


def test_index_counts_tarwriter_parquet_and_arrow(tmp_path):
    tars = tar_writer_shards(tmp_path / "t")
    table = pa.table({"v": list(range(13))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=5):
            w.write_batch(batch)
    with pa.OSFile(str(tmp_path / "c.arrows"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table.slice(0, 6))
    assert [count_samples(u) for u in tars] == list(SIZES)
    assert count_samples(str(tmp_path / "a.parquet")) == 13
    assert count_samples(str(tmp_path / "b.arrow")) == 13
    assert count_samples(str(tmp_path / "c.arrows")) == 6

    out = cli("index", str(tmp_path / "t" / "wds-*.tar"), "--out", str(tmp_path / "t" / "i.txt"))
    assert out.returncode == 0, out.stderr
    assert "indexed 3 shards, 23 samples" in out.stdout
    assert "shards counted" in out.stderr  # the progress bar
    text = (tmp_path / "t" / "i.txt").read_text()
    assert text == "wds-0.tar 5\nwds-1.tar 7\nwds-2.tar 11\n"  # relative to the index
    listed = ShardList.from_index(str(tmp_path / "t" / "i.txt"))
    assert listed.urls == tuple(tars) and listed.num_samples == SIZES
    # the counts are the sources' own: a source over the index reads exactly that many
    assert len(list(WebDatasetSource(listed))) == sum(SIZES)

    out = cli(
        "index",
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b.arrow"),
        "--out",
        str(tmp_path / "cols.txt"),
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    cols = ShardList.from_index(str(tmp_path / "cols.txt"))
    assert cols.num_samples == (13, 13)
    assert len(list(ParquetSource([cols.urls[0]]))) == 13
    assert len(list(ArrowSource([cols.urls[1]]))) == 13


def test_index_in_parallel_matches_serial_and_writes_outside_paths_absolute(tmp_path):
    tars = tar_writer_shards(tmp_path / "t", sizes=tuple(range(1, 17)))
    listed = index_shards(tars, str(tmp_path / "elsewhere.txt"), jobs=4)
    assert listed.num_samples == tuple(range(1, 17))
    lines = (tmp_path / "elsewhere.txt").read_text().splitlines()
    assert lines[0] == "t/wds-0.tar 1"
    other = tmp_path / "other"
    other.mkdir()
    index_shards(tars[:2], str(other / "i.txt"), jobs=1)
    assert ShardList.from_index(str(other / "i.txt")).urls == tuple(tars[:2])
    assert (other / "i.txt").read_text().startswith(tars[0])  # absolute: not under the index


def test_a_truncated_shard_is_refused_and_no_index_is_written(tmp_path):
    tars = tar_writer_shards(tmp_path / "t")
    data = Path(tars[1]).read_bytes()
    Path(tars[1]).write_bytes(data[: len(data) - 2048])  # cut in the end-of-archive blocks
    with pytest.raises(ShardError, match="truncated"):
        count_samples(tars[1])
    out = cli("index", *tars, "--out", str(tmp_path / "i.txt"))
    one_clear_line(out, "wds-1.tar", "re-create or re-download")
    assert not (tmp_path / "i.txt").exists()


def test_a_shard_the_reader_would_refuse_gets_no_count(tmp_path):
    """A member without KEY.EXTENSION: the reader refuses it, so the index does too."""
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as sink:
        for name in ("a.txt", "noext", "b.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            sink.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ShardError, match="'noext' has no key"):
        count_samples(str(path))
    out = cli("index", str(path), "--out", str(tmp_path / "i.txt"))
    one_clear_line(out, "noext", "before it can be indexed")
    assert not (tmp_path / "i.txt").exists()


def test_equalize_without_counts_names_the_index_command(tmp_path):
    tars = tar_writer_shards(tmp_path / "t")
    src = WebDatasetSource(tars, equalize="pad", rank=0, world_size=2)
    with pytest.raises(ConfigError, match="es-pipe index SHARDS"):
        next(iter(src))


def test_cli_failures_are_one_line_and_status_2(tmp_path):
    """Real processes: status 2, one line, no traceback."""
    one_clear_line(
        cli("index", str(tmp_path / "none.tar"), "--out", str(tmp_path / "i.txt")),
        "does not exist",
    )
    one_clear_line(cli("index", "--out", str(tmp_path / "i.txt")), "shards")  # bad arguments
    one_clear_line(cli("inspect", str(tmp_path / "nothing")))
    one_clear_line(
        cli("shard", str(tmp_path / "nothing"), str(tmp_path / "o-%d.tar")), "does not exist"
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["index", "{d}/x.csv", "--out", "{d}/i.txt"], ["--format"]),
        (["index", "{d}/t/wds-0.tar", "--out", "{d}/no/dir/i.txt"], ["does not exist"]),
        (["index", "{d}/t/wds-0.tar", "--out", "i.txt", "--storage-option", "oops"], ["KEY=VALUE"]),
        (["index", "{d}/t", "--out", "{d}/i.txt", "--format", "tar"], ["is a folder"]),
        (["shard", "{d}/t", "{d}/o.tar"], ["%"]),
    ],
)
def test_cli_failures_in_process(tmp_path, capsys, args, words):
    from es_pipe.tools.cli import main

    tar_writer_shards(tmp_path / "t")
    code = main([a.format(d=tmp_path) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "shards counted" not in line]
    assert code == 2 and len(lines) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "i.txt").exists()


def test_torchrun_equalize_on_tarwriter_shards_after_es_pipe_index(tmp_path):
    tars = tar_writer_shards(tmp_path / "t")
    index = tmp_path / "t" / "index.txt"
    assert cli("index", *tars, "--out", str(index), "--no-progress").returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(ROOT / "tests" / "index_child.py"), "--index", str(index), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 0 reads shards 0 and 2 (16 samples), rank 1 shard 1 (7): equalized to one length
    for equalize, want in (("drop", 7), ("pad", 16)):
        got = [r[equalize] for r in ranks]
        assert got[0]["counts"] == got[1]["counts"] == [want, want], equalize
        assert [len(r["keys"]) for r in got] == [want, want]
        rank1 = {("wds-1.tar", f"s1_{j:02d}") for j in range(7)}
        assert {tuple(k) for k in got[1]["keys"]} == rank1
        distinct = {tuple(k) for r in got for k in r["keys"]}
        # drop: no sample twice; pad: every sample at least once, the short rank re-reads
        assert len(distinct) == (14 if equalize == "drop" else sum(SIZES))
