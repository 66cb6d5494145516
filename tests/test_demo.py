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
        [sys.executable, "-m", "es_pipe.tools.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_table_printed_and_written(demo_out: tuple[Path, str]) -> None:
    """The default run: uniform, the recommended configuration and uniform at the budget
    the recommended run spent, so the budget-curve column is filled."""
    from es_pipe.demo import RECOMMENDED

    out, stdout = demo_out
    assert "| uniform |" in stdout and f"| {RECOMMENDED} |" in stdout
    with open(out / "demo.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    budget = [name for name in rows if name.startswith("uniform@")]
    assert set(rows) == {"uniform", RECOMMENDED, *budget} and len(budget) == 1
    for row in rows.values():
        for column in ("final_mean", "train_s", "cpu_s", "backprop", "time_ratio"):
            assert math.isfinite(float(row[column])), (row["method"], column)
    chosen = rows[RECOMMENDED]
    assert float(chosen["backprop"]) < float(rows["uniform"]["backprop"])  # it pruned
    assert float(chosen["forwarded"]) == 0  # history scoring: no extra forward pass
    # the budget point was cut to the recommended run's measured CPU time
    assert 0 <= float(chosen["time_ratio"]) - float(budget[0].split("@")[1]) < 0.011
    assert chosen["vs_curve"].split(" ")[0] in ("above", "on", "below"), chosen["vs_curve"]
    markdown = (out / "demo.md").read_text()
    assert markdown.count("\n|") >= 4
    for column in ("CPU time", "vs budget curve", "time to uniform quality"):
        assert f"- **{column}**: " in markdown  # every column explained in one line


def test_verdict_line(demo_out: tuple[Path, str]) -> None:
    """The run ends with one sentence that names the method, its cost and its place
    against uniform given the same time."""
    from es_pipe.demo import RECOMMENDED

    out, stdout = demo_out
    line = next(line for line in stdout.splitlines() if line.startswith("verdict: "))
    assert line.startswith(f"verdict: {RECOMMENDED} reached val_loss ")
    assert "x uniform's CPU time" in line and "uniform given " in line
    assert any(
        f"lies {place} the uniform budget curve" in line for place in ("above", "on", "below")
    )
    assert line in (out / "demo.md").read_text()


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
    """The pruning run's manifests are committed and readable as one table."""
    import pyarrow.dataset as ds

    out, _ = demo_out
    roots = list((out / "manifests").glob("es-prune-*"))
    assert len(roots) == 1 and list((roots[0] / "_commits").glob("epoch=*.json"))
    table = ds.dataset(roots[0], format="parquet", partitioning="hive").to_table()
    assert table.num_rows > 0 and {"score", "pruned"} <= set(table.column_names)
