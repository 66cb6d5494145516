"""One job per manifest root: the attempt id of a launch, and the lease (``_lease.json``)
that keeps a second job from committing into the same root.

An *attempt* is one launch of the job, the same on every rank and new for every launch:
``ES_PIPE_ATTEMPT``, else torchelastic's ``TORCHELASTIC_RUN_ID`` +
``TORCHELASTIC_RESTART_COUNT``, else a random token of this process (which rank 0
broadcasts, see :meth:`es_pipe.Manifests.begin`). The lease names the attempt that holds
the root and is renewed by a heartbeat; a stale one (no heartbeat, a dead process on this
host, an earlier restart of this launch or run) is taken over, a live one refuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from es_pipe.errors import ManifestError
from es_pipe.manifests.fs import ManifestFS, load_json
from es_pipe.manifests.layout import LEASE

LEASE_FORMAT = "es_pipe.lease"
PROCESS_TOKEN = secrets.token_hex(6)  # one launch of a single process: one attempt


def default_attempt() -> str | None:
    """The attempt id the launcher gives every rank alike (``None``: none; then a random
    token of this process, or rank 0's broadcast, see :meth:`es_pipe.Manifests.begin`)."""
    explicit = os.environ.get("ES_PIPE_ATTEMPT")
    if explicit:
        return explicit
    run = launch_id()
    if run:
        return f"{run}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return None


def launch_id() -> str | None:
    """torchelastic's run id, shared by the ranks and restarts of one launch ("none", its
    default without rendezvous id, is not unique: ignored)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return run if run and run != "none" else None


class Lease:
    """The lease of one root, held (or not) by ``attempt``.

    Args:
        store: the root's filesystem.
        attempt: this launch's attempt id (:attr:`attempt` may be set later, before
            :meth:`acquire`, when the ranks agree on one).
        timeout: seconds after the last heartbeat before another job may take over.
        takeover: take the root over even from a job that looks alive.
    """

    def __init__(self, store: ManifestFS, attempt: str, *, timeout: float, takeover: bool):
        self.store = store
        self.attempt = attempt
        self.timeout = timeout
        self.takeover = takeover
        self._stop: threading.Event | None = None

    @property
    def path(self) -> str:
        return self.store.path(LEASE)

    def acquire(self, *, run_id: str | None = None) -> dict[str, Any]:
        """Claim the root for this attempt: a live lease of another attempt raises
        :class:`ManifestError` at once; a stale one is taken over. A daemon thread renews
        the heartbeat until the process exits."""
        mine = {
            "format": LEASE_FORMAT,
            "attempt": self.attempt,
            "run_id": run_id,
            "launch": launch_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": time.time(),
            "heartbeat": time.time(),
            "timeout": self.timeout,
        }
        held = self.read()
        if held is not None and held.get("attempt") != self.attempt:
            reason = stale_reason(held, mine)
            if reason is None and not self.takeover:
                raise ManifestError(self._refusal(held))
            warnings.warn(
                f"taking over {self.path} from attempt {held.get('attempt')!r} "
                f"({reason or 'takeover=True'})",
                stacklevel=4,
            )
        self.store.put(self.path, json.dumps(mine, indent=1).encode(), atomic=True)
        time.sleep(0.05)  # two jobs racing for a free root: the last writer wins
        self.check_held()
        self._renew_in_background(mine)
        return mine

    def read(self) -> dict[str, Any] | None:
        """The lease of the root (``None``: no job holds it)."""
        try:
            raw = self.store.read(self.path)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ManifestError(f"{self.path} is not a file ({exc}); remove it") from None
        lease = load_json(raw, f"lease {self.path}", "delete it (no job holds the root then)")
        if not isinstance(lease, dict) or lease.get("format") != LEASE_FORMAT:
            raise ManifestError(f"{self.path} is not an es_pipe lease; delete it")
        return lease

    def _refusal(self, held: Mapping[str, Any]) -> str:
        age = time.time() - float(held.get("heartbeat") or 0)
        return (
            f"{self.store.url} is in use by another job: attempt {held.get('attempt')!r} on "
            f"host {held.get('host')!r} (pid {held.get('pid')}) renewed its lease {age:.0f} s "
            f"ago (taken over after {held.get('timeout')} s without renewal). Two jobs on one "
            "manifests folder would commit each other's data. Give this job a folder of its "
            "own (manifests=...), wait for the other job to end, or, if it is dead, pass "
            "es_pipe.Manifests(url, takeover=True)"
        )

    def check_held(self) -> None:
        """Before committing: the lease is still this attempt's. A job that took the lease
        (:meth:`acquire`) and finds none lost it: another job took it over and has since
        ended (releasing it), or it was removed; committing now would replace that job's
        epochs. Without :meth:`acquire` (the plain API), only another attempt's lease
        refuses."""
        held = self.read()
        if held is None and self._stop is not None:  # acquired once, then lost
            why = (
                f"this job (attempt {self.attempt!r}) took its lease, and the lease is gone: "
                "another job took the folder over and ended, or the lease file was removed. "
                "Its committed epochs would be replaced. Restart this job from its last "
                "checkpoint (it takes the folder again), or give each job a folder of its own"
            )
        elif held is not None and held.get("attempt") != self.attempt:
            why = (
                f"its lease was taken over by attempt {held.get('attempt')!r} (host "
                f"{held.get('host')!r}, pid {held.get('pid')}); another job now writes this "
                "folder, and an epoch never mixes two runs. Stop one of the jobs, or give each "
                "a folder of its own"
            )
        else:
            return
        raise ManifestError(f"not committing to {self.store.url}: {why}")

    def _renew_in_background(self, lease: dict[str, Any]) -> None:
        """A daemon thread renews the heartbeat every ``timeout / 4`` seconds while this
        object lives (weakly held: a dropped sampler does not keep it alive, and its
        thread ends when it is collected), and the lease is released at exit."""
        if self._stop is not None:
            return
        stop = self._stop = threading.Event()
        period = max(0.05, self.timeout / 4)
        ref = weakref.ref(self)

        def renew() -> None:
            while not stop.wait(period):
                owner = ref()
                if owner is None or not owner._renew_once(lease):
                    return

        def finish() -> None:
            stop.set()  # dropped: the thread ends now, not a heartbeat period later
            owner = ref()
            if owner is not None:  # at exit, still alive: give the root back
                owner.release()

        threading.Thread(target=renew, name="es_pipe-lease", daemon=True).start()
        weakref.finalize(self, finish)

    def _renew_once(self, lease: dict[str, Any]) -> bool:
        """One heartbeat; ``False`` once the lease is no longer this attempt's."""
        try:
            held = self.read()
            if held is None or held.get("attempt") != self.attempt:
                return False  # taken over: the commit refuses, see check_held
            lease["heartbeat"] = time.time()
            self.store.put(self.path, json.dumps(lease, indent=1).encode(), atomic=True)
        except Exception:  # a missed heartbeat is retried at the next one
            pass
        return True

    def release(self) -> None:
        """Give the root back (at exit): remove the lease if it is still this attempt's."""
        if self._stop is not None:
            self._stop.set()
        with contextlib.suppress(Exception):
            held = self.read()
            if held is not None and held.get("attempt") == self.attempt:
                self.store.fs.rm(self.path)


def stale_reason(held: Mapping[str, Any], mine: Mapping[str, Any]) -> str | None:
    """Why a lease of another attempt may be taken over (``None``: it is live)."""
    age = time.time() - float(held.get("heartbeat") or 0)
    if age > float(held.get("timeout") or 0):
        return f"no heartbeat for {age:.0f} s"
    if held.get("host") == mine["host"] and not _alive(held.get("pid")):
        return f"its process {held.get('pid')} on this host is gone"
    if mine["launch"] is not None and held.get("launch") == mine["launch"]:
        return "an earlier restart of this launch"
    if mine["run_id"] is not None and held.get("run_id") == mine["run_id"]:
        return f"the same run_id {mine['run_id']!r}, restarted"
    return None


def _alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
