"""One rank's side of an epoch commit: stage its shards' manifests, list them in its
done-file, and wait until rank 0 has committed the epoch.

Every rank writes each of its shards' manifests under a *unique* staging name (rank +
attempt token), whole, in one PUT, then its done-file listing them with their sizes and
checksums (:meth:`RankWriter.write_shard`, :meth:`RankWriter.finish`). Nothing a rank
writes is visible to readers until the commit (:mod:`es_pipe.manifests.commit`) names it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from es_pipe.errors import ManifestError
from es_pipe.eswp import rule as pruning
from es_pipe.manifests import codec, layout
from es_pipe.manifests.fs import ManifestFS, crc
from es_pipe.manifests.reader import ManifestReader

# the manifest stores the pruning state byte laid out the way es_pipe.pruning keeps it
STATE_BITS = codec.StateBits(streak=int(pruning.STREAK), upweight=int(pruning.UPWEIGHT))


def now() -> str:
    """The time a done-file or marker is written (UTC, ISO 8601)."""
    return datetime.now(timezone.utc).isoformat()


class ShardMeta(NamedTuple):
    """What a shard's manifest records besides its columns (see ``Manifests.write_shard``)."""

    keys: pa.Array | None
    factor: float
    fingerprint: dict[str, Any] | None
    hyper: Mapping[str, Any] | None
    fallback: bool


class RankWriter:
    """Stages one rank's manifests of an epoch and waits for their commit.

    Args:
        store: the root's filesystem.
        reader: the root's reader (to see the commit markers).
        rank: this process's rank (names its staged files and done-file).
        attempt: this launch's attempt id (may be set later, before the first write).
    """

    def __init__(self, store: ManifestFS, reader: ManifestReader, rank: int, attempt: str):
        self.store = store
        self.reader = reader
        self.rank = rank
        self.attempt = attempt
        self._written: dict[int, list[dict[str, Any]]] = {}

    def write_shard(
        self, epoch: int, shard: str, columns: Mapping[str, np.ndarray], info: ShardMeta
    ) -> dict[str, Any]:
        """Stage one shard's manifest for ``epoch``; see :meth:`es_pipe.Manifests.write_shard`."""
        keys, factor, fingerprint, hyper, fallback = info
        table = codec.build_table(shard, columns, bits=STATE_BITS, keys=keys, factor=factor)
        meta = {
            "schema_version": codec.schema_version(),
            "es_pipe_version": codec.es_pipe_version(),
            "epoch": int(epoch),
            "shard": shard,
            "rows": table.num_rows,
            "fingerprint": fingerprint,
            "factor": float(factor),
            "hyper": dict(hyper or {}),
            "rank": self.rank,
            "attempt": self.attempt,
        }
        data = codec.encode_table(table, meta)
        # the counts from the table's own streak column (zero-copy: one uint8 chunk)
        streak = table.column("streak").combine_chunks().to_numpy()
        name = layout.safe_name(shard)
        part = f"{name}.r{self.rank}-{self.store.token}.parquet.part"
        staged = layout.staging(epoch, self.attempt, part)
        self.store.put(self.store.path(staged), data, atomic=False)
        entry = {
            "shard": shard,
            "staged": staged,
            "path": f"{layout.epoch_folder(epoch)}/{name}.parquet",
            "rows": table.num_rows,
            "pruned": int(np.count_nonzero(streak)),
            # pruned again: left out of this epoch too (streak >= 2); for `inspect`
            "repruned": int(np.count_nonzero(streak >= 2)),
            "size": data.size,
            "crc32": crc(data),
            "fallback": bool(fallback),
        }
        self._written.setdefault(int(epoch), []).append(entry)
        return entry

    def finish(self, epoch: int) -> str:
        """Write this rank's done-file for ``epoch`` (after all its ``write_shard``)."""
        entries = sorted(self._written.pop(int(epoch), []), key=lambda e: e["path"])
        done = {
            "format": codec.DONE_FORMAT,
            "schema_version": codec.schema_version(),
            "epoch": int(epoch),
            "rank": self.rank,
            "attempt": self.attempt,
            "written": now(),
            "files": entries,
        }
        path = self.store.path(layout.staging(epoch, self.attempt, "_done", done_name(self.rank)))
        self.store.put(path, codec.listing_json(done), atomic=True)
        return path

    def wait_committed(
        self, epoch: int, *, ranks: int, timeout: float, poll: float = 0.2, max_poll: float = 2.0
    ) -> None:
        """Block until ``epoch`` is committed by rank 0 of THIS attempt; see
        :meth:`es_pipe.Manifests.wait_committed`."""
        epoch = int(epoch)
        deadline = time.monotonic() + timeout
        while not self._committed_by_me(epoch):
            if time.monotonic() >= deadline:
                raise ManifestError(self._not_committed(epoch, ranks, timeout))
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(max_poll, poll * 1.5)

    def _committed_by_me(self, epoch: int) -> bool:
        """Whether the marker of ``epoch`` is there and was written by this attempt."""
        if epoch not in self.reader.committed():
            return False
        self.reader.forget(epoch)  # read it again: it may be a stale one, replaced
        try:
            marker = self.reader.marker(epoch)
        except ManifestError:
            return False  # replaced or removed between the listing and the read
        return marker.get("attempt") == self.attempt

    def _not_committed(self, epoch: int, ranks: int, timeout: float) -> str:
        done_dir = self.store.path(layout.staging(epoch, self.attempt, "_done"))
        try:
            names = self.store.ls(done_dir, False)
        except FileNotFoundError:
            names = []
        finished = {
            int(m.group(1)) for m in (layout.DONE_RE.match(layout.last_name(n)) for n in names) if m
        }
        missing = [r for r in range(ranks) if r not in finished]
        who = (
            f"ranks {missing} have not written their done-files"
            if missing
            else "every rank finished; rank 0 did not commit (is it alive?)"
        )
        return (
            f"epoch {epoch} of {self.store.url} was not committed by this launch (attempt "
            f"{self.attempt!r}) within {timeout:.0f} s: {who}. A rank that died or fell "
            "behind stops the epoch; restart the job from its last checkpoint (the previous "
            "epoch stays the committed one), or raise commit_timeout="
        )


def done_name(rank: int) -> str:
    """The done-file name of ``rank``."""
    return f"rank={int(rank)}.json"
