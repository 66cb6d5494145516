"""Random-time kill -9: a real training run SIGKILLed at random wall-clock moments.

``test_faults_kill.py`` kills at seeded *call counts* of chosen functions; here nothing in
the child knows when it dies. Each trial starts ``killtime_child.py`` (a small model trained
through es_pipe's stage on real Parquet or tar shards, ESWP manifests, checkpoints every 3
steps and at the ends of epochs), SIGKILLs it 1-3 times at seeded random delays, restarts
it from its last checkpoint each time, lets the last restart run to the end, and compares
with one uninterrupted run of the configuration:

- the per-step log (step, epoch, keys read and selected, weights, loss, bit for bit): each
  attempt's steps equal the uninterrupted run's from its checkpoint on;
- the committed manifests (every column of every epoch's Parquet files);
- the final model parameters and score table.

After every kill the checkpoint must load and every committed epoch must read back whole.
Kill delays: the first uniform over the expected rest of the run (startup included); a
later one, with probability 1/2, uniform over the restarted child's restore window (a
kill while it loads the checkpoint, reads the manifests and closes or re-commits an
epoch), else over the rest of the run. A kill that lands after the child finished is no
kill; a killed attempt that logged no step was killed during recovery.

Any difference makes the trial divergent; its message names the seed, the trial and the
kill delays for a replay (``ES_PIPE_KILL_SEED=s pytest tests/test_faults_killtime.py -m
faults -k 'trial-17'``; wall-clock kills land a little differently each time).
``ES_PIPE_KILL_TRIALS`` (default 105) sets the ``faults`` trial count; the default run
keeps 3 (one per configuration). ``ES_PIPE_KILL_REPORT=path.json`` writes a summary.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from es_pipe.manifests import Manifests

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import killtime_child as child  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="SIGKILL and forked children need a POSIX system"
)
SEED = int(os.environ.get("ES_PIPE_KILL_SEED", "0"))
TRIALS = int(os.environ.get("ES_PIPE_KILL_TRIALS", "105"))
CONFIGS = list(child.CONFIGS)
DEFAULT = [0, 1, 2]  # one trial per configuration in the default run
TIMEOUT = 120

# --------------------------------------------------------------------------- processes

_CONTEXT: Any = None


def _server() -> Any:
    """The forkserver the children are forked from (imports torch, es_pipe and the child
    once and warms them up). Shared with ``test_faults_kill.py`` when that started it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["faults_child", "killtime_child"])
    saved = dict(os.environ)
    paths = [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, paths)), ES_PIPE_KILLTIME_WARM="1")
    try:
        context.Process(target=int).start()  # starts the server (if not running yet)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


def _launch(data: Path, run: Path, config: str, attempt: int, delay: float | None) -> dict:
    """Run one child; SIGKILL it ``delay`` seconds after its start unless it ended before.
    Returns its exit code (-9: killed) and its start time."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = _server()
    run.mkdir(parents=True, exist_ok=True)
    proc = _CONTEXT.Process(target=child.entry, args=(str(data), str(run), config, attempt))
    started = time.time()
    proc.start()
    if delay is not None:
        proc.join(delay)
        if proc.exitcode is None:
            proc.kill()
    proc.join(TIMEOUT)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"child {config} attempt {attempt} hung for {TIMEOUT} s")
    return {"rc": proc.exitcode, "started": started}


def _error(run: Path, attempt: int) -> str:
    path = run / f"error.{attempt}.txt"
    return path.read_text() if path.exists() else ""


# --------------------------------------------------------------------------- results


def _records(run: Path, attempt: int) -> tuple[int | None, float | None, list[dict]]:
    """(steps of the checkpoint it resumed from, when it logged that, its step records).
    A torn last line of a killed attempt is ignored."""
    path = run / f"log.{attempt}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            assert i == len(lines) - 1, f"log.{attempt}: a torn line before the end"
    if not out:
        return None, None, []
    head, *rest = out
    return head["resume"], head["t"], rest


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "t"}


def _manifests(root: Path) -> dict[int, pa.Table]:
    m = Manifests(str(root))
    return {epoch: m.read_epoch(epoch) for epoch in m.committed()}


def _sorted_columns(table: pa.Table) -> dict[str, list]:
    order = np.lexsort([table.column("row").to_numpy(), np.asarray(table.column("shard"))])
    return {name: [table.column(name).to_pylist()[i] for i in order] for name in table.column_names}


def _check_after_kill(run: Path) -> int:
    """What a restart (or a reader) finds after a kill: a checkpoint that loads, and
    committed epochs whose files are whole (size and crc32 of the marker)."""
    ckpt = run / "ckpt.pt"
    if ckpt.exists():
        torch.load(ckpt, weights_only=True)
    root = run / "manifests"
    if not root.exists():
        return 0
    m = Manifests(str(root))
    committed = m.committed()
    for epoch in committed:
        marker = m.marker(epoch)
        for entry in marker["files"]:
            data = (root / entry["path"]).read_bytes()
            assert len(data) == entry["size"], entry
            assert zlib.crc32(data) & 0xFFFFFFFF == entry["crc32"], entry
        assert m.read_epoch(epoch).num_rows == marker["rows"]
    return len(committed)


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("killtime-data")
    child.write_data(str(folder))
    return folder


_REFERENCES: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    def get(config: str) -> dict[str, Any]:
        if config not in _REFERENCES:
            run = tmp_path_factory.mktemp(f"killtime-reference-{config}")
            launched = _launch(data, run, config, 0, None)
            assert launched["rc"] == 0, _error(run, 0)
            _, _, records = _records(run, 0)
            manifests = _manifests(run / "manifests")
            assert sorted(manifests) == list(range(child.EPOCHS))
            assert any(len(r["read"]) < child.B for r in records), "no short meta-batch"
            _REFERENCES[config] = {
                "records": [_strip(r) for r in records],
                "manifests": {e: _sorted_columns(t) for e, t in manifests.items()},
                "final": torch.load(run / "final.pt", weights_only=True),
                # seconds: from the start to the first step (startup), then per step
                "startup": records[0]["t"] - launched["started"],
                "per_step": (records[-1]["t"] - records[0]["t"]) / max(1, len(records) - 1),
            }
        return _REFERENCES[config]

    return get


# --------------------------------------------------------------------------- a trial


def _plan(trial: int) -> tuple[str, np.random.Generator, int]:
    """The trial's configuration, its seeded generator and how many kills it aims for."""
    gen = np.random.default_rng([SEED, trial])
    return CONFIGS[trial % len(CONFIGS)], gen, int(gen.integers(1, 4))


