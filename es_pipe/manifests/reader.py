"""Reading a manifest root: the committed epochs, their markers, and the files they name.

Readers use the newest marker and read exactly the files it names, checking size and
crc32, so a half-published epoch, an orphan or a truncated file is never read as data.
:class:`ManifestReader` is the public read API: the sampler's restore, ``es-pipe
inspect`` and :func:`manifests_dataset` all read through it.

Plain readers: ``pyarrow.dataset``/``pandas`` on ROOT skip ``_commits`` and ``_staging``
(names starting with ``_``), DuckDB's ``ROOT/**/*.parquet`` never matches staged
``.part`` files, so they see ``epoch=N`` directories of complete files. The only thing a
plain reader can see that es_pipe does not is the epoch being published right now (or
one whose publication crashed): filter ``epoch <= newest committed``
(``es-pipe inspect ROOT`` prints the query), or use :meth:`ManifestReader.dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from es_pipe.errors import ManifestError
from es_pipe.forward import Forward
from es_pipe.manifests import codec, layout
from es_pipe.manifests.fs import ManifestFS, crc
from es_pipe.retry import Retry

if TYPE_CHECKING:
    import pyarrow.dataset


@dataclass(frozen=True)
class ShardManifest:
    """One shard's manifest as read back: columns by ordinal (``row``)."""

    shard: str
    epoch: int
    path: str
    columns: dict[str, np.ndarray]  # score, loss, visits, step, pruned, streak, weight
    keys: pa.Array  # string, by ordinal (null where unknown)
    meta: dict[str, Any]

    @property
    def rows(self) -> int:
        return len(self.columns["score"])


