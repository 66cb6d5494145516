"""kill -9 fault injection: a real training run through es_pipe, SIGKILLed at seeded points
while it reads, selects, checkpoints and commits; restarted from its last checkpoint (and
the manifests) and run to the end; then checked against one uninterrupted run:

(a) no sample lost or duplicated: the stream of meta-batches read and sub-batches trained
    (keys, weights, losses, bit for bit) after the resume equals the uninterrupted one from
    the checkpoint on, and what the killed run did before the kill was a prefix of it;
(b) the final scores, model and committed manifests (scores and pruning decisions per
    shard per epoch) equal the uninterrupted run's;
(c) no half-written file is ever visible: after every kill, every committed epoch reads back
    completely and its files match the marker's size and crc32, a plain Parquet reader of
    the manifest root sees only complete files, and the checkpoint loads.

The child is ``faults_child.py``. Children are forked from a server that imported torch and
es_pipe once (``multiprocessing`` forkserver): each is a real process, killed for real;
``ES_PIPE_FAULTS_FRESH=1`` starts each as a fresh interpreter instead (slower).
``ES_PIPE_FAULTS_SEED`` picks other kill points; ``ES_PIPE_FAULTS_REPORT=path.json`` writes a
summary (points survived per category, samples checked).

``pytest -m faults tests/test_faults_kill.py`` runs every point; the default run keeps three.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from es_pipe.manifests import Manifests

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import faults_child as child  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="SIGKILL and forked children need a POSIX system"
)
SEED = int(os.environ.get("ES_PIPE_FAULTS_SEED", "0"))
TIMEOUT = 120

# (target, mode, how many points): the n-th calls are drawn (seeded) from the reference
# run's census of calls of the target.
PLAN = {
    "parquet": [
        ("source.next", "before", 4),
        ("source.open", "before", 3),
        ("stage.next", "before", 2),
        ("sampler.select", "before", 3),
        ("sampler.select", "after", 3),
        ("ckpt.save", "before", 2),
        ("ckpt.write", "torn", 2),
        ("ckpt.replace", "before", 1),
        ("ckpt.replace", "after", 2),
        ("sampler.end_epoch", "before", 2),
        ("manifests.write_shard", "before", 2),
        ("manifests._put", "before", 2),
        ("manifests._put", "torn", 2),
        ("manifests.finish", "before", 1),
        ("manifests.finish", "after", 1),
        ("manifests.commit", "before", 2),
        ("manifests._publish", "before", 2),
        ("manifests._publish", "after", 1),
        ("manifests.marker", "before", 1),
        ("manifests.marker", "torn", 1),
        ("manifests.marker", "after", 1),
        ("fs.rm", "before", 1),
        ("boundary.close_epoch", "after", 3),
    ],
    "tar": [
        ("source.next", "before", 3),
        ("source.open", "before", 2),
        ("stage.next", "before", 1),
        ("sampler.select", "after", 2),
        ("sampler.observe", "before", 2),
        ("sampler.observe", "after", 1),
        ("ckpt.write", "torn", 1),
        ("ckpt.replace", "after", 1),
        ("sampler.end_epoch", "before", 1),
        ("manifests._put", "torn", 2),
        ("manifests.commit", "before", 1),
        ("manifests._publish", "before", 2),
        ("manifests.marker", "after", 1),
        ("fs.rm", "before", 1),
        ("boundary.close_epoch", "after", 2),
    ],
}
# killed again while recovering: (config, first kill, second kill in the restarted run)
TWICE = [
    ("parquet", ("boundary.close_epoch", "after", 0), ("manifests.commit", "before", 1)),
    ("parquet", ("manifests._publish", "before", 1), ("manifests._publish", "after", 0)),
    ("tar", ("boundary.close_epoch", "after", 1), ("manifests.marker", "torn", 0)),
]
# the representative points of the default run: kill after an epoch's commit (the resumed
# run goes back to a checkpoint inside that epoch and commits it again), a torn manifest
# write, and a kill between selection and training (history scoring, tar shards)
DEFAULT = [
    ("parquet", "boundary.close_epoch", "after", 0),
    ("parquet", "manifests._put", "torn", 1),
    ("tar", "sampler.select", "after", 0),
]


def _points() -> list[tuple[str, str, str, int]]:
    return [
        (config, target, mode, i)
        for config, plan in PLAN.items()
        for target, mode, k in plan
        for i in range(k)
    ]


FAULT_POINTS = [p for p in _points() if p not in DEFAULT]


def _nth(census: dict[str, int], config: str, target: str, mode: str, i: int, k: int) -> int:
    """The ``i``-th of ``k`` seeded distinct call numbers of ``target`` in 1..count."""
    count = census.get(target, 0)
    if count == 0:
        raise AssertionError(f"{config}: the reference run never calls {target}")
    seed = zlib.crc32(f"{SEED}:{config}:{target}:{mode}".encode())
    gen = np.random.default_rng(seed)
    picks = sorted(gen.choice(np.arange(1, count + 1), size=min(k, count), replace=False))
    if i >= len(picks):
        pytest.skip(f"{target} is called only {count} times")
    return int(picks[i])


def _how_many(config: str, target: str, mode: str) -> int:
    return next(k for t, m, k in PLAN[config] if (t, m) == (target, mode))


# --------------------------------------------------------------------------- processes

_CONTEXT: Any = None


def _launch(data: Path, run: Path, config: str, spec: str | None, attempt: int) -> int:
    """Run one child to its end (or its kill); its exit code (-9: SIGKILL)."""
    global _CONTEXT
    run.mkdir(parents=True, exist_ok=True)
    args = (str(data), str(run), config, spec, attempt)
    if os.environ.get("ES_PIPE_FAULTS_FRESH") == "1":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
        argv = [sys.executable, str(HERE / "faults_child.py"), *map(str, args[:3])]
        proc = subprocess.run(
            [*argv, spec or "-", str(attempt)], env=env, capture_output=True, timeout=TIMEOUT
        )
        return proc.returncode
    if _CONTEXT is None:
        _CONTEXT = _server()
    proc = _CONTEXT.Process(target=child.entry, args=args)
    proc.start()
    proc.join(TIMEOUT)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"child {args} hung for {TIMEOUT} s")
    return proc.exitcode


def _server() -> Any:
    """The forkserver the children are forked from: it imports ``faults_child`` (found
    through PYTHONPATH; Python 3.11's server ignores the parent's sys.path) and warms up."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["faults_child"])
    saved = dict(os.environ)
    paths = [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, paths)), ES_PIPE_FAULTS_WARM="1")
    try:
        context.Process(target=int).start()  # starts the server
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