def _compare(run: Path, attempts: int, reference: dict[str, Any]) -> dict[str, Any]:
    """The checks of the module docstring; raises AssertionError at the first difference."""
    expected = reference["records"]
    stream: list[dict] = []
    redone = 0
    for attempt in range(attempts):
        resumed, _, records = _records(run, attempt)
        if resumed is None:
            continue  # killed before it logged anything
        assert resumed <= len(stream), f"attempt {attempt} resumed after steps never logged"
        redone += len(stream) - resumed
        stream = stream[:resumed]
        for record in map(_strip, records):
            n = record["n"]
            assert n == len(stream) + 1, f"attempt {attempt}: step {n} after {len(stream)}"
            assert n <= len(expected), f"attempt {attempt}: more steps than the reference"
            assert record == expected[n - 1], (
                f"attempt {attempt}, step {n} differs from the uninterrupted run:\n"
                f"got      {record}\nexpected {expected[n - 1]}"
            )
            stream.append(record)
    assert len(stream) == len(expected), f"the run ended after {len(stream)} of {len(expected)}"
    final = torch.load(run / "final.pt", weights_only=True)
    for name, value in reference["final"]["model"].items():
        assert torch.equal(final["model"][name], value), f"model parameter {name} differs"
    assert sorted(final["scores"]) == sorted(reference["final"]["scores"])
    for shard, columns in reference["final"]["scores"].items():
        for column, values in columns.items():
            assert torch.equal(final["scores"][shard][column], values), f"scores {shard} {column}"
    got = _manifests(run / "manifests")
    assert sorted(got) == sorted(reference["manifests"]), "other epochs committed"
    for epoch, columns in reference["manifests"].items():
        mine = _sorted_columns(got[epoch])
        assert list(mine) == list(columns), f"epoch {epoch}: other manifest columns"
        for name, values in columns.items():
            assert mine[name] == values, f"epoch {epoch}: manifest column {name!r} differs"
    return {"steps": len(stream), "redone": redone}


