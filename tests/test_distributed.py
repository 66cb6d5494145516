"""Distributed runs as real processes: torchrun with the gloo backend, 2 and 4 ranks.

Every rank runs ``tests/dist_child.py``. Sample losses are a fixed function of (key, epoch),
so scores and pruning decisions must not depend on the topology: each run's committed
manifests are compared with a single-process run's, column by column.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from es_pipe import Manifests
from es_pipe.shard_writer import write_shards

ROOT = Path(__file__).resolve().parents[1]
CHILD = str(ROOT / "tests" / "dist_child.py")
SHARDS, PER_SHARD, EPOCHS = 8, 24, 3
ALL_KEYS = {f"s{i}_{j:02d}" for i in range(SHARDS) for j in range(PER_SHARD)}
COMPARED = ["score", "loss", "visits", "pruned", "streak", "weight"]


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("shards")
    for i in range(SHARDS):
        samples = [{"__key__": f"s{i}_{j:02d}", "txt": f"{i} {j}"} for j in range(PER_SHARD)]
        write_shards(samples, f"{base}/d{i}-%03d.tar", "tar", 1000, index=f"{base}/i{i}.txt")
    lines = [Path(f"{base}/i{i}.txt").read_text() for i in range(SHARDS)]
    Path(f"{base}/index.txt").write_text("".join(lines))
    return f"{base}/index.txt"


def launch(world, index, manifests, out, *extra, torchrun=True, timeout=180):
    """Run ``world`` ranks of the child; returns (return codes, seconds)."""
    args = [CHILD, "--index", index, "--manifests", str(manifests), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={world}", *args]
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        codes = [proc.returncode]
        output = proc.stdout + proc.stderr
    else:  # no rendezvous: the launcher gives its ranks one fresh attempt id
        attempt = uuid.uuid4().hex
        procs = [
            subprocess.Popen(
                [sys.executable, *args],
                env={**env, "RANK": str(r), "WORLD_SIZE": str(world), "ES_PIPE_ATTEMPT": attempt},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(world)
        ]
        codes = [p.wait(timeout=timeout) for p in procs]
        output = "".join(p.stdout.read() for p in procs)
    return codes, time.monotonic() - start, output


def run_ok(world, index, manifests, out, *extra, torchrun=True):
    codes, _, output = launch(world, index, manifests, out, *extra, torchrun=torchrun)
    errors = "".join(p.read_text() for p in Path(out).glob("error-rank*.txt"))
    assert codes == [0] * len(codes), errors or output[-3000:]


def scored(out, epoch) -> list[Counter]:
    """Per rank: how often each key was scored in ``epoch``."""
    per_rank = []
    for path in sorted(Path(out).glob("steps-rank*.jsonl")):
        keys = Counter()
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] == epoch:
                keys.update(record["scored"])
        per_rank.append(keys)
    return per_rank


def summaries(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("summary-rank*.json"))]


def table(root, epoch) -> dict[str, np.ndarray]:
    t = Manifests(str(root)).read_epoch(epoch)
    t = t.set_column(0, "shard", t.column("shard").cast("string"))
    t = t.sort_by([("shard", "ascending"), ("row", "ascending")])
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in [*COMPARED, "key", "shard"]}


def assert_same_manifests(root, reference, epochs=range(EPOCHS), *, keys=True):
    for epoch in epochs:
        got, want = table(root, epoch), table(reference, epoch)
        assert list(got["shard"]) == list(want["shard"]), f"epoch {epoch}: other shards"
        for column in COMPARED:
            assert np.array_equal(got[column], want[column]), f"epoch {epoch}: {column} differs"
        known = np.array([k is not None for k in got["key"]])
        assert known.all() or not keys
        assert list(got["key"][known]) == list(want["key"][known])


def pruned_keys(reference, epoch) -> set[str]:
    """Keys the single-process run pruned from ``epoch``."""
    if epoch == 0:
        return set()
    t = table(reference, epoch - 1)
    return set(t["key"][t["pruned"]])


@pytest.fixture(scope="module")
def reference(index, tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    run_ok(1, index, base / "manifests", base / "out", torchrun=False)
    assert pruned_keys(base / "manifests", 2), "the reference run must prune something"
    return base / "manifests"


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_every_sample_once_and_commit_the_single_process_scores(
    world, index, reference, tmp_path
):
    run_ok(world, index, tmp_path / "m", tmp_path / "out")
    for epoch in range(EPOCHS):
        per_rank = scored(tmp_path / "out", epoch)
        assert len(per_rank) == world
        total = sum(per_rank, Counter())
        assert set(total) == ALL_KEYS - pruned_keys(reference, epoch)
        assert max(total.values()) == 1, "a sample was read twice"
        marker = Manifests(str(tmp_path / "m")).marker(epoch)
        assert marker["ranks"] == list(range(world))
    assert_same_manifests(tmp_path / "m", reference)
    for summary in summaries(tmp_path / "out"):  # scores held: the rank's shards only
        for epoch in summary["epochs"]:
            read = {
                k.split("_")[0] for k in scored(tmp_path / "out", epoch["epoch"])[summary["rank"]]
            }
            assert epoch["held"] == PER_SHARD * len(read) < PER_SHARD * SHARDS


@pytest.mark.parametrize(("world", "equalize"), [(4, "pad"), (2, "drop")])
def test_ddp_ranks_take_equal_steps(world, equalize, index, reference, tmp_path):
    run_ok(world, index, tmp_path / "m", tmp_path / "out", "--ddp", "--equalize", equalize)
    runs = summaries(tmp_path / "out")
    for epoch in range(EPOCHS):
        steps = {run["epochs"][epoch]["steps"] for run in runs}
        assert len(steps) == 1, f"epoch {epoch}: step counts {steps} differ across ranks"
        total = sum(scored(tmp_path / "out", epoch), Counter())
        expected = ALL_KEYS - pruned_keys(tmp_path / "m", epoch)
        padded = sum(run["epochs"][epoch]["padded"] for run in runs)
        dropped = sum(run["epochs"][epoch]["dropped"] for run in runs)
        if equalize == "pad":  # every kept sample, plus the reported repeats
            assert set(total) == expected and dropped == 0
            assert sum(total.values()) - len(expected) == padded
        else:  # no repeats; the reported surplus is left out
            assert set(total) <= expected and max(total.values()) == 1 and padded == 0
            assert len(expected) - len(total) == dropped
    assert any(
        run["epochs"][e]["padded"] + run["epochs"][e]["dropped"]
        for run in runs
        for e in range(1, EPOCHS)
    )


@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 4)])
def test_elastic_resume_at_an_epoch_boundary(before, after, index, reference, tmp_path):
    run_ok(before, index, tmp_path / "m", tmp_path / "a", "--epochs", "2")
    run_ok(after, index, tmp_path / "m", tmp_path / "b", "--epochs", str(EPOCHS))
    assert Manifests(str(tmp_path / "m")).marker(2)["ranks"] == list(range(after))
    total = sum(scored(tmp_path / "b", 2), Counter())
    assert set(total) == ALL_KEYS - pruned_keys(reference, 2) and max(total.values()) == 1
    assert_same_manifests(tmp_path / "m", reference)


@pytest.mark.parametrize(("before", "after", "stop"), [(4, 2, 4), (2, 4, 5)])
def test_elastic_resume_mid_epoch(before, after, stop, index, reference, tmp_path):
    """Stopped mid-epoch 0 on ``before`` ranks, merged, resumed on ``after``."""
    run_ok(before, index, tmp_path / "m", tmp_path / "a", "--stop-at", str(stop))
    assert not Manifests(str(tmp_path / "m")).committed()
    run_ok(after, index, tmp_path / "m", tmp_path / "b", "--resume", str(tmp_path / "a"))
    total = sum(scored(tmp_path / "a", 0) + scored(tmp_path / "b", 0), Counter())
    assert set(total) == ALL_KEYS and max(total.values()) == 1
    # keys of samples read before the checkpoint are not in it: compare the known ones
    assert_same_manifests(tmp_path / "m", reference, keys=False)


def test_mid_epoch_resume_after_the_first_epoch_on_the_same_ranks(index, reference, tmp_path):
    """Bug B of the random-time kill harness (issue 11): stopped inside epoch 1 and
    resumed on the same 2 ranks, a rank counted the shards it still held from epoch 0 as
    read in epoch 1, and two ranks wrote the same shard's manifest (the commit refused
    it). Only the shards a rank read in the epoch up to the checkpoint count."""
    run_ok(2, index, tmp_path / "m", tmp_path / "a", "--stop-at", "16", torchrun=False)
    assert Manifests(str(tmp_path / "m")).committed() == [0]
    run_ok(2, index, tmp_path / "m", tmp_path / "b", "--resume", str(tmp_path / "a"))
    total = sum(scored(tmp_path / "a", 1) + scored(tmp_path / "b", 1), Counter())
    assert set(total) == ALL_KEYS - pruned_keys(reference, 1) and max(total.values()) == 1
    assert_same_manifests(tmp_path / "m", reference)


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_rank_stops_the_others_with_a_clear_error(killed, index, tmp_path):
    codes, seconds, _ = launch(
        2, index, tmp_path / "m", tmp_path / "out", "--kill-rank", str(killed),
        "--kill-at", "3", "--commit-timeout", "5", torchrun=False, timeout=120,
    )  # fmt: skip
    survivor = 1 - killed
    assert codes[killed] == -9 and codes[survivor] == 1
    message = (tmp_path / "out" / f"error-rank{survivor}.txt").read_text().splitlines()[0]
    assert message.startswith("ManifestError")
    assert f"ranks [{killed}]" in message and "epoch 0" in message
    assert seconds < 60
    assert not Manifests(str(tmp_path / "m")).committed()


def test_torchrun_ddp_job_with_a_killed_rank_ends_instead_of_hanging(index, tmp_path):
    codes, seconds, _ = launch(
        2, index, tmp_path / "m", tmp_path / "out", "--ddp", "--equalize", "drop",
        "--kill-rank", "1", "--kill-at", "3", timeout=150,
    )  # fmt: skip
    assert codes[0] != 0 and seconds < 150
