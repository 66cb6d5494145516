"""es_pipe on a real S3 API (moto's server, credentials required), reached through s3fs
exactly as AWS would be: sources over ``s3://`` (tars written by webdataset.TarWriter,
Parquet by pyarrow, Arrow IPC), an ESWP run with its manifests committed on S3, the CLI
(`shard`, `index`, `inspect`) with ``--storage-option``, storage misconfigurations raised
with their fix (even under ``on_error="skip"``, and fast), and a kill -9 in the middle of a
commit on S3 after which a relaunch finishes the run as if nothing had happened.

Run only these: ``pytest -m s3`` (they are in the default suite too). See tests/_s3.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3_child
import torchdata.nodes as tn
from conftest import ROOT

import es_pipe
from es_pipe.errors import StorageError
from es_pipe.indexing import index_shards
from es_pipe.manifests import Manifests
from es_pipe.sources import ArrowSource, ParquetSource, ShardList, WebDatasetSource
from es_pipe.tools.cli import main as cli_main

pytestmark = [pytest.mark.s3, pytest.mark.filterwarnings("ignore:re-committing")]


def s3fs_of(s3):
    import s3fs

    return s3fs.S3FileSystem(**s3.options(), skip_instance_cache=True)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "es_pipe.tools.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )


def error_lines(err: str) -> list[str]:
    """stderr without tqdm's progress bars."""
    return [x for x in err.splitlines() if x.strip() and "/s]" not in x and "?" not in x[:60]]