def run_trial(trial: int, data: Path, references, folder: Path) -> dict[str, Any]:
    config, gen, aimed = _plan(trial)
    reference = references(config)
    total = len(reference["records"])
    startup, per_step = reference["startup"], reference["per_step"]
    run = folder / f"trial-{trial}"
    result: dict[str, Any] = {"trial": trial, "seed": SEED, "config": config, "aimed": aimed}
    kills: list[dict[str, Any]] = []
    result["kills"] = kills
    attempt = 0
    while len(kills) < aimed:
        done = 0
        if (run / "ckpt.pt").exists():
            done = torch.load(run / "ckpt.pt", weights_only=True)["steps"]
        rest = startup + (total - done) * per_step
        during = attempt > 0 and gen.random() < 0.5
        delay = float(gen.uniform(0, 1.5 * startup if during else rest))
        launched = _launch(data, run, config, attempt, delay)
        if launched["rc"] == 0:  # it ended before the kill
            result.setdefault("missed", []).append(round(delay, 4))
            break
        assert launched["rc"] == -9, f"attempt {attempt}: exit {launched['rc']}\n" + _error(
            run, attempt
        )
        resumed, _, records = _records(run, attempt)
        kills.append(
            {
                "delay": round(delay, 4),
                "aimed_at_recovery": during,
                # killed while restoring: after the restart, before its first step
                "in_recovery": attempt > 0 and not records,
                "steps_done": records[-1]["n"] if records else resumed,
            }
        )
        result["visible_epochs"] = result.get("visible_epochs", 0) + _check_after_kill(run)
        attempt += 1
    else:
        launched = _launch(data, run, config, attempt, None)
        assert launched["rc"] == 0, f"the last restart failed\n{_error(run, attempt)}"
    result["attempts"] = attempt + 1
    result.update(_compare(run, attempt + 1, reference))
    return result


# --------------------------------------------------------------------------- report

_RESULTS: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("ES_PIPE_KILL_REPORT")
    if not path or not _RESULTS:
        return
    delays = [k["delay"] for r in _RESULTS for k in r["kills"]]
    summary = {
        "seed": SEED,
        "trials": len(_RESULTS),
        "divergent": [r for r in _RESULTS if r.get("divergent")],
        "kills": len(delays),
        "kills_per_trial": {str(n): sum(len(r["kills"]) == n for r in _RESULTS) for n in range(4)},
        "kills_in_recovery": sum(k["in_recovery"] for r in _RESULTS for k in r["kills"]),
        "kill_delay_s": {
            q: round(float(np.quantile(delays, p)), 3)
            for q, p in (("min", 0), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("max", 1))
        }
        if delays
        else {},
        "by_config": {
            c: sum(r["config"] == c for r in _RESULTS)
            for c in sorted({r["config"] for r in _RESULTS})
        },
        "steps_checked": sum(r.get("steps", 0) for r in _RESULTS),
        "steps_redone": sum(r.get("redone", 0) for r in _RESULTS),
        "seconds": round(sum(r.get("seconds", 0) for r in _RESULTS), 1),
        "results": _RESULTS,
    }
    Path(path).write_text(json.dumps(summary, indent=1))


def _trial(trial: int, data, references, tmp_path) -> None:
    start = time.monotonic()
    config = _plan(trial)[0]
    record: dict[str, Any] = {"trial": trial, "seed": SEED, "config": config}
    _RESULTS.append(record)
    try:
        record.update(run_trial(trial, data, references, tmp_path))
    except AssertionError as exc:
        record["divergent"] = str(exc).splitlines()[0]
        raise AssertionError(
            f"divergent trial {trial} ({config}), ES_PIPE_KILL_SEED={SEED}, kills "
            f"{record.get('kills')}: replay with ES_PIPE_KILL_SEED={SEED} pytest "
            f"tests/test_faults_killtime.py -m faults -k 'trial-{trial}]'\n{exc}"
        ) from exc
    finally:
        record["seconds"] = round(time.monotonic() - start, 2)


@pytest.mark.parametrize("trial", DEFAULT, ids=[f"trial-{t}" for t in DEFAULT])
def test_random_kills(trial, data, references, tmp_path):
    _trial(trial, data, references, tmp_path)


FAULT_TRIALS = list(range(len(DEFAULT), len(DEFAULT) + TRIALS))


@pytest.mark.faults
@pytest.mark.parametrize("trial", FAULT_TRIALS, ids=[f"trial-{t}" for t in FAULT_TRIALS])
def test_random_kills_many(trial, data, references, tmp_path):
    _trial(trial, data, references, tmp_path)


# --------------------------------------------------------------------------- torchrun

DIST_CHILD = str(HERE / "killtime_dist_child.py")
DIST_TRIALS = int(os.environ.get("ES_PIPE_KILL_DIST_TRIALS", "3"))
WORLD = 2


@pytest.fixture(scope="module")
def dist_index(tmp_path_factory) -> str:
    from es_pipe.shard_writer import write_shards

    base = tmp_path_factory.mktemp("killtime-dist-shards")
    for i in range(8):
        samples = [{"__key__": f"s{i}_{j:02d}", "txt": f"{i} {j}"} for j in range(24)]
        write_shards(samples, f"{base}/d{i}-%03d.tar", "tar", 1000, index=f"{base}/i{i}.txt")
    lines = [Path(f"{base}/i{i}.txt").read_text() for i in range(8)]
    Path(f"{base}/index.txt").write_text("".join(lines))
    return f"{base}/index.txt"


