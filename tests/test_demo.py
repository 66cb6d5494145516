"""`es-pipe demo --quick` end to end, in a real subprocess, as a user runs it."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "es_pipe.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_table_printed_and_written(demo_out: tuple[Path, str]) -> None:
    out, stdout = demo_out
    assert "| uniform |" in stdout and "| es |" in stdout
    with open(out / "demo.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert {"uniform", "es", "es-history"} <= set(rows)
    for row in rows.values():
        for column in ("final_mean", "train_s", "backprop", "time_ratio"):
            assert math.isfinite(float(row[column])), (row["method"], column)
    assert float(rows["es"]["backprop"]) < float(rows["uniform"]["backprop"])
    assert float(rows["es-history"]["backprop"]) < float(rows["uniform"]["backprop"])
    assert float(rows["es"]["forwarded"]) > 0 == float(rows["es-history"]["forwarded"])
    assert (out / "demo.md").read_text().count("\n|") >= 4


def test_shards_written(demo_out: tuple[Path, str]) -> None:
    out, _ = demo_out
    train = sorted((out / "shards").glob("train-*.tar"))
    val = sorted((out / "shards").glob("val-*.tar"))
    assert train and val
    with tarfile.open(train[0]) as tar:
        members = tar.getmembers()
    assert members and all(m.name.endswith(".bin") for m in members)
    assert len({m.size for m in members}) == 1  # fixed-length byte windows


def test_png_written(demo_out: tuple[Path, str]) -> None:
    out, _ = demo_out
    png = (out / "demo.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_manifests_written(demo_out: tuple[Path, str]) -> None:
    """The ESWP run's manifests are committed and readable as one table."""
    import pyarrow.dataset as ds

    out, _ = demo_out
    roots = list((out / "manifests").glob("eswp-*"))
    assert len(roots) == 1 and list((roots[0] / "_commits").glob("epoch=*.json"))
    table = ds.dataset(roots[0], format="parquet", partitioning="hive").to_table()
    assert table.num_rows > 0 and {"score", "pruned"} <= set(table.column_names)