def _expect(rc: int, expected: int, run: Path, attempt: int, what: str) -> None:
    error = run / f"error.{attempt}.txt"
    detail = error.read_text() if error.exists() else ""
    assert rc == expected, f"{what}: exit code {rc}, expected {expected}\n{detail}"


# --------------------------------------------------------------------------- results


def _records(run: Path, attempt: int) -> tuple[int | None, list[dict]]:
    """(steps of the checkpoint it resumed from, its step records); a torn last line of a
    killed attempt is ignored."""
    lines = (run / f"log.{attempt}.jsonl").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            assert i == len(lines) - 1, f"log.{attempt}: a torn line before the end"
    if not out:  # killed before it logged anything
        return None, []
    head, *rest = out
    return head["resume"], rest


def _stream(run: Path, attempts: int, reference: list[dict]) -> tuple[list[dict], int]:
    """The step records that count: each attempt's, cut at the checkpoint the next attempt
    resumed from. Checks that everything a killed attempt did is a prefix of the
    reference, and that every attempt resumed exactly where its checkpoint says."""
    stream: list[dict] = []
    redone = 0
    for attempt in range(attempts):
        resumed, records = _records(run, attempt)
        if resumed is None:
            continue
        assert resumed <= len(stream), f"attempt {attempt} resumed after steps never logged"
        redone += len(stream) - resumed
        stream = stream[:resumed]
        for record in records:
            n = record["n"]
            assert n == len(stream) + 1, f"attempt {attempt}: step {n} after {len(stream)}"
            assert n <= len(reference), f"attempt {attempt}: more steps than the reference"
            assert record == reference[n - 1], (
                f"attempt {attempt}, step {n} differs from the uninterrupted run:\n"
                f"got      {record}\nexpected {reference[n - 1]}"
            )
            stream.append(record)
    return stream, redone


