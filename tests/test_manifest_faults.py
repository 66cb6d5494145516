"""Write faults during an epoch's manifests: whatever write of ``write_shard``, ``finish``
or ``commit`` of epoch 1 fails (once, for good, or by filling the disk after some bytes),
epoch 0 stays committed and readable, no half-written file is ever committed, and the
epoch commits once the storage is back.

The default run fails every write position once per kind (disk full halfway through the
write); ``make test-faults`` (marker ``faults``) also fills the disk at 0, 1, all-but-one
and all of the bytes of every write. With ``ES_PIPE_FAULTS_REPORT=path.json`` the counts
land in that file.
"""

from __future__ import annotations

import builtins
import errno
import json
from pathlib import Path

import faulty_fs
import numpy as np
import pyarrow.dataset as ds
import pytest
from faulty_fs import Faults, installed

from es_pipe import Retry
from es_pipe.errors import ManifestError
from es_pipe.manifests import COMMITS, STAGING, Manifests

SHARDS = ["s3://bucket/train-000.tar", "s3://bucket/train-001.tar", "/data/train-002.tar"]
ROWS = 40
FAST = Retry(attempts=3, backoff=0.0005, seed=0)


def columns(epoch: int, i: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng([epoch, i])
    return {
        "score": g.random(ROWS, dtype=np.float32),
        "loss": g.random(ROWS, dtype=np.float32),
        "visits": np.full(ROWS, epoch + 1, np.uint32),
        "step": np.full(ROWS, 10 * epoch, np.int32),
    }


def write_epoch(m: Manifests, epoch: int) -> None:
    for i, shard in enumerate(SHARDS):
        m.write_shard(epoch, shard, columns(epoch, i))
    m.finish(epoch)
    m.commit(epoch)


def check_epoch(root: str, epoch: int) -> None:
    """``epoch`` is committed and every file it names is complete and correct."""
    m = Manifests(root)
    table = m.read_epoch(epoch)  # checks sizes and crc32 of every named file
    assert table.num_rows == ROWS * len(SHARDS)
    for i, shard in enumerate(SHARDS):
        got = m.read_shard(shard, epoch)
        assert np.array_equal(got.columns["score"], columns(epoch, i)["score"])


def check_state(local: Path, committed: list[int]) -> None:
    root = faulty_fs.url(local)
    assert Manifests(root).committed() == committed
    for epoch in committed:
        check_epoch(root, epoch)
    for marker in (local / COMMITS).iterdir():  # no half-written marker lies around
        assert marker.name.startswith(".") or json.loads(marker.read_text())["files"]
    # a plain reader with the documented filter sees exactly the committed epochs
    table = ds.dataset(str(local), format="parquet", partitioning="hive").to_table(
        filter=ds.field("epoch") <= committed[-1]
    )
    assert table.num_rows == ROWS * len(SHARDS) * len(committed)


def healthy_writes(tmp_path: Path) -> list[tuple[str, int]]:
    """The mutating calls of epoch 1 on a healthy store: (what, bytes)."""
    local = tmp_path / "healthy"
    with installed(Faults()) as plan:
        write_epoch(Manifests(faulty_fs.url(local)), 0)
        first = plan.writes
        write_epoch(Manifests(faulty_fs.url(local)), 1)
    return [(what, size) for what, _, size in plan.written[first:]]


def run_case(tmp_path: Path, name: str, op: int, marker_op: int, **fault) -> Faults:
    """Epoch 0 healthy; epoch 1 with a fault at mutating call ``op``; then recovery."""
    local = tmp_path / name
    root = faulty_fs.url(local)
    with installed(Faults()):
        write_epoch(Manifests(root), 0)
    plan = Faults(**fault)
    with installed(plan):
        m = Manifests(root, retry=FAST)
        plan.writes = 0  # positions count from the first write of epoch 1
        finished = False
        failed = None
        try:
            for i, shard in enumerate(SHARDS):
                m.write_shard(1, shard, columns(1, i))
            m.finish(1)
            finished = True
            m.commit(1)
        except (ManifestError, OSError) as exc:
            failed = exc
    transient = not fault.get("write_error_persistent") and fault.get("disk_full_at") is None
    if transient or op > marker_op:  # retried away, or only the best-effort cleanup failed
        assert failed is None, failed
        check_state(local, [0, 1])
        assert not transient or op > marker_op or m.retries == 1
        return plan
    assert failed is not None
    if fault.get("disk_full_at") is not None:
        assert isinstance(failed, OSError) and failed.errno == errno.ENOSPC  # not retried
    else:
        assert isinstance(failed, ManifestError) and "3 times" in str(failed)
    check_state(local, [0])  # the previous epoch, whole; nothing half-written committed
    plan.heal()
    with installed(plan):
        if finished:  # the done-files are there: the commit alone is retried
            m.commit(1)
        else:  # a restarted run writes the epoch again
            write_epoch(Manifests(root, retry=FAST), 1)
    check_state(local, [0, 1])
    assert not (local / STAGING / "epoch=1").exists()
    return plan


def sweep(tmp_path: Path, byte_fractions: tuple[str, ...]) -> dict[str, object]:
    writes = healthy_writes(tmp_path)
    # the marker is the last PUT of the commit (only the staging cleanup follows it)
    marker_op = max(i for i, (what, _) in enumerate(writes) if what == "pipe")
    assert writes[-1][0] == "rm" and marker_op == len(writes) - 2
    totals: dict[str, int] = {}
    cases = 0
    for op, (what, size) in enumerate(writes):
        kinds: list[tuple[str, dict]] = [
            ("once", {"write_error_at": op}),
            ("dead", {"write_error_at": op, "write_error_persistent": True}),
        ]
        if what != "rm":
            cut = {"0": 0, "1": 1, "half": size // 2, "all-1": size - 1, "all": size}
            for frac in byte_fractions:
                kinds.append((f"full@{frac}", {"disk_full_at": op, "disk_full_bytes": cut[frac]}))
        for kind, fault in kinds:
            plan = run_case(tmp_path, f"op{op}-{kind}", op, marker_op, **fault)
            cases += 1
            for k, v in plan.injected.items():
                totals[k] = totals.get(k, 0) + v
    return {
        "write_positions": len(writes),
        "writes": [what for what, _ in writes],
        "cases": cases,
        "faults_injected": totals,
        "faults_total": sum(totals.values()),
        "epoch_lost_or_half_committed": 0,  # any would have failed the test
    }


@pytest.mark.filterwarnings("ignore:re-committing")
def test_every_write_position_fails_safely(tmp_path):
    summary = sweep(tmp_path, ("half",))
    assert summary["write_positions"] == 2 * len(SHARDS) + 3  # PUTs, copies, marker, cleanup
    faulty_fs.report("manifest_write_faults[default]", summary)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore:re-committing")
def test_every_write_position_and_fill_level_fails_safely(tmp_path):
    summary = sweep(tmp_path, ("0", "1", "half", "all-1", "all"))
    faulty_fs.report("manifest_write_faults[faults]", summary)


def test_local_disk_full_writing_the_marker(tmp_path, monkeypatch):
    """The local path (temporary name + os.replace): a full disk while writing the marker
    leaves neither a marker nor a temporary file, and the commit succeeds later."""
    root = str(tmp_path / "m")
    write_epoch(Manifests(root), 0)
    real_open = builtins.open
    full = {"on": True, "hits": 0}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:7])
            full["hits"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if full["on"] and COMMITS in str(path) and "w" in mode else f

    monkeypatch.setattr("es_pipe.manifests.fs.open", fake_open, raising=False)
    m = Manifests(root)
    with pytest.raises(OSError, match="No space"):
        write_epoch(m, 1)
    assert full["hits"] == 1  # a full disk is not retried
    assert Manifests(root).committed() == [0]
    assert [p.name for p in (tmp_path / "m" / COMMITS).iterdir()] == ["epoch=00000000.json"]
    full["on"] = False
    m.commit(1)
    assert Manifests(root).committed() == [0, 1]
    assert Manifests(root).read_epoch(1).num_rows == ROWS * len(SHARDS)
