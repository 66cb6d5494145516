"""One job per manifests folder, with real processes (issue 11, "two jobs on one folder").

Each job is ``lease_child.py``: a real training run with ESWP manifests, its own attempt
id (``ES_PIPE_ATTEMPT``). What must hold, whatever happens to the jobs:

- a second job on a folder that a live job holds fails fast (seconds, before it trains)
  with a ManifestError naming the fixes (a folder of its own, wait, ``takeover=True``);
- two jobs started at the same moment: at most one trains to the end, the other fails
  with a ManifestError;
- a job killed with SIGKILL leaves its lease behind: the next job takes it over (on this
  host at once, its process being gone) and continues the run;
- a hung job (SIGSTOP) stops renewing its lease: a second job is refused until
  ``lease_timeout`` has passed, then takes over; the hung job, resumed, refuses to commit;
- ``takeover=True`` takes a live job's folder; that job then refuses to commit;
- in every case each committed epoch, marker and every file it names, comes from one
  job, and reads back whole; a job whose lease was taken never commits again, even after
  the job that took it has ended and released the folder (found by this file).

The default suite runs the first and the ``takeover=True`` cases (about 10 s each: real
processes importing torch); ``-m faults`` runs the race, the SIGKILL and the SIGSTOP ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from es_pipe.manifests import LEASE, Manifests

HERE = Path(__file__).parent
CHILD = str(HERE / "lease_child.py")
sys.path.insert(0, str(HERE))
import lease_child  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
EPOCHS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("lease-data")
    lease_child.write_data(str(folder))
    return str(folder)


class Job:
    """One ``lease_child.py`` process."""

    def __init__(self, data: str, root: Path, name: str, *extra: str, pause: Path | None = None):
        self.name, self.root = name, root
        folder = root.parent
        self.out, self.log = folder / f"{name}.json", folder / f"{name}.log"
        cmd = [sys.executable, CHILD, "--data", data, "--root", str(root), "--out", str(self.out)]
        cmd += ["--log", str(self.log), "--epochs", str(EPOCHS), *extra]
        if pause is not None:
            cmd += ["--pause", str(pause)]
        env = {
            **os.environ,
            "ES_PIPE_ATTEMPT": name,
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout: float = 120) -> dict:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.seconds = time.monotonic() - self.started
        if not self.out.exists():
            raise AssertionError(f"job {self.name} exited {self.proc.returncode}: {err[-3000:]}")
        result = json.loads(self.out.read_text())
        assert self.proc.returncode in (0, 3), result  # no raw traceback
        return result

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def ready(self) -> bool:
        """It holds the folder (its sampler is built)."""
        return "ready" in self.lines()

    def steps(self) -> int:
        return len([line for line in self.lines() if line != "ready"])

    def epoch(self) -> int:
        """The epoch of its last logged step (-1: none yet)."""
        steps = [line for line in self.lines() if line != "ready"]
        return int(steps[-1].split()[0]) if steps else -1

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _until(what, timeout: float = 60.0, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what.__doc__ or what}"
        time.sleep(poll)


def _held(job: Job) -> bool:
    """The job waits at its pause file: two looks 0.2 s apart see no new step."""
    before = job.steps()
    time.sleep(0.2)
    return job.steps() == before


def _lease_of(root: Path) -> str | None:
    try:
        return json.loads((root / LEASE).read_text()).get("attempt")
    except (FileNotFoundError, ValueError):
        return None


def _committed_by(root: Path) -> dict[int, str]:
    """``epoch -> attempt`` of every committed epoch, after checking that the marker and
    every file it names (their es_pipe metadata) come from that one attempt and read back
    whole (size and crc32)."""
    m = Manifests(str(root))
    out = {}
    for epoch in m.committed():
        marker = m.marker(epoch)
        attempts = {marker["attempt"]}
        for entry in marker["files"]:
            _, meta, _ = m.read_file(epoch, entry)  # size + crc32 checked
            attempts.add(meta["attempt"])
        assert len(attempts) == 1, f"epoch {epoch} mixes attempts {attempts}"
        assert m.read_epoch(epoch).num_rows == marker["rows"]
        out[epoch] = attempts.pop()
    return out


def test_a_second_job_fails_fast_while_the_first_holds_the_folder(data, tmp_path):
    root = tmp_path / "manifests"
    pause = tmp_path / "pause"
    pause.touch()
    first = Job(data, root, "job-a", pause=pause)
    _until(first.ready)
    assert _lease_of(root) == "job-a"
    second = Job(data, root, "job-b")
    refused = second.wait()
    assert not refused["ok"] and refused["error"] == "ManifestError"
    message = refused["message"]
    assert "in use by another job" in message and "'job-a'" in message
    assert "folder of its own" in message and "takeover=True" in message
    assert second.steps() == 0 and second.seconds < 30  # before training, not at a commit
    assert first.proc.poll() is None, "the second job must not disturb the first"
    pause.unlink()
    done = first.wait()
    assert done["ok"], done
    assert _committed_by(root) == dict.fromkeys(range(EPOCHS), "job-a")
    assert not (root / LEASE).exists()  # released at exit


@pytest.mark.faults
def test_two_jobs_started_together_never_mix(data, tmp_path):
    for trial in range(2):
        root = tmp_path / f"race-{trial}" / "manifests"
        root.parent.mkdir()
        pause = root.parent / "pause"
        pause.touch()  # both hold before their first step: they overlap for sure
        jobs = [Job(data, root, f"race{trial}-{x}", pause=pause) for x in "ab"]
        _until(lambda jobs=jobs: all(j.ready() or j.proc.poll() is not None for j in jobs))
        pause.unlink()
        results = [job.wait() for job in jobs]
        winners = [r for r in results if r["ok"]]
        assert len(winners) == 1, results
        for r in results:
            if not r["ok"]:
                assert r["error"] == "ManifestError", r
                assert "another job" in r["message"] or "taken over" in r["message"], r
        committed = _committed_by(root)
        if winners:
            assert committed == dict.fromkeys(range(EPOCHS), winners[0]["attempt"])


@pytest.mark.faults
def test_lease_of_a_killed_job_is_taken_over_and_the_run_continues(data, tmp_path):
    root = tmp_path / "manifests"
    pause = tmp_path / "pause"
    first = Job(data, root, "job-a", pause=pause)
    _until(lambda: first.epoch() >= 1)  # epoch 0 committed
    pause.touch()  # hold it mid-epoch 1
    _until(lambda: first.epoch() >= 1 and _held(first))
    first.kill()  # SIGKILL: no atexit, the lease stays
    assert _lease_of(root) == "job-a"
    before = _committed_by(root)
    second = Job(data, root, "job-b")
    done = second.wait()
    assert done["ok"], done
    assert any("taking over" in w and "is gone" in w for w in done["warnings"]), done
    assert done["started_at_epoch"] == max(before) + 1  # continued the run
    committed = _committed_by(root)
    assert sorted(committed) == list(range(EPOCHS))
    assert {e: a for e, a in committed.items() if e in before} == before
    assert all(a == "job-b" for e, a in committed.items() if e not in before)


@pytest.mark.faults
def test_hung_job_loses_its_lease_after_the_timeout_and_cannot_commit(data, tmp_path):
    root = tmp_path / "manifests"
    timeout = 20.0  # seconds: a job starts (imports torch) in about 5 s on a busy 2-core box
    pause = tmp_path / "pause"
    first = Job(data, root, "job-a", "--lease-timeout", str(timeout), pause=pause)
    _until(lambda: first.epoch() >= 1)  # epoch 0 committed
    pause.touch()  # hold it mid-epoch 1
    _until(lambda: _held(first))
    first.signal(signal.SIGSTOP)  # hung: alive, no heartbeat
    stopped = time.monotonic()
    try:
        too_early = Job(data, root, "job-b").wait()
        assert time.monotonic() - stopped < timeout or pytest.skip("the box was too slow")
        assert not too_early["ok"] and "in use by another job" in too_early["message"]
        time.sleep(max(0.0, timeout + 0.5 - (time.monotonic() - stopped)))
        second = Job(data, root, "job-c")
        _until(lambda: _lease_of(root) == "job-c")
    finally:
        first.signal(signal.SIGCONT)
        pause.unlink()
    hung = first.wait()
    assert not hung["ok"] and hung["error"] == "ManifestError", hung
    assert "taken over by attempt 'job-c'" in hung["message"]
    done = second.wait()
    assert done["ok"], done
    assert any("taking over" in w and "no heartbeat" in w for w in done["warnings"]), done
    committed = _committed_by(root)
    assert sorted(committed) == list(range(EPOCHS))
    assert committed[EPOCHS - 1] == "job-c"


def test_takeover_flag_takes_a_live_jobs_folder(data, tmp_path):
    root = tmp_path / "manifests"
    pause = tmp_path / "pause"
    first = Job(data, root, "job-a", pause=pause)
    _until(lambda: first.epoch() >= 1)  # epoch 0 committed
    pause.touch()  # hold it mid-epoch 1, alive and renewing its lease
    _until(lambda: _held(first))
    second = Job(data, root, "job-b", "--takeover")
    done = second.wait()
    pause.unlink()
    assert done["ok"], done
    assert any("takeover=True" in w for w in done["warnings"]), done
    pushed_out = first.wait()  # job-b has ended and released the folder: no lease at all
    assert not pushed_out["ok"] and pushed_out["error"] == "ManifestError", pushed_out
    assert "took its lease, and the lease is gone" in pushed_out["message"]
    assert "Restart this job from its last checkpoint" in pushed_out["message"]
    committed = _committed_by(root)
    assert sorted(committed) == list(range(EPOCHS))
    assert committed[EPOCHS - 1] == "job-b"


def test_a_dropped_roots_heartbeat_thread_ends_at_once(tmp_path):
    """The heartbeat period is a quarter of the lease timeout (150 s by default): a root
    that is dropped must not leave its thread (and its file handles) running that long."""
    import gc
    import threading

    before = set(threading.enumerate())
    root = Manifests(str(tmp_path / "m"), attempt="a1")
    root.acquire_lease()
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name == "es_pipe-lease"]
    assert thread.is_alive()
    del root
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