def _tables_equal(got, expected) -> None:
    assert got.column_names == expected.column_names
    assert got.num_rows == expected.num_rows
    order_g = np.lexsort([got.column("row").to_numpy(), got.column("shard").to_numpy()])
    order_e = np.lexsort([expected.column("row").to_numpy(), expected.column("shard").to_numpy()])
    for name in got.column_names:
        a = np.asarray(got.column(name).to_pylist(), dtype=object)[order_g]
        e = np.asarray(expected.column(name).to_pylist(), dtype=object)[order_e]
        if pa.types.is_floating(got.column(name).type):
            same = np.array_equal(a.astype(np.float64), e.astype(np.float64), equal_nan=True)
        else:
            same = bool(np.all(a == e))
        assert same, f"manifest column {name!r} differs"


def _manifests(root: Path) -> dict[int, Any]:
    m = Manifests(str(root))
    return {epoch: m.read_epoch(epoch) for epoch in m.committed()}


def _check_visible(run: Path) -> dict[str, int]:
    """(c): what a reader can see after a kill is complete."""
    root = run / "manifests"
    seen = {"epochs": 0, "files": 0}
    if root.exists():
        m = Manifests(str(root))
        committed = m.committed()
        for epoch in committed:
            marker = m.marker(epoch)
            for entry in marker["files"]:
                data = (root / entry["path"]).read_bytes()
                crc = zlib.crc32(data) & 0xFFFFFFFF
                assert len(data) == entry["size"] and crc == entry["crc32"], entry
                seen["files"] += 1
            assert m.read_epoch(epoch).num_rows == marker["rows"]
            seen["epochs"] += 1
        # a plain reader: every file outside _* and .* names is a complete Parquet file
        for path in root.rglob("*"):
            parts = path.relative_to(root).parts
            if path.is_file() and not any(p.startswith(("_", ".")) for p in parts):
                pq.read_table(path)  # raises on a partial file
        if committed:
            table = ds.dataset(str(root), format="parquet", partitioning="hive").to_table(
                filter=ds.field("epoch") <= committed[-1]
            )
            assert table.num_rows == sum(m.marker(e)["rows"] for e in committed)
    ckpt = run / "ckpt.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)
        assert saved["steps"] % child.EVERY == 0
    return seen


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults-data")
    child.write_data(str(folder))
    return folder


_REFERENCES: dict[str, dict[str, Any]] = {}


def _reference(config: str, data: Path, folder: Path) -> dict[str, Any]:
    if config in _REFERENCES:
        return _REFERENCES[config]
    run = folder / f"reference-{config}"
    _expect(_launch(data, run, config, "census", 0), 0, run, 0, "uninterrupted run")
    _, records = _records(run, 0)
    census = json.loads((run / "census.json").read_text())
    manifests = _manifests(run / "manifests")
    assert sorted(manifests) == list(range(child.EPOCHS))
    # the reference itself: each epoch reads every sample its previous manifest did not
    # prune, exactly once, and pruning happened
    every = {
        (f"train{i}-000.{child.CONFIGS[config][0]}", f"s{i}-{j:03d}")
        for i, n in enumerate(child.SIZES)
        for j in range(n)
    }
    for epoch in range(child.EPOCHS):
        read = [tuple(x) for r in records if r["epoch"] == epoch for x in r["read"]]
        assert len(read) == len(set(read)), f"epoch {epoch} read a sample twice"
        pruned = set()
        if epoch:
            table = manifests[epoch - 1]
            flags = table.column("pruned").to_pylist()
            shards = [os.path.basename(s) for s in table.column("shard").to_pylist()]
            pruned = {
                (s, k) for s, k, p in zip(shards, table.column("key").to_pylist(), flags) if p
            }
            assert pruned
        assert set(read) == every - pruned, f"epoch {epoch}"
    reference = {
        "records": records,
        "census": census,
        "manifests": manifests,
        "final": torch.load(run / "final.pt", weights_only=True),
    }
    _REFERENCES[config] = reference
    return reference


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults-reference")
    return lambda config: _reference(config, data, folder)


# --------------------------------------------------------------------------- report

