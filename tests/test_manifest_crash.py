"""Crash safety of the commit protocol: a real subprocess, killed with SIGKILL at a chosen
point before, during and after the commit, leaves the previous epoch readable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from es_pipe.manifests import Manifests

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from crash_child import SHARDS, columns, write_epoch  # noqa: E402

# (point, epoch committed after the kill)
DEFAULT = [("before", 0), ("publish", 0), ("after", 1)]
MORE = [("write", 0), ("finish", 0), ("marker", 0), ("cleanup", 1)]


def _kill_at(root: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "crash_child.py"), str(root), "1", point],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr  # it really was killed


def _check_epoch(root: Path, epoch: int) -> None:
    m = Manifests(str(root))
    assert m.latest() == epoch
    for i, shard in enumerate(SHARDS):
        got = m.read_shard(shard)
        assert got.epoch == epoch
        assert np.array_equal(got.columns["score"], columns(epoch, i)["score"])
    # a plain reader with the documented filter sees exactly the committed epochs
    table = ds.dataset(str(root), format="parquet", partitioning="hive").to_table(
        filter=ds.field("epoch") <= epoch
    )
    assert table.num_rows == 500 * len(SHARDS) * (epoch + 1)


def _crash_and_recover(tmp_path: Path, point: str, survivor: int) -> None:
    root = tmp_path / "manifests"
    write_epoch(str(root), 0)
    _kill_at(root, point)
    _check_epoch(root, survivor)
    write_epoch(str(root), 1)  # the restarted run writes epoch 1 again
    _check_epoch(root, 1)


@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize(("point", "survivor"), DEFAULT)
def test_kill_before_during_after_commit(tmp_path, point, survivor):
    _crash_and_recover(tmp_path, point, survivor)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize(("point", "survivor"), MORE)
def test_kill_at_more_points(tmp_path, point, survivor):
    _crash_and_recover(tmp_path, point, survivor)