def _torchrun(index: str, run: Path, attempt: int, kill: tuple[float, str] | None) -> int:
    """One torchrun launch of 2 ranks; with ``kill=(delay, who)`` SIGKILL after ``delay``
    seconds either one rank's process (``"rank0"``/``"rank1"``; torchrun then stops the
    other) or the launch's whole process group (``"all"``)."""
    import signal
    import subprocess

    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={WORLD}", DIST_CHILD, "--index", index, "--run-dir", str(run)]
    cmd += ["--attempt", str(attempt)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    with open(run / f"torchrun.{attempt}.txt", "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            if kill is not None:
                delay, who = kill
                try:
                    proc.wait(delay)
                except subprocess.TimeoutExpired:
                    pid_file = run / f"pid-{who}.{attempt}"
                    if who != "all" and pid_file.exists():
                        # the rank may have finished a moment ago (torchrun still exiting)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid_file.read_text()), signal.SIGKILL)
                    else:
                        os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(180)
        finally:
            with contextlib.suppress(ProcessLookupError):  # nothing of the launch survives
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _dist_records(run: Path, rank: int, attempt: int) -> tuple[int | None, list[dict]]:
    path = run / f"log-rank{rank}.{attempt}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            assert i == len(lines) - 1, f"rank {rank} log.{attempt}: a torn line before the end"
    if not out:
        return None, []
    return out[0]["resume"], [_strip(r) for r in out[1:]]


def _dist_error(run: Path, attempt: int) -> str:
    parts = [p.read_text() for p in sorted(run.glob(f"error-rank*.{attempt}.txt"))]
    log = run / f"torchrun.{attempt}.txt"
    return "\n".join(parts) or (log.read_text()[-3000:] if log.exists() else "")


@pytest.fixture(scope="module")
def dist_reference(dist_index, tmp_path_factory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("killtime-dist-reference")
    start = time.time()
    assert _torchrun(dist_index, run, 0, None) == 0, _dist_error(run, 0)
    return {
        "records": [_dist_records(run, r, 0)[1] for r in range(WORLD)],
        "manifests": {e: _sorted_columns(t) for e, t in _manifests(run / "manifests").items()},
        "final": torch.load(run / "final.pt", weights_only=True),
        "seconds": time.time() - start,
    }


@pytest.mark.faults
@pytest.mark.parametrize("trial", range(DIST_TRIALS), ids=[f"dist-{t}" for t in range(DIST_TRIALS)])
def test_torchrun_random_kills(trial, dist_index, dist_reference, tmp_path):
    """2 ranks under torchrun (DDP, gloo), killed 1-2 times at random moments: one rank's
    process or the whole launch; relaunched from the newest checkpoint both ranks saved;
    compared with an uninterrupted 2-rank run (per-rank steps, manifests, final model)."""
    gen = np.random.default_rng([SEED, 1000 + trial])
    kills = [
        (
            round(float(gen.uniform(0, dist_reference["seconds"])), 3),
            str(gen.choice(["rank0", "rank1", "all"])),
        )
        for _ in range(int(gen.integers(1, 3)))
    ]
    run = tmp_path / "run"
    about = f"torchrun trial {trial}, ES_PIPE_KILL_SEED={SEED}, kills (delay s, who) {kills}"
    attempt = 0
    for kill in kills:
        rc = _torchrun(dist_index, run, attempt, kill)
        attempt += 1
        if rc == 0:  # ended before the kill
            break
        _check_after_kill(run)
    else:
        rc = _torchrun(dist_index, run, attempt, None)
        assert rc == 0, f"{about}: the last relaunch failed\n{_dist_error(run, attempt)}"
        attempt += 1
    for rank in range(WORLD):
        expected = dist_reference["records"][rank]
        stream: list[dict] = []
        for a in range(attempt):
            resumed, records = _dist_records(run, rank, a)
            if resumed is None:
                continue
            assert resumed <= len(stream), f"{about}: rank {rank} resumed after unlogged steps"
            stream = stream[:resumed]
            for record in records:
                n = record["n"]
                assert n == len(stream) + 1 and record == expected[n - 1], (
                    f"{about}: rank {rank}, attempt {a}, step {n} differs:\n"
                    f"got      {record}\nexpected {expected[n - 1] if n <= len(expected) else None}"
                )
                stream.append(record)
        assert len(stream) == len(expected), f"{about}: rank {rank} ended early"
    for name, value in dist_reference["final"]["model"].items():
        final = torch.load(run / "final.pt", weights_only=True)
        assert torch.equal(final["model"][name], value), f"{about}: model {name} differs"
    got = _manifests(run / "manifests")
    assert sorted(got) == sorted(dist_reference["manifests"]), about
    for epoch, columns in dist_reference["manifests"].items():
        assert _sorted_columns(got[epoch]) == columns, f"{about}: epoch {epoch} manifests differ"