class ManifestReader:
    """The committed epochs of a manifest root, read-only.

    A long class (about 280 lines) for a reason: it is the public read API, each method a
    contract of its own, and half its lines are docstrings and error messages that name
    the fix; the parsing and checks live in :mod:`~es_pipe.manifests.codec` and
    :mod:`~es_pipe.manifests.layout`.

    Args:
        root: directory or fsspec URL, or a :class:`ManifestFS` already open on one.
        storage_options: passed to fsspec (when ``root`` is a URL).
        progress: show a tqdm bar when reading many files (``None``: when > 16 files).
        retry: how filesystem calls are retried (see :class:`es_pipe.Manifests`).
        relocate: ``{"old_prefix": "new_prefix"}``: the data moved; shard URLs of the
            committed manifests that start with an old prefix are read under the new one.
    """

    def __init__(
        self,
        root: str | ManifestFS,
        *,
        storage_options: Mapping[str, Any] | None = None,
        progress: bool | None = False,
        retry: Retry | int | None = None,
        relocate: Mapping[str, str] | None = None,
    ) -> None:
        self.relocate = layout.check_relocate(relocate)
        self.store = (
            root
            if isinstance(root, ManifestFS)
            else ManifestFS(root, storage_options=storage_options, retry=retry)
        )
        self.progress = progress
        self._markers: dict[int, dict[str, Any]] = {}
        self._by_shard: dict[int, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}

    url = Forward[str]("store.url", "The root as given.")
    fs = Forward[Any]("store.fs", "The root's fsspec filesystem.")
    root = Forward[str]("store.root", "The root's path on :attr:`fs`.")
    retry = Forward[Retry]("store.retry", "The retry policy of every filesystem call.")
    retries = Forward[int]("store.retries", "Filesystem calls retried so far.")

    def committed(self, *, refresh: bool = True) -> list[int]:
        """Committed epochs, oldest first."""
        try:
            names = self.store.ls(self.store.path(layout.COMMITS), False)
        except (FileNotFoundError, NotADirectoryError):  # nothing committed (or a file)
            return []
        epochs = []
        for name in names:
            match = layout.MARKER_RE.match(layout.last_name(name))
            if match and int(match.group(1)) >= layout.MAX_INT32:
                raise ManifestError(
                    f"{name}: epoch {match.group(1)} is out of range (at most "
                    f"{layout.MAX_INT32 - 1}); the marker was not written by es_pipe. Delete it"
                )
            if match:
                epochs.append(int(match.group(1)))
        if refresh:
            self._markers = {e: m for e, m in self._markers.items() if e in epochs}
        return sorted(epochs)

    def latest(self, *, required: bool = False) -> int | None:
        """The newest committed epoch (``None``, or ``ManifestError`` when ``required``)."""
        epochs = self.committed()
        if epochs:
            return epochs[-1]
        if required:
            raise ManifestError(self.nothing_committed())
        return None

    def nothing_committed(self) -> str:
        """The message for a root without a committed epoch, naming staged leftovers."""
        staged = self.store.exists(self.store.path(layout.STAGING))
        hint = (
            " (there are uncommitted files in _staging/: a run crashed or is still writing "
            "its first epoch)"
            if staged
            else ""
        )
        return (
            f"no committed epoch under {self.url}{hint}; point at the manifests= folder of a "
            "run that finished at least one epoch"
        )

    def forget(self, epoch: int) -> None:
        """Drop the cached marker of ``epoch``: the next :meth:`marker` reads it again."""
        self._markers.pop(int(epoch), None)

    def remember(self, epoch: int, marker: dict[str, Any]) -> None:
        """Cache the marker of ``epoch`` that this process just committed."""
        self._markers[int(epoch)] = marker

    def marker(self, epoch: int) -> dict[str, Any]:
        """The commit marker of ``epoch``, checked (``ManifestError`` if not committed)."""
        epoch = int(epoch)
        if epoch in self._markers:
            return self._markers[epoch]
        path = self.store.path(layout.marker_name(epoch))
        try:
            raw = self.store.read(path)
        except FileNotFoundError:
            raise ManifestError(self._uncommitted(epoch)) from None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ManifestError(
                f"commit marker {path} is not a file ({exc}); it was not written by es_pipe. "
                "Delete it to fall back to the previous epoch"
            ) from None
        marker = codec.parse_marker(raw, epoch, path)
        self._markers[epoch] = marker
        return marker

    def _uncommitted(self, epoch: int) -> str:
        committed = self.committed()
        if not committed:
            return self.nothing_committed()
        staged = self.store.exists(self.store.path(layout.STAGING, layout.epoch_folder(epoch)))
        return (
            f"epoch {epoch} of {self.url} is not committed"
            + (" (its files are staged, but no commit marker was written)" if staged else "")
            + f"; committed epochs: {layout.ranges(committed)}. Read one of those (the newest "
            f"is {committed[-1]})"
        )

    def shards(self, epoch: int) -> dict[str, dict[str, Any]]:
        """``shard -> file entry`` of a committed epoch (shard URLs relocated)."""
        marker = self.marker(epoch)
        cached = self._by_shard.get(epoch)
        if cached is None or cached[0] is not marker:  # built once per marker read
            by_shard = {layout.relocated(e["shard"], self.relocate): e for e in marker["files"]}
            cached = self._by_shard[epoch] = (marker, by_shard)
        return cached[1]

    def find(
        self, shard: str, *, before: int | None = None, epochs: list[int] | None = None
    ) -> int | None:
        """The newest committed epoch (``< before`` if given) that has ``shard``. Pass
        ``epochs`` (from :meth:`committed`) to look up many shards with one listing."""
        for epoch in reversed(self.committed(refresh=False) if epochs is None else epochs):
            if before is not None and epoch >= before:
                continue
            if shard in self.shards(epoch):
                return epoch
        return None

    def read_shard(self, shard: str, epoch: int | None = None) -> ShardManifest:
        """One shard's manifest of ``epoch`` (default: the newest committed that has it)."""
        if epoch is None:
            epoch = self.find(shard)
            if epoch is None:
                raise ManifestError(
                    f"no committed manifest of shard {shard!r} under {self.url}"
                    if self.committed()
                    else self.nothing_committed()
                )
        entry = self.shards(epoch).get(shard)
        if entry is None:
            raise ManifestError(
                f"epoch {epoch} of {self.url} has no manifest of shard {shard!r} (no rank read it "
                "that epoch); leave epoch= out to get the newest epoch that has it"
            )
        table, meta, path = self.read_file(epoch, entry)
        columns = codec.decode_columns(table, path)
        keys = table.column("key").combine_chunks()
        shard = layout.relocated(entry["shard"], self.relocate)
        return ShardManifest(shard, int(epoch), path, columns, keys, meta)

    def read_shards(
        self, shards: Iterable[str], epoch: int | None = None, *, threads: int | None = None
    ) -> list[ShardManifest]:
        """``read_shard`` for many shards, by a thread pool."""
        shards = list(shards)
        threads = threads or min(8, os.cpu_count() or 1)
        if threads <= 1 or len(shards) <= 1:
            return [self.read_shard(s, epoch) for s in shards]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda s: self.read_shard(s, epoch), shards))

    def read_file(
        self, epoch: int, entry: Mapping[str, Any], columns: list[str] | None = None
    ) -> tuple[pa.Table, dict[str, Any], str]:
        """The file a marker ``entry`` of ``epoch`` names: ``(table, es_pipe metadata,
        path)``, only ``columns`` when given; size, crc32, schema and the shard/epoch it
        holds are checked against the marker first."""
        path = self.store.path(entry["path"])
        marker = self.store.path(layout.marker_name(epoch))
        try:
            data = self.store.read(path)
        except FileNotFoundError:
            raise ManifestError(
                f"{path} is named by the commit of epoch {epoch} but missing; the manifest "
                f"root was edited. Restore the file or delete the marker {marker} to fall "
                "back to the previous epoch"
            ) from None
        if len(data) != entry["size"] or crc(data) != entry["crc32"]:
            raise ManifestError(
                f"{path} is corrupt or truncated ({len(data)} bytes, the commit says "
                f"{entry['size']}; crc32 {'differs' if len(data) == entry['size'] else 'n/a'})"
                f". Restore it, or delete {marker} to fall back to the previous epoch"
            )
        table, meta = codec.decode_file(data, columns, path)
        if meta.get("shard") != entry["shard"] or meta.get("epoch") != epoch:
            raise ManifestError(
                f"{path} holds shard {meta.get('shard')!r} of epoch {meta.get('epoch')}, the "
                f"commit says shard {entry['shard']!r} of epoch {epoch}"
            )
        return table, meta, path

    def files(self, epoch: int, shard: str | None = None) -> list[dict[str, Any]]:
        """The file entries of committed ``epoch`` (only ``shard``'s when given, by the
        name the marker records)."""
        return [f for f in self.marker(epoch)["files"] if shard is None or f["shard"] == shard]

    def iter_files(
        self, epoch: int, columns: list[str] | None = None, shard: str | None = None
    ) -> Iterator[tuple[dict[str, Any], pa.Table]]:
        """``(entry, table)`` for each file of committed ``epoch`` (``shard``'s only when
        given), one file at a time, read with only ``columns``: memory holds one shard's
        file, however many an epoch has. Checked as :meth:`read_file` checks."""
        for entry in self.files(epoch, shard):
            yield entry, self.read_file(epoch, entry, columns)[0]

    def read_epoch(self, epoch: int | None = None, *, columns: list[str] | None = None) -> pa.Table:
        """Every shard of a committed epoch (default: the newest) as one table, with an
        ``epoch`` column."""
        if epoch is None:
            epoch = cast(int, self.latest(required=True))  # required: never None
        files = self.iter_files(epoch, columns)
        total = len(self.files(epoch))
        tables = [table for _, table in _progress(files, total, f"epoch {epoch}", self.progress)]
        if not tables:
            table = codec.arrow_schema().empty_table()
            if columns is not None:
                table = table.select(columns)
        else:
            table = pa.concat_tables(tables).unify_dictionaries()
        return table.append_column(
            "epoch", pa.array(np.full(table.num_rows, epoch, np.int32), pa.int32())
        )

    def dataset(self, epochs: Iterable[int] | None = None) -> pyarrow.dataset.Dataset:
        """The committed epochs (default: all; else those of ``epochs``) as one
        ``pyarrow.dataset.Dataset`` with an ``epoch`` column: exactly the files their
        commit markers name, so that DuckDB, pandas or Polars read committed rows only
        (never an epoch being published, nor one a crash or a re-run abandoned).
        ``ManifestError`` when nothing is committed or an epoch asked for is not."""
        import pyarrow.dataset as ds

        wanted = self.committed() if epochs is None else sorted({int(e) for e in epochs})
        if not wanted:
            raise ManifestError(self.nothing_committed())
        paths = [self.store.path(f["path"]) for e in wanted for f in self.marker(e)["files"]]
        schema = codec.arrow_schema().append(pa.field("epoch", pa.int32(), nullable=False))
        return ds.dataset(
            paths,
            schema=schema,
            format="parquet",
            filesystem=self.fs,
            partitioning=ds.partitioning(pa.schema([("epoch", pa.int32())]), flavor="hive"),
            partition_base_dir=self.root,
        )


def manifests_dataset(
    root: str,
    epochs: Iterable[int] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> pyarrow.dataset.Dataset:
    """The committed manifests under ``root`` as a ``pyarrow.dataset.Dataset`` (see
    :meth:`ManifestReader.dataset`): the one line other engines need, e.g.
    ``duckdb.sql("select epoch, avg(pruned::int) from m group by 1")`` after
    ``m = es_pipe.manifests_dataset(root)``."""
    return ManifestReader(root, storage_options=storage_options).dataset(epochs)


def _progress(items: Iterable[Any], total: int, label: str, progress: bool | None) -> Iterable[Any]:
    show = total > 16 if progress is None else progress
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=f"reading {label}", unit="file", leave=False)