_RESULTS: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("ES_PIPE_FAULTS_REPORT")
    if not path or not _RESULTS:
        return
    by_category: dict[str, Counter] = {}
    for result in _RESULTS:
        counter = by_category.setdefault(result["category"], Counter())
        counter["points"] += 1
        counter["survived"] += result["survived"]
    summary = {
        "seed": SEED,
        "kill_points": len(_RESULTS),
        "survived": sum(r["survived"] for r in _RESULTS),
        "by_category": {k: dict(v) for k, v in sorted(by_category.items())},
        "by_target": dict(Counter(r["target"] for r in _RESULTS if r["survived"])),
        "samples_checked": sum(r.get("samples", 0) for r in _RESULTS),
        "steps_checked": sum(r.get("steps", 0) for r in _RESULTS),
        "steps_redone": sum(r.get("redone", 0) for r in _RESULTS),
        "epochs_recommitted": sum(r.get("recommitted", 0) for r in _RESULTS),
        "committed_epochs_verified_after_kills": sum(r.get("visible", 0) for r in _RESULTS),
        "points": _RESULTS,
    }
    Path(path).write_text(json.dumps(summary, indent=1))


# --------------------------------------------------------------------------- the test


def _kill_and_recover(
    tmp_path: Path, data: Path, reference: dict[str, Any], config: str, specs: list[str]
) -> dict[str, Any]:
    run = tmp_path / "run"
    visible = 0
    for attempt, spec in enumerate(specs):
        _expect(_launch(data, run, config, spec, attempt), -9, run, attempt, f"kill at {spec}")
        visible += _check_visible(run)["epochs"]
    attempts = len(specs) + 1
    _expect(_launch(data, run, config, None, attempts - 1), 0, run, attempts - 1, "restart")

    # (a) the same stream, bit for bit, nothing lost or duplicated
    stream, redone = _stream(run, attempts, reference["records"])
    assert len(stream) == len(reference["records"]), "the resumed run ended early"
    # (b) the same final state and manifests
    final = torch.load(run / "final.pt", weights_only=True)
    expected = reference["final"]
    for name, value in expected["model"].items():
        assert torch.equal(final["model"][name], value), f"model {name} differs"
    assert sorted(final["scores"]) == sorted(expected["scores"])
    for shard, columns in expected["scores"].items():
        for column, values in columns.items():
            assert torch.equal(final["scores"][shard][column], values), f"{shard} {column}"
    got = _manifests(run / "manifests")
    assert sorted(got) == sorted(reference["manifests"])
    for epoch, table in reference["manifests"].items():
        _tables_equal(got[epoch], table)
    visible += _check_visible(run)["epochs"]
    samples = sum(len(r["read"]) + len(r["trained"]) for r in stream)
    # epochs committed before a kill and committed again by the restarted run
    warned = json.loads((run / f"warnings.{attempts - 1}.json").read_text())
    recommitted = sum("re-committing epoch" in message for message in warned)
    return {
        "samples": samples,
        "steps": len(stream),
        "redone": redone,
        "recommitted": recommitted,
        "visible": visible,
    }


def _spec(reference, config: str, target: str, mode: str, i: int) -> str:
    n = _nth(reference["census"], config, target, mode, i, _how_many(config, target, mode))
    return f"{target}:{n}:{mode}"


def _run_point(tmp_path, data, references, config, target, mode, i) -> None:
    reference = references(config)
    spec = _spec(reference, config, target, mode, i)
    result = {"config": config, "target": target, "category": child.category(target)}
    result.update(spec=spec, survived=False)
    _RESULTS.append(result)
    result.update(_kill_and_recover(tmp_path, data, reference, config, [spec]))
    result["survived"] = True


@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize(("config", "target", "mode", "i"), DEFAULT)
def test_kill_and_resume(tmp_path, data, references, config, target, mode, i):
    _run_point(tmp_path, data, references, config, target, mode, i)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize(("config", "target", "mode", "i"), FAULT_POINTS)
def test_kill_and_resume_at_every_point(tmp_path, data, references, config, target, mode, i):
    _run_point(tmp_path, data, references, config, target, mode, i)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize(("config", "first", "second"), TWICE)
def test_killed_again_while_recovering(tmp_path, data, references, config, first, second):
    reference = references(config)
    spec1 = _spec(reference, config, first[0], first[1], first[2])
    # the second kill counts calls of the restarted run: the n-th of its own calls
    spec2 = f"{second[0]}:{second[2] + 1}:{second[1]}"
    result = {"config": config, "target": f"{first[0]}+{second[0]}", "category": "twice"}
    result.update(spec=f"{spec1} then {spec2}", survived=False)
    _RESULTS.append(result)
    result.update(_kill_and_recover(tmp_path, data, reference, config, [spec1, spec2]))
    result["survived"] = True
