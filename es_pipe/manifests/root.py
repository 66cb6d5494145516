"""``Manifests``: one run's manifest root, read and written; the object the sampler holds.

It puts the parts of the package together (:mod:`~es_pipe.manifests.fs`,
:mod:`~es_pipe.manifests.reader`, :mod:`~es_pipe.manifests.writer`,
:mod:`~es_pipe.manifests.commit`, :mod:`~es_pipe.manifests.lease`) and adds the start of a
run: agreeing on the attempt id, taking the lease, and checking that the committed epochs
it continues are this run's (:meth:`Manifests.begin`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from es_pipe.errors import ConfigError, ManifestError
from es_pipe.manifests import layout
from es_pipe.manifests.commit import CommitRecord, Committer
from es_pipe.manifests.fingerprints import fingerprint
from es_pipe.manifests.lease import PROCESS_TOKEN, Lease, default_attempt
from es_pipe.manifests.reader import ManifestReader
from es_pipe.manifests.writer import RankWriter, ShardMeta
from es_pipe.retry import Retry


class Manifests(ManifestReader):
    """A manifest root: write shard manifests, commit epochs, read them back (every
    :class:`ManifestReader` method).

    A long class (about 290 lines) for a reason: it is the public facade of the package,
    and each writing method carries the user-facing contract in its docstring before it
    hands the work to :class:`~es_pipe.manifests.writer.RankWriter`,
    :class:`~es_pipe.manifests.commit.Committer` or :class:`~es_pipe.manifests.lease.Lease`.

    Args:
        root: directory or fsspec URL (``s3://bucket/run-17/manifests``).
        rank: this process's rank (names its staged files and done-file).
        attempt: identifies one launch of the job, the same on every rank and new for
            every launch; the committer only accepts done-files of its own attempt, and a
            rank only trusts a commit marker of its own attempt. Default: ``ES_PIPE_ATTEMPT``,
            else torchelastic's ``TORCHELASTIC_RUN_ID`` + ``TORCHELASTIC_RESTART_COUNT``,
            else a random token of this process (the sampler broadcasts rank 0's over
            ``torch.distributed`` when it is initialized, see :meth:`begin`).
        relocate: ``{"old_prefix": "new_prefix"}``: the data moved; shard URLs of the
            committed manifests that start with an old prefix are read under the new one.
        lease_timeout: seconds after the last heartbeat of a job holding this root
            (``_lease.json``) before another job may take the root over.
        takeover: take the root over from the job that holds its lease even if that job
            looks alive (only when you know it is dead: two live jobs would mix their data).
        storage_options: passed to fsspec.
        progress: show a tqdm bar when reading many files (``None``: when > 16 files).
        retry: how filesystem calls are retried after transient errors (a reset
            connection, a timeout): an :class:`es_pipe.Retry`, an int number of attempts
            (``1``: no retry) or ``None`` for ``Retry()`` (3 attempts, 0.2 s then 0.4 s of
            backoff, with jitter). Every retry counts in :attr:`retries`; shard
            fingerprints (:meth:`fingerprint`) are looked up under the same policy. A call
            that keeps failing raises :class:`ManifestError`; errors that another try
            cannot fix (a missing file, a permission error, a full disk) propagate at
            once. Either way a failed ``write_shard``, ``finish`` or ``commit`` leaves the
            committed epochs as they were, and calling it again once the storage is back
            completes it.

    Attributes:
        retries: filesystem calls retried so far by this object.
    """

    def __init__(
        self,
        root: str,
        *,
        rank: int = 0,
        attempt: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        progress: bool | None = False,
        retry: Retry | int | None = None,
        relocate: Mapping[str, str] | None = None,
        lease_timeout: float = 600.0,
        takeover: bool = False,
    ) -> None:
        if isinstance(lease_timeout, bool) or not isinstance(lease_timeout, (int, float)):
            raise ConfigError(f"lease_timeout={lease_timeout!r} must be a number of seconds")
        if not lease_timeout > 0:
            raise ConfigError(f"lease_timeout={lease_timeout!r} must be > 0 seconds")
        super().__init__(
            root, storage_options=storage_options, progress=progress, retry=retry, relocate=relocate
        )
        self.rank = int(rank)
        self.lease_timeout = float(lease_timeout)
        self.takeover = bool(takeover)
        self._given_attempt = attempt or default_attempt()
        token = self._given_attempt or PROCESS_TOKEN
        self._lease = Lease(self.store, token, timeout=self.lease_timeout, takeover=self.takeover)
        self._writer = RankWriter(self.store, self, self.rank, token)
        self._committer = Committer(self.store, self, self._lease)

    def __repr__(self) -> str:
        return f"Manifests({self.url!r}, rank={self.rank}, attempt={self.attempt!r})"

    @property
    def attempt(self) -> str:
        """This launch's attempt id (see the class docstring)."""
        return self._lease.attempt

    def _set_attempt(self, attempt: str) -> None:
        self._lease.attempt = self._writer.attempt = attempt

    # ------------------------------------------------------------------ writing

    def write_shard(
        self,
        epoch: int,
        shard: str,
        columns: Mapping[str, np.ndarray],
        *,
        keys: pa.Array | None = None,
        factor: float = 1.0,
        fingerprint: dict[str, Any] | None = None,
        hyper: Mapping[str, Any] | None = None,
        fallback: bool = False,
    ) -> dict[str, Any]:
        """Stage one shard's manifest for ``epoch``. ``columns`` holds per-ordinal
        ``score, loss, visits, step`` and the uint8 pruning ``state`` (see
        :mod:`es_pipe.pruning`); ``keys`` the samples' keys by ordinal (or None).

        ``fallback`` marks a copy written only in case no rank that read the shard this
        epoch writes it (a shard inherited from a checkpoint of another topology): the
        commit prefers any other rank's file of the shard."""
        meta = ShardMeta(keys, factor, fingerprint, hyper, fallback)
        return self._writer.write_shard(epoch, shard, columns, meta)

    def write_shards(
        self, epoch: int, items: Iterable[Mapping[str, Any]], *, threads: int | None = None
    ) -> list[dict[str, Any]]:
        """``write_shard`` for many shards, encoded and written by a thread pool (Arrow and
        the file systems release the GIL). Each item holds ``write_shard``'s arguments:
        ``shard``, ``columns`` and optionally ``keys``, ``factor``, ``fingerprint``,
        ``hyper``. Each goes through :meth:`write_shard`."""
        items = list(items)
        threads = threads or min(8, os.cpu_count() or 1)
        if threads <= 1 or len(items) <= 1:
            return [self.write_shard(epoch, **item) for item in items]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda item: self.write_shard(epoch, **item), items))

    def finish(self, epoch: int) -> str:
        """Write this rank's done-file for ``epoch`` (after all its ``write_shard``)."""
        return self._writer.finish(epoch)

    def commit(
        self,
        epoch: int,
        *,
        expected_ranks: int | Iterable[int] = 1,
        timeout: float = 300.0,
        poll: float = 0.2,
        hyper: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Make ``epoch`` visible: wait for every expected rank's done-file of this
        attempt, publish the files, write the marker last. Returns the marker.

        Touches only what es_pipe wrote: a symlink on the way out of the root is refused
        before anything changes, and a file in ``epoch=N/`` that es_pipe did not write is
        left there (with a warning). ``run`` is the run identity recorded in the marker
        (see :meth:`begin`). A full disk raises :class:`ManifestStorageError`; the previous
        epoch stays committed."""
        ranks = sorted(range(expected_ranks) if isinstance(expected_ranks, int) else expected_ranks)
        record = CommitRecord(hyper, run)
        return self._committer.commit(int(epoch), ranks, (timeout, poll), record)

    def wait_committed(
        self, epoch: int, *, ranks: int, timeout: float, poll: float = 0.2, max_poll: float = 2.0
    ) -> None:
        """Block until ``epoch`` is committed by rank 0 of THIS attempt: the barrier a rank
        passes before it reads the next epoch's scores and pruning decisions. A marker of
        another attempt (a killed launch that committed the epoch before) does not count:
        rank 0 is about to replace it. Files, not collectives: no process group is needed,
        and a dead rank shows up as a named missing done-file. The polling interval grows
        from ``poll`` to ``max_poll``, so that thousands of waiting ranks do not flood an
        object store with listings."""
        self._writer.wait_committed(
            epoch, ranks=ranks, timeout=timeout, poll=poll, max_poll=max_poll
        )

    def fingerprint(self, shard: str) -> dict[str, Any] | None:
        """``shard``'s fingerprint under this root's ``retry=`` policy (``None`` where the
        URL names no file); see :func:`es_pipe.manifests.fingerprint`."""
        return fingerprint(shard, retry=self.retry)

    # ------------------------------------------------------------------ one run per root

    def begin(
        self,
        *,
        world_size: int = 1,
        identity: Mapping[str, Any] | None = None,
        resume: bool | str = True,
    ) -> int | None:
        """Start a run on this root (every rank calls it once, before training): agree on
        the attempt id, refuse a root that is not usable as a folder, take the lease
        (rank 0) and, when resuming, check that the committed epochs belong to this run.

        Returns the newest committed epoch this run continues after (``None``: start at
        epoch 0). ``identity`` is ``{"fingerprint": ..., "run_id": ...}`` (see
        :func:`run_fingerprint`); ``resume="force"`` adopts committed epochs of another
        identity on purpose (with a warning)."""
        self._agree_on_attempt(world_size)
        self._refuse_files(layout.COMMITS, layout.STAGING)
        layout.refuse_links(self.fs, self.root, layout.COMMITS, layout.STAGING)
        if self.rank == 0:
            self.acquire_lease(run_id=(identity or {}).get("run_id"))
        if not resume:
            return None
        latest = self.latest()
        if latest is not None and identity is not None:
            self._check_identity(latest, identity, force=resume == "force")
        return latest

    def _agree_on_attempt(self, world_size: int) -> None:
        """Ranks of one launch share one attempt id: the one given or set in the
        environment, else rank 0's random token broadcast over torch.distributed."""
        if self._given_attempt is not None or world_size <= 1:
            return
        try:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
        except ImportError:  # pragma: no cover - torch is a dependency
            ready = False
        if not ready:
            raise ConfigError(
                f"manifests= on {world_size} ranks: the ranks of one launch must share an "
                "attempt id, new for every launch. Initialise torch.distributed before "
                "creating the sampler (es_pipe then broadcasts rank 0's id), launch with "
                "torchrun, or set ES_PIPE_ATTEMPT to the same fresh value on every rank"
            )
        token = [PROCESS_TOKEN if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        self._given_attempt = str(token[0])
        self._set_attempt(self._given_attempt)

    def _refuse_files(self, *parts: str) -> None:
        """A file where es_pipe keeps a folder fails now, not after an epoch of training."""
        for part in parts:
            path = self.store.path(part)
            try:
                kind = self.store.io(f"info {path}", self.fs.info, path).get("type")
            except (FileNotFoundError, NotADirectoryError):
                continue
            if kind != "directory":
                raise ManifestError(
                    f"{path} is a {kind}, where es_pipe keeps the folder {part}/ of the "
                    f"manifests root {self.url}. Remove it, or give manifests= a folder of "
                    "its own"
                )

    def _check_identity(self, latest: int, identity: Mapping[str, Any], *, force: bool) -> None:
        """Refuse to continue the committed epochs of another run."""
        marker = self.marker(latest)
        stored = marker.get("run")
        if not isinstance(stored, dict):
            warnings.warn(
                f"the commit of epoch {latest} under {self.url} has no run identity (written "
                "by an older es_pipe); continuing it without checking that it is this run's",
                stacklevel=4,
            )
            return
        diffs = [
            f"{k} {stored.get(k)!r} (now {identity.get(k)!r})"
            for k in ("run_id", "fingerprint")
            if stored.get(k) != identity.get(k)
        ]
        if not diffs:
            return
        what = (
            f"the committed epochs under {self.url} (newest {latest}, step "
            f"{marker.get('hyper', {}).get('step')!r}) were written by another run: "
            + "; ".join(diffs)
        )
        if force:
            warnings.warn(what + "; adopting them anyway (resume='force')", stacklevel=4)
            return
        raise ManifestError(
            what + ". The fingerprint covers the policy, B, b, scoring and pruning rule. "
            "Start over with resume=False (replaces those epochs as it commits), give "
            "manifests= a new folder, or pass resume='force' to adopt them deliberately"
        )

    # ------------------------------------------------------------------ the lease

    def acquire_lease(self, *, run_id: str | None = None) -> dict[str, Any]:
        """Claim the root for this attempt (``_lease.json``): a live lease of another
        attempt raises :class:`ManifestError` at once; a stale one is taken over. A
        daemon thread renews the heartbeat until the process exits."""
        return self._lease.acquire(run_id=run_id)

    def read_lease(self) -> dict[str, Any] | None:
        """The lease of the root (``None``: no job holds it)."""
        return self._lease.read()

    def release_lease(self) -> None:
        """Give the root back (at exit): remove the lease if it is still this attempt's."""
        self._lease.release()


def run_fingerprint(hyper: Mapping[str, Any]) -> str:
    """A fingerprint of the hyper-parameters that change what the scores mean (policy
    and its betas, B, b, scoring, pruning rule, ...): 16 hex digits."""
    text = json.dumps(hyper, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