def _no_aws(monkeypatch) -> None:
    """An environment where botocore finds no credentials of its own."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def parquet_shards(fs, bucket: str, sizes=(24, 17, 30)) -> None:
    for s, n in enumerate(sizes):
        x = np.random.default_rng(s).normal(size=(n, 4)).astype(np.float32)
        table = pa.table({"key": [f"s{s}-{i:03d}" for i in range(n)], "x": list(x)})
        pq.write_table(table, f"{bucket}/train/d{s}.parquet", row_group_size=8, filesystem=fs)


# ---------------------------------------------------------------------------- sources


def test_sources_read_tar_parquet_and_arrow_over_s3(s3):
    import webdataset as wds

    fs, bucket, opts = s3fs_of(s3), s3.bucket(), s3.options()
    for i in range(2):
        with fs.open(f"{bucket}/wds/part-{i}.tar", "wb") as f, wds.TarWriter(f) as sink:
            for j in range(5):
                sink.write({"__key__": f"p{i}_{j}", "txt": f"{i}:{j}"})
    table = pa.table({"id": [f"r{i}" for i in range(10)], "v": np.arange(10)})
    pq.write_table(table, f"{bucket}/cols/t.parquet", row_group_size=3, filesystem=fs)
    with fs.open(f"{bucket}/cols/t.arrow", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)

    tars = list(WebDatasetSource(f"s3://{bucket}/wds/part-*.tar", storage_options=opts))
    assert sorted(s["__key__"] for s in tars) == [f"p{i}_{j}" for i in range(2) for j in range(5)]
    assert {s["txt"] for s in tars} == {f"{i}:{j}".encode() for i in range(2) for j in range(5)}
    assert all(s["__shard__"].startswith(f"s3://{bucket}/wds/") for s in tars)
    rows = list(
        ParquetSource(f"s3://{bucket}/cols/t.parquet", key_column="id", storage_options=opts)
    )
    assert sorted(int(r["v"]) for r in rows) == list(range(10))
    rows = list(ArrowSource(f"s3://{bucket}/cols/t.arrow", key_column="id", storage_options=opts))
    assert sorted(r["__key__"] for r in rows) == sorted(f"r{i}" for i in range(10))


# ---------------------------------------------------------------------------- ESWP on S3


def _train_eswp(shards: str, root: str, opts: dict) -> tuple[list[int], ParquetSource]:
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        3,
        total_epochs=3,
        seed=5,
        rank=0,
        world_size=1,
        eswp=es_pipe.ESWP(
            prune=es_pipe.Pruning(ratio=0.5, anneal=0),
            manifests=Manifests(root, storage_options=opts),
        ),
    )
    source = ParquetSource(
        shards, key_column="key", seed=5, pruned=sampler.pruned, storage_options=opts
    )
    loader = tn.Loader(es_pipe.SelectStage(source, sampler))
    read = []
    for _ in range(3):
        for meta in loader:
            meta.select(meta.data["x"][:, 0].abs() + 0.1)
        read.append(source.stats["samples"])
    return read, source


def test_eswp_commits_manifests_on_s3_and_inspect_reads_them(s3, monkeypatch, capsys):
    fs, bucket, opts = s3fs_of(s3), s3.bucket(), s3.options()
    parquet_shards(fs, bucket)
    root = f"s3://{bucket}/run/manifests"
    read, _ = _train_eswp(f"s3://{bucket}/train/*.parquet", root, opts)
    m = Manifests(root, storage_options=opts)
    assert m.committed() == [0, 1, 2]
    pruned = [int(np.sum(m.read_epoch(e, columns=["pruned"]).column("pruned"))) for e in (0, 1)]
    assert pruned[0] > 0
    assert read == [71, 71 - pruned[0], 71 - pruned[1]]  # pruned rows were never read from S3
    assert fs.exists(f"{bucket}/run/manifests/epoch=2")

    out = cli("inspect", root, "--json", "--no-progress", *s3.cli_options())
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    # without credentials: one line that says how to pass them, status 2
    with monkeypatch.context() as env:
        _no_aws(env)
        code = cli_main(
            ["inspect", root, "--storage-option", f"client_kwargs.endpoint_url={s3.endpoint}"]
        )
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "--storage-option key=" in err


def test_kill_9_mid_commit_on_s3_then_relaunch_resumes(s3, tmp_path):
    fs, bucket = s3fs_of(s3), s3.bucket()
    parquet_shards(fs, bucket)
    shards = f"s3://{bucket}/train/*.parquet"
    env = {"ES_PIPE_TEST_S3": json.dumps(s3.options()), "OMP_NUM_THREADS": "1"}

    def child(root: str, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "tests" / "s3_child.py"), shards, root, str(checkpoint)]
        return subprocess.run(
            [*cmd, *extra],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            timeout=180,
        )

    # the uninterrupted run, in this process: the same code as the child's
    assert s3_child.run(shards, f"s3://{bucket}/full", str(tmp_path / "full.pt"), s3.options()) == 3
    cut = f"s3://{bucket}/cut"
    # 3 shards: publishes 1-3 commit epoch 0; the 5th is the second file of epoch 1
    killed = child(cut, tmp_path / "cut.pt", "--kill-at-publish", "5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    m = Manifests(cut, storage_options=s3.options())
    assert m.committed() == [0]  # epoch 1 is half published, and invisible
    assert len(fs.ls(f"{bucket}/cut/epoch=1")) == 1
    again = child(cut, tmp_path / "cut.pt")
    assert again.returncode == 0 and "finished 3" in again.stdout, again.stderr[-3000:]

    want, got = (
        Manifests(f"s3://{bucket}/full", storage_options=s3.options()),
        Manifests(cut, storage_options=s3.options()),
    )
    assert got.committed() == want.committed() == [0, 1, 2]
    for epoch in (0, 1, 2):
        a, b = want.read_epoch(epoch).to_pydict(), got.read_epoch(epoch).to_pydict()
        assert a == b, epoch  # the same scores, pruning decisions and streaks


# ---------------------------------------------------------------------------- the CLI


def test_cli_shard_and_index_write_to_s3(s3, tmp_path, capsys):
    import webdataset as wds

    fs, bucket, opts = s3fs_of(s3), s3.bucket(), s3.options()
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(7):
        (raw / f"s{i}.txt").write_text(f"text {i}")
    out = cli(
        "shard", str(raw), f"s3://{bucket}/es/train-%03d.tar", "--per-shard", "3", *s3.cli_options()
    )
    assert out.returncode == 0, out.stderr
    assert ShardList.from_index(
        f"s3://{bucket}/es/index.txt", storage_options=opts
    ).num_samples == (3, 3, 1)
    for i, n in enumerate((4, 6)):  # third-party tars: no index
        with fs.open(f"{bucket}/wds/w-{i}.tar", "wb") as f, wds.TarWriter(f) as sink:
            for j in range(n):
                sink.write({"__key__": f"w{i}_{j}", "txt": "x"})
    out = cli(
        "index",
        f"s3://{bucket}/wds/w-*.tar",
        "--out",
        f"s3://{bucket}/wds/index.txt",
        *s3.cli_options(),
    )
    assert out.returncode == 0, out.stderr
    assert fs.cat(f"{bucket}/wds/index.txt") == b"w-0.tar 4\nw-1.tar 6\n"
    listed = ShardList.from_index(f"s3://{bucket}/wds/index.txt", storage_options=opts)
    src = WebDatasetSource(listed, equalize="drop", rank=1, world_size=2, shuffle=False)
    assert [s["__key__"] for s in src] == [f"w1_{j}" for j in range(4)]  # cut to rank 0's 4
    # writing where the credentials may not: one line, status 2, nothing written
    code = cli_main(["shard", str(raw), f"s3://{bucket}/no/t-%03d.tar", *s3.cli_options("nobody")])
    err = capsys.readouterr().err
    assert code == 2 and "denied" in err and len(error_lines(err)) == 1, err
    assert not fs.exists(f"{bucket}/no")


# ---------------------------------------------------------------------------- misconfiguration


CASES = {
    "credentials": lambda s3, b: ({"client_kwargs": s3.options()["client_kwargs"]}, b),
    "denied": lambda s3, b: (s3.options("nobody"), b),
    "bad-key": lambda s3, b: ({**s3.options(), "key": "AKIANOSUCHKEY0000000"}, b),
    "bucket": lambda s3, b: (s3.options(), "no-such-bucket-es-pipe"),
    "endpoint": lambda s3, b: (
        {
            **s3.options(),
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        },
        b,
    ),
}
KINDS = {
    "credentials": "credentials",
    "denied": "denied",
    "bad-key": "denied",
    "bucket": "bucket",
    "endpoint": "endpoint",
}
FIXES = {
    "credentials": "storage_options={'key'",
    "denied": "bucket policy",
    "bad-key": "Check the key and secret",
    "bucket": "check the bucket name",
    "endpoint": "check the endpoint URL",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_misconfigured_storage_raises_with_the_fix_fast_even_under_skip(
    s3,
    case,
    monkeypatch,
):
    _no_aws(monkeypatch)
    fs, bucket = s3fs_of(s3), s3.bucket()
    parquet_shards(fs, bucket, sizes=(5, 5))
    opts, where = CASES[case](s3, bucket)
    urls = ShardList.literal([f"s3://{where}/train/d{i}.parquet" for i in range(2)])
    for attempt in (
        lambda: list(
            ParquetSource(
                urls,
                on_error="skip",
                storage_options=opts,
                schema=pa.schema([("key", pa.string()), ("x", pa.list_(pa.float32()))]),
            )
        ),
        lambda: list(WebDatasetSource(urls, on_error="skip", storage_options=opts)),
        lambda: index_shards(urls, storage_options=opts),
        lambda: Manifests(f"s3://{where}/m", storage_options=opts).committed(),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            attempt()
        assert time.monotonic() - start < 6.0, "retried for too long"
        assert info.value.kind == KINDS[case], str(info.value)
        assert FIXES[case] in str(info.value)


def test_storage_options_reach_s3_only_as_given(s3):
    """A refused option is an error naming it; botocore's retries stay the user's."""
    from es_pipe import storage

    bucket = s3.bucket()
    with pytest.raises(StorageError, match="refused a storage option") as info:
        index_shards(f"s3://{bucket}/x.tar", storage_options={**s3.options(), "no_such_option": 1})
    assert info.value.kind == "options" and "no_such_option" in str(info.value)
    mine = {**s3.options(), "config_kwargs": {"retries": {"max_attempts": 7}}}
    fs, _ = storage.url_to_fs(f"s3://{bucket}/x", mine)
    assert fs.config_kwargs["retries"] in ({"max_attempts": 7}, {"total_max_attempts": 8})
    fs, _ = storage.url_to_fs(f"s3://{bucket}/x", s3.options())
    assert fs.config_kwargs["retries"] == storage.S3_RETRIES
