"""Making an epoch visible: the commit protocol (no atomic rename needed; object stores
have none).

1. every rank stages its files and done-file (:mod:`es_pipe.manifests.writer`);
2. one caller (:meth:`Committer.commit`) waits until the done-file of every expected rank
   of the same attempt is there (or raises, naming the missing ranks), checks every named
   file's size, removes the markers of this and any later epoch (re-running an epoch makes
   the later ones stale), publishes the files to ``ROOT/epoch=N/`` (local: rename; object
   stores: server-side copy), deletes files in ``epoch=N/`` that the epoch does not name,
   and writes the marker ``_commits/epoch=N.json`` **last**, in one PUT;
3. readers use the newest marker and read exactly the files it names
   (:mod:`es_pipe.manifests.reader`).

A crash anywhere before step 2's marker leaves the previous epoch's marker and files
untouched. The commit touches only what es_pipe wrote, never follows a link out of the
root, and refuses to commit once another job holds the root's lease.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

from es_pipe.errors import ManifestError
from es_pipe.manifests import codec, layout
from es_pipe.manifests.fs import ManifestFS, crc, load_json, storage_error
from es_pipe.manifests.lease import Lease
from es_pipe.manifests.reader import ManifestReader
from es_pipe.manifests.writer import done_name, now


class CommitRecord(NamedTuple):
    """What a commit marker records about the run: its hyper-parameters and identity."""

    hyper: Mapping[str, Any] | None
    run: Mapping[str, Any] | None


class Committer:
    """Commits the epochs of one attempt into a root (rank 0's job).

    Args:
        store: the root's filesystem.
        reader: the root's reader (its marker cache is kept current).
        lease: the root's lease, checked before anything is published.
    """

    def __init__(self, store: ManifestFS, reader: ManifestReader, lease: Lease):
        self.store = store
        self.reader = reader
        self.lease = lease

    @property
    def attempt(self) -> str:
        return self.lease.attempt

    def commit(
        self, epoch: int, ranks: list[int], wait: tuple[float, float], record: CommitRecord
    ) -> dict[str, Any]:
        """Make ``epoch`` visible once ``ranks`` are done, waiting ``(timeout, poll)``;
        see :meth:`es_pipe.Manifests.commit`."""
        timeout, poll = wait
        hyper, run = record
        folder = layout.epoch_folder(epoch)
        layout.refuse_links(self.store.fs, self.store.root, folder, layout.COMMITS, layout.STAGING)
        dones = self._wait_for_ranks(epoch, ranks, timeout, poll)
        files = pick_files(epoch, dones)
        self.lease.check_held()
        try:
            marker = self._publish_epoch(epoch, ranks, files, hyper, run)
        except OSError as exc:
            raise storage_error(exc, f"committing epoch {epoch} of {self.store.url}") from exc
        # best effort: a leftover staging folder is ignored by every reader. The lease is
        # this attempt's (or nobody's), so other attempts' staged files are leftovers of
        # dead launches; a folder linked out of the root is not followed (rmtree refuses)
        with contextlib.suppress(FileNotFoundError, OSError):
            self.store.fs.rm(self.store.path(layout.STAGING, folder), recursive=True)
        return marker

    def _publish_epoch(
        self,
        epoch: int,
        ranks: list[int],
        files: list[dict[str, Any]],
        hyper: Mapping[str, Any] | None,
        run: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Steps 1-3 of the commit protocol (module docstring)."""
        # 1. later and equal markers become stale: the epoch is re-run from here.
        later = (e for e in self.reader.committed(refresh=True) if e >= epoch)
        for stale in sorted(later, reverse=True):
            warnings.warn(
                f"re-committing epoch {epoch} of {self.store.url}: removing the commit of epoch "
                f"{stale} (the run went back to an earlier checkpoint)",
                stacklevel=4,
            )
            self.store.rm(self.store.path(layout.marker_name(stale)))
            self.reader.forget(stale)
        # every later epoch=M/ is now uncommitted: an abandoned run's files, which plain
        # readers of ROOT/**/*.parquet would take for data
        self._remove_abandoned(epoch)
        # 2. publish: every named file to its committed place; remove our stale ones.
        for entry in files:
            self._publish(entry)
        self._remove_unnamed(epoch, {entry["path"].rsplit("/", 1)[-1] for entry in files})
        self.lease.check_held()  # again: the folder may have been taken while publishing
        # 3. the marker, last.
        marker = {
            "format": codec.MARKER_FORMAT,
            "schema_version": codec.schema_version(),
            "es_pipe_version": codec.es_pipe_version(),
            "epoch": epoch,
            "attempt": self.attempt,
            "ranks": ranks,
            "committed": now(),
            "hyper": dict(hyper or {}),
            "rows": int(sum(entry["rows"] for entry in files)),
            "files": [
                {k: entry[k] for k in codec.MARKER_FIELDS if k in entry}
                for entry in sorted(files, key=lambda e: e["path"])
            ],
        }
        if run is not None:
            marker["run"] = {**run, "shards": layout.shard_set_digest(e["shard"] for e in files)}
        data = codec.listing_json(marker)
        self.store.put(self.store.path(layout.marker_name(epoch)), data, atomic=True)
        self.reader.remember(epoch, marker)
        return marker

    def _remove_abandoned(self, epoch: int) -> None:
        """Remove es_pipe's files from ``epoch=M/`` folders with ``M > epoch`` (no marker
        names them once step 1 ran: files of a run that went back to an earlier
        checkpoint, or of a publication that crashed before its marker); a folder left
        empty goes too. A linked folder is not followed, and anything es_pipe did not
        write is left in place (with a warning)."""
        try:
            entries = self.store.ls(self.store.root, True)
        except (FileNotFoundError, NotADirectoryError):
            return
        for info in entries:
            name = layout.last_name(info["name"])
            match = layout.EPOCH_RE.fullmatch(name)
            if not match or int(match.group(1)) <= epoch:
                continue
            path = self.store.path(name)
            if info.get("islink") or (self.store.local and os.path.islink(path)):
                warnings.warn(
                    f"{path} is a symlink; es_pipe never follows a link out of the manifests "
                    "folder and leaves it alone. Plain readers of the root may read what it "
                    "points to: remove it",
                    stacklevel=5,
                )
                continue
            if info.get("type") != "directory":
                continue
            self._remove_unnamed(int(match.group(1)), set())
            with contextlib.suppress(Exception):  # best effort: not empty, or no folders
                if not self.store.io(f"ls {path}", self.store.fs.ls, path, False):
                    self.store.fs.rmdir(path)

    def _remove_unnamed(self, epoch: int, keep: set[str]) -> None:
        """Remove files of ``epoch=N/`` that this commit does not name, if es_pipe wrote
        them (a manifest file of an earlier commit of the epoch); leave anything else."""
        epoch_dir = self.store.path(layout.epoch_folder(epoch))
        try:
            present = self.store.ls(epoch_dir, True)  # object stores cache listings
        except FileNotFoundError:
            present = []
        foreign = []
        for info in present:
            name = layout.last_name(info["name"])
            if name in keep:
                continue
            ours = layout.OURS_RE.match(name)
            if info.get("type") == "file" and not info.get("islink") and ours:
                self.store.rm(info["name"])
            else:
                foreign.append(name)
        if foreign:
            warnings.warn(
                f"{epoch_dir} holds {len(foreign)} entries es_pipe did not write "
                f"({', '.join(sorted(foreign)[:5])}); left in place. Plain readers of the root "
                "will see them: move them out of the manifests folder",
                stacklevel=5,
            )

    def _wait_for_ranks(
        self, epoch: int, ranks: list[int], timeout: float, poll: float
    ) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        found: dict[int, dict[str, Any]] = {}
        while True:
            for rank in ranks:
                if rank not in found:
                    done = self._read_done(epoch, rank)
                    if done is not None and done.get("attempt") == self.attempt:
                        found[rank] = done
            missing = [rank for rank in ranks if rank not in found]
            if not missing:
                return found
            if time.monotonic() >= deadline:
                raise ManifestError(
                    f"cannot commit epoch {epoch} of {self.store.url}: ranks {missing} of "
                    f"{ranks} have not finished their manifests (attempt {self.attempt!r}) "
                    f"after {timeout:.0f} s; the previous epoch stays the committed one. Check "
                    "that those ranks are alive and call finish(epoch), that every rank uses "
                    "the same attempt id (ES_PIPE_ATTEMPT), or raise timeout="
                )
            time.sleep(poll)

    def _read_done(self, epoch: int, rank: int) -> dict[str, Any] | None:
        """This attempt's done-file of ``rank`` for ``epoch``, checked (None: not yet)."""
        path = self.store.path(layout.staging(epoch, self.attempt, "_done", done_name(rank)))
        fix = "delete it and re-run the epoch from the last checkpoint"
        try:
            raw = self.store.read(path)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ManifestError(f"done-file {path} is not a file ({exc}); {fix}") from None
        done = load_json(raw, f"done-file {path}", fix)
        if (
            not isinstance(done, dict)
            or done.get("format") != codec.DONE_FORMAT
            or done.get("epoch") != epoch
        ):
            raise ManifestError(f"{path} is not an es_pipe done-file of epoch {epoch}; {fix}")
        codec.check_done(done, path, fix)
        return done

    def _publish(self, entry: dict[str, Any]) -> None:
        """Move one staged file to its committed place (local: rename; else copy)."""
        src, dst = self.store.path(entry["staged"]), self.store.path(entry["path"])
        # local: one stat (fsspec's info adds an lstat and a dict per file)
        stat_size = _local_size if self.store.local else self.store.fs.size
        try:
            size = self.store.io(f"size {src}", stat_size, src)
        except FileNotFoundError:
            size = None
        if size is None:  # published by an earlier, interrupted commit of this attempt?
            if self._file_ok(dst, entry):
                return
            raise ManifestError(
                f"cannot commit: {src} (shard {entry['shard']!r}) is missing; the rank that "
                "wrote it lost its files. Re-run the epoch"
            )
        if size != entry["size"]:
            raise ManifestError(
                f"cannot commit: {src} has {size} bytes, its done-file says {entry['size']}; "
                "the file is truncated. Re-run the epoch"
            )
        if self.store.local:
            try:  # the epoch folder exists after the first file: no makedirs per file
                os.replace(src, dst)
            except FileNotFoundError:
                if not os.path.exists(src):
                    raise
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
        else:
            self.store.io(f"copy {src} to {dst}", self.store.fs.copy, src, dst)

    def _file_ok(self, path: str, entry: dict[str, Any]) -> bool:
        try:
            data = self.store.read(path)
        except FileNotFoundError:
            return False
        return len(data) == entry["size"] and crc(data) == entry["crc32"]


def pick_files(epoch: int, dones: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One file per shard from the ranks' done-files: a rank's regular file wins over
    another rank's fallback copy; two regular files of one shard are an error."""
    chosen: dict[str, tuple[int, dict[str, Any]]] = {}
    for rank in sorted(dones):
        for entry in dones[rank]["files"]:
            layout.check_entry(entry, epoch, f"the done-file of rank {rank}")
            shard = entry["shard"]
            if shard not in chosen:
                chosen[shard] = (rank, entry)
                continue
            other_rank, other = chosen[shard]
            if other.get("fallback") and not entry.get("fallback"):
                chosen[shard] = (rank, entry)
            elif not other.get("fallback") and not entry.get("fallback"):
                raise ManifestError(
                    f"epoch {epoch}: ranks {other_rank} and {rank} both wrote a manifest for "
                    f"shard {shard!r}; each shard must be read by one rank per epoch (check "
                    "the sources' rank split)"
                )
    return [entry for _, entry in chosen.values()]


def _local_size(path: str) -> int:
    """The size of a local file (``FileNotFoundError`` when it is not there)."""
    return os.stat(path).st_size
