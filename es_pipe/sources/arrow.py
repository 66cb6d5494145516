"""Parquet and Arrow IPC shards as torchdata nodes.

Rows are the samples. A row's ordinal (``__index__``) is its row number in the shard; its
key (``__key__``) is the value of ``key_column`` as a string, or the row number as a
decimal string. Payload values per column type:

* integer, float and bool columns without nulls: numpy scalars;
* list columns of numbers without nulls (token ids, embeddings): numpy arrays;
* string and binary columns: ``str`` / ``bytes`` (``None`` for a null);
* anything else, and columns with nulls: Python objects (``Array.to_pylist()``).

Pruning works on whole blocks first: a Parquet row group whose rows are all pruned (or
all delivered before a resume) is never read; in the others only the kept rows are
converted (``RecordBatch.filter``/``take``). Local Arrow IPC files are memory-mapped, so
rows that are pruned are never paged in either.

A shard's row count is checked against the count its index file (or ``num_samples=``)
gives, which the split and ``equalize`` rely on: a Parquet shard's from its footer, before
any row is read; an Arrow shard's when its last record batch has been read, before that
batch is delivered (with ``key_column``, before any row). A mismatch is a
:class:`ShardError` (or, with ``on_error="skip"``, a skipped shard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from es_pipe import storage
from es_pipe.columns import ColumnChunk, column_values
from es_pipe.errors import ConfigError, ShardError
from es_pipe.sources.base import SourceOptions
from es_pipe.sources.columnar import ColumnarOption
from es_pipe.sources.shards import ShardList

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ArrowSource", "ParquetSource"]

_ARROW_MAGIC = b"ARROW1"


def _values(arr: pa.Array | pa.ChunkedArray, sel: np.ndarray | None) -> Any:
    """Per-row payload values of a column (see the module docstring), rows ``sel`` only.

    Numeric and list-of-numeric columns become numpy (views into Arrow memory, one per row
    for lists) and are then indexed with ``sel``: cheaper than copying the kept rows with
    ``take`` first. Other columns take the kept rows, then convert them to Python.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if arr.null_count == 0 and (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or (
            (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type))
        )
    ):
        out = arr.to_numpy(zero_copy_only=False)
        return out if sel is None else out[sel]
    return (arr if sel is None else arr.take(pa.array(sel))).to_pylist()


_KEY_CACHE_ROWS = 1 << 16
_key_cache: np.ndarray | None = None


def _row_keys(ords: np.ndarray, idx: list[int]) -> list[str]:
    """Row numbers as decimal strings; the first 65536 come from a shared cache (~4 MB),
    which turns a per-row ``str(int)`` into one numpy ``take``."""
    global _key_cache
    if ords.size == 0 or int(ords.max()) >= _KEY_CACHE_ROWS:
        return list(map(str, idx))
    if _key_cache is None:
        _key_cache = np.array([str(i) for i in range(_KEY_CACHE_ROWS)], dtype=object)
    return _key_cache[ords].tolist()


def _sorted_member(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean mask: which entries of ``x`` occur in the sorted array ``sorted_values``."""
    if sorted_values.size == 0:
        return np.zeros(x.shape, dtype=bool)
    pos = np.searchsorted(sorted_values, x)
    pos = np.minimum(pos, sorted_values.size - 1)
    return sorted_values[pos] == x


def _header_schema(f: Any) -> pa.Schema:
    """The schema message at the start of an Arrow IPC file (after the 8-byte magic)."""
    f.seek(len(_ARROW_MAGIC) + 2)
    prefix = f.read(8)
    if len(prefix) < 8 or prefix[:4] != b"\xff\xff\xff\xff":
        raise pa.ArrowInvalid("no schema message after the magic bytes")
    size = int.from_bytes(prefix[4:], "little", signed=True)
    body = f.read(size) if 0 < size < (1 << 24) else b""
    if len(body) != size:
        raise pa.ArrowInvalid(f"schema message of {size} bytes does not fit the file")
    return pa.ipc.read_schema(pa.py_buffer(prefix + body))


class _ColumnarSource(ColumnarOption):
    """Shared logic of Parquet and Arrow sources: projection, schema, keys, rows."""

    def __init__(
        self,
        urls: str | Sequence[str] | ShardList,
        *,
        columns: Sequence[str] | None = None,
        key_column: str | None = None,
        schema: pa.Schema | None = None,
        shuffle_rows: bool = False,
        shuffle_window: int = 8192,
        batch_rows: int = 8192,
        columnar: bool | None = None,
        **options: Unpack[SourceOptions],
    ) -> None:
        super().__init__(urls, **options)
        for label, value in (("batch_rows", batch_rows), ("shuffle_window", shuffle_window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{label} must be an int >= 1, got {value!r}")
        if columns is not None and (
            isinstance(columns, (str, bytes))
            or not isinstance(columns, Iterable)
            or not all(isinstance(c, str) for c in columns)
        ):
            raise ConfigError(f"columns={columns!r} must be a list of column names")
        if key_column is not None and not isinstance(key_column, str):
            raise ConfigError(f"key_column={key_column!r} must be a column name")
        if schema is not None and not isinstance(schema, pa.Schema):
            raise ConfigError("schema must be a pyarrow.Schema")
        self.columns = list(columns) if columns is not None else None
        self.key_column = key_column
        self.schema = schema
        self.shuffle_rows = bool(shuffle_rows)
        self.shuffle_window = int(shuffle_window)
        self.batch_rows = int(batch_rows)
        self._set_columnar(columnar)

    # -- schema ------------------------------------------------------------------
    def _reference_schema(self) -> pa.Schema:
        if self.schema is None:
            first = self.shards.urls[0]
            with self._open(first) as handle:
                self.schema = self._schema_of(handle, first)
        return self.schema

    def _check_schema(self, url: str, found: pa.Schema) -> None:
        expected = self._reference_schema()
        wanted = list(self.columns) if self.columns is not None else expected.names
        if self.key_column is not None and self.key_column not in wanted:
            wanted.append(self.key_column)
        for name in wanted:
            if name not in expected.names:
                raise ConfigError(
                    f"column {name!r} is not in the dataset schema {expected.names}; fix "
                    "columns= / key_column="
                )
            if name not in found.names:
                raise ShardError(
                    f"shard {url!r} has no column {name!r} (its columns: {found.names}); "
                    "rewrite the shard with the dataset's schema or project the shared "
                    "columns with columns="
                )
            e, g = expected.field(name).type, found.field(name).type
            if e != g:
                raise ShardError(
                    f"shard {url!r}: column {name!r} has type {g}, expected {e} (from "
                    f"{'schema=' if self.schema is not None else 'the first shard'}); "
                    "rewrite the shard with the dataset's schema"
                )
        if self.columns is None and len(found.names) != len(expected.names):
            extra = sorted(set(found.names) - set(expected.names))
            raise ShardError(
                f"shard {url!r} has extra columns {extra}; rewrite it or select columns="
            )

    def _projection(self) -> list[str] | None:
        return self.columns

    # -- keys ----------------------------------------------------------------------
    def _bad_key_rows(self, url: str, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Keys as an object array of str, and the sorted ordinals of rows with bad keys."""
        keys = pc.cast(keys, pa.string())
        ks = keys.to_numpy(zero_copy_only=False)
        null = np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))
        if null.size:
            self.ctx.bad_samples(
                f"shard {url!r}: {null.size} rows have a null key in column "
                f"{self.key_column!r} (first row {int(null[0])}); fill the keys and rewrite "
                "the shard",
                int(null.size),
            )
        valid = np.flatnonzero(~keys.is_null().to_numpy(zero_copy_only=False))
        _, first = np.unique(ks[valid], return_index=True)
        dups = np.setdiff1d(valid, valid[first])
        if dups.size:
            self.ctx.bad_samples(
                f"shard {url!r}: key {ks[dups[0]]!r} appears more than once (row "
                f"{int(dups[0])}; {dups.size} duplicate rows); keys must be unique within a "
                "shard: deduplicate and rewrite it",
                int(dups.size),
            )
        return ks, np.union1d(null, dups).astype(np.int64)

    def _rows(
        self,
        url: str,
        data: pa.RecordBatch | pa.Table,
        ords: np.ndarray,
        keys: Any,
        sel: np.ndarray | None = None,
    ) -> list[Any]:
        """Sample dicts of the rows ``sel`` of ``data`` (all if None), ordinals ``ords``;
        under ``columnar=True`` one :class:`~es_pipe.columns.ColumnChunk` of them."""
        names = list(data.schema.names)
        if self.columnar:
            return [self._chunk_of(url, data, names, ords, keys, sel)] if len(ords) else []
        cols = [_values(data.column(i), sel) for i in range(data.num_columns)]
        key_only = self.key_column is not None and self.key_column not in (self.columns or names)
        if key_only:  # read for the keys, not asked for as a column
            j = names.index(self.key_column)
            del names[j], cols[j]
        idx = ords.tolist()
        ks = keys[ords].tolist() if keys is not None else _row_keys(ords, idx)
        fields = (*names, "__key__", "__shard__", "__index__")
        return [
            dict(zip(fields, row, strict=True))
            for row in zip(*cols, ks, repeat(url, len(idx)), idx, strict=True)
        ]

    def _chunk_of(
        self,
        url: str,
        data: pa.RecordBatch | pa.Table,
        names: list[str],
        ords: np.ndarray,
        keys: Any,
        sel: np.ndarray | None,
    ) -> ColumnChunk:
        key_only = self.key_column is not None and self.key_column not in (self.columns or names)
        columns = {
            name: column_values(data.column(i), sel)
            for i, name in enumerate(names)
            if not (key_only and name == self.key_column)
        }
        return ColumnChunk(url, ords, columns, None if keys is None else keys[ords])

    def _read_columns(self) -> list[str] | None:
        if self.columns is None:
            return None
        cols = list(self.columns)
        if self.key_column is not None and self.key_column not in cols:
            cols.append(self.key_column)
        return cols

    # -- file access -----------------------------------------------------------------
    @contextlib.contextmanager
    def _open_bytes(self, url: str, memory_map: bool = False) -> Iterator[Any]:
        """Open a shard for reading; native file for local paths, fsspec (with retried
        reads) otherwise."""
        fs, path = storage.url_to_fs(url, self.storage_options)
        try:
            if isinstance(fs, LocalFileSystem):
                f = pa.memory_map(path, "r") if memory_map else pa.OSFile(path, "rb")
            else:
                f = self.ctx.open_file(url)  # reads retried after transient errors
        except FileNotFoundError as exc:
            storage.raise_storage_error(exc, url)
            raise ShardError(
                f"shard {url!r} does not exist; fix the shard list or restore the file"
            ) from exc
        with f:
            yield f

    def _open(self, url: str) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _schema_of(self, handle: Any, url: str) -> pa.Schema:
        raise NotImplementedError


class ParquetSource(_ColumnarSource):
    """Stream rows of Parquet shards on any fsspec filesystem, one dict per row.

    Row groups are read in record batches of ``batch_rows`` rows, only the projected
    ``columns`` (plus ``key_column``). Every shard is checked against ``schema`` (default:
    the schema of the first listed shard) before its rows are read.

    Example::

        src = ParquetSource("gs://bucket/train/*.parquet", columns=["tokens"], seed=0)
        for sample in src:  # {"tokens": np.ndarray, "__key__": "0", "__shard__": ..., ...}
            ...

    Args:
        columns: columns to read (default all).
        key_column: column whose value (as a string) is the sample key; must be non-null
            and unique within each shard. Default: the row number.
        schema: expected ``pyarrow.Schema``; default the first listed shard's schema.
        shuffle_rows: shuffle within each shard: row groups in a seeded random order,
            gathered into windows of at least ``shuffle_window`` rows, and the rows of each
            window permuted together (a window is then held in memory). With the default,
            a meta-batch mixes rows of several row groups, so selection compares samples
            from across the shard, not neighbours of one row group.
        shuffle_window: rows shuffled together under ``shuffle_rows`` (whole row groups are
            added until the window holds at least this many).
        batch_rows: record batch size when reading in order.
        columnar: ``True``: yield :class:`~es_pipe.columns.ColumnChunk` items (the kept
            rows of a record batch as arrays, with their identity as arrays) instead of
            one dict per row. The ``SelectStage`` stage builds meta-batches from them
            without per-sample Python (README: "Columnar path"); states, resume and the
            meta-batches are those of the dict path. For the stage (and a
            ``tn.Prefetcher`` or ``SourceDataset`` before it); a mapping step written for
            sample dicts would get chunks instead. ``False``: one dict per row. ``None``
            (the default): dicts, unless an ``SelectStage`` stage with its default
            collate reads the source directly or through a ``tn.Prefetcher``: the
            stage then switches it to chunks (it cannot change what the stage emits).
        **kwargs: see :class:`~es_pipe.sources.base.ShardedSource`.
    """

    @contextlib.contextmanager
    def _open(self, url: str) -> Iterator[pq.ParquetFile]:
        with self._open_bytes(url) as f:
            try:
                # Page CRCs (write_shards writes them) catch flipped bits in the data.
                pf = pq.ParquetFile(f, page_checksum_verification=True)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ShardError(
                    f"shard {url!r} is not a readable Parquet file ({exc}); re-create it"
                ) from exc
            yield pf

    def _schema_of(self, handle: pq.ParquetFile, url: str) -> pa.Schema:
        return handle.schema_arrow

    def count_samples(self, url: str) -> int | None:
        with self._open(url) as pf:
            return int(pf.metadata.num_rows)

    def iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[dict]]:
        with self._open(url) as pf:
            self._check_schema(url, pf.schema_arrow)
            md = pf.metadata
            sizes = np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)])
            ends = np.cumsum(sizes, dtype=np.int64)
            starts = ends - sizes
            n = int(ends[-1]) if ends.size else 0
            self.ctx.check_count(url, n, "rows")  # the footer knows: before any row is read
            keys = None
            drop = pruned[pruned < n]
            if self.key_column is not None:
                keys, bad = self._bad_key_rows(
                    url, pf.read(columns=[self.key_column]).column(0).combine_chunks()
                )
                drop = np.union1d(drop, bad)
            keep = np.ones(n, dtype=bool)
            keep[drop] = False
            cols = self._read_columns()
            if self.shuffle_rows:
                yield from self._shuffled(pf, url, sizes, keep, start, keys, cols, rng_seed)
                return
            rest = np.flatnonzero(keep)[start:]
            if rest.size == 0:
                return
            needed = np.unique(np.searchsorted(ends, rest, side="right"))
            window_ords = np.concatenate([np.arange(starts[g], ends[g]) for g in needed])
            pos = 0
            for batch in pf.iter_batches(
                batch_size=self.batch_rows, row_groups=needed.tolist(), columns=cols
            ):
                m = batch.num_rows
                ords = window_ords[pos : pos + m]
                pos += m
                sel = _sorted_member(rest, ords)
                if sel.all():
                    yield self._rows(url, batch, ords, keys)
                elif sel.any():
                    yield self._rows(url, batch, ords[sel], keys, sel=np.flatnonzero(sel))

    def _shuffled(
        self,
        pf: pq.ParquetFile,
        url: str,
        sizes: np.ndarray,
        keep: np.ndarray,
        start: int,
        keys: Any,
        cols: list[str] | None,
        rng_seed: list[int],
    ) -> Iterator[list[dict]]:
        """The kept rows in a seeded order: row groups shuffled, gathered into windows of
        at least ``shuffle_window`` rows, rows permuted within each window; the order is
        a function of the seed alone, so ``start`` (rows already delivered) resumes it."""
        ends = np.cumsum(sizes, dtype=np.int64)
        starts = ends - sizes
        rng = np.random.default_rng(rng_seed)
        windows: list[list[int]] = [[]]
        held = 0
        for g in rng.permutation(len(sizes)).tolist():
            if held >= self.shuffle_window:
                windows.append([])
                held = 0
            windows[-1].append(g)
            held += int(sizes[g])
        delivered = 0
        for groups in windows:
            if not groups:
                continue
            local = np.concatenate(
                [np.flatnonzero(keep[starts[g] : ends[g]]) + starts[g] for g in groups]
            )
            order = rng.permutation(local)
            skip = min(len(order), max(0, start - delivered))
            delivered += len(order)
            run = order[skip:]
            if run.size == 0:
                continue
            # position of each ordinal in the window's table (its groups, concatenated)
            offset = np.zeros(len(sizes), dtype=np.int64)
            offset[groups] = np.cumsum([0] + [int(sizes[g]) for g in groups[:-1]])
            gid = np.searchsorted(ends, run, side="right")
            table = pf.read_row_groups(groups, columns=cols)
            yield self._rows(url, table, run, keys, sel=offset[gid] + run - starts[gid])


class ArrowSource(_ColumnarSource):
    """Stream rows of Arrow IPC shards (file or stream format, auto-detected).

    Record batches are read in order; local files are memory-mapped so pruned rows are
    never paged in. ``shuffle_rows`` permutes the rows within each record batch (batch
    order is kept: the stream format cannot seek). With ``key_column`` the keys are read
    in a first pass over the shard to check them for nulls and duplicates.

    Example::

        src = ArrowSource("/data/train-*.arrow", key_column="id")

    Args: as :class:`ParquetSource` (``batch_rows`` is unused: batches are as written).
    """

    @contextlib.contextmanager
    def _open(self, url: str) -> Iterator[Any]:
        with self._open_bytes(url, memory_map=True) as f:
            head = f.read(len(_ARROW_MAGIC))
            f.seek(0)
            try:
                if head == _ARROW_MAGIC:
                    # the schema is stored twice, at the start and in the footer: a flipped
                    # bit in either would rename or retype a column silently
                    header = _header_schema(f)
                    f.seek(0)
                    reader = pa.ipc.open_file(f)
                    if not header.equals(reader.schema):
                        raise ShardError(
                            f"shard {url!r}: the schema in its header and in its footer "
                            "differ; the file is corrupt, re-create it"
                        )
                    yield reader
                else:
                    yield pa.ipc.open_stream(f)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ShardError(
                    f"shard {url!r} is not a readable Arrow IPC file or stream ({exc}); "
                    "re-create it"
                ) from exc

    def _schema_of(self, handle: Any, url: str) -> pa.Schema:
        return handle.schema

    @staticmethod
    def _batches(reader: Any) -> Iterator[pa.RecordBatch]:
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from reader

    @classmethod
    def _batches_marked(cls, reader: Any) -> Iterator[tuple[pa.RecordBatch, bool]]:
        """``(batch, is_last)``: the stream format is read one batch ahead to know."""
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            n = reader.num_record_batches
            for i in range(n):
                yield reader.get_batch(i), i == n - 1
            return
        batches = cls._batches(reader)
        batch = next(batches, None)
        while batch is not None:
            after = next(batches, None)
            yield batch, after is None
            batch = after

    def count_samples(self, url: str) -> int | None:
        with self._open(url) as reader:
            if not isinstance(reader, pa.ipc.RecordBatchFileReader):
                return None
            return sum(b.num_rows for b in self._batches(reader))

    def iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[dict]]:
        keys = None
        drop = pruned
        if self.key_column is not None:
            with self._open(url) as reader:
                self._check_schema(url, reader.schema)
                parts = [b.column(self.key_column) for b in self._batches(reader)]
            col = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
            col.validate(full=True)  # IPC is not checked on read: corrupt offsets crash
            self.ctx.check_count(url, len(col), "rows")  # before any row is delivered
            keys, bad = self._bad_key_rows(url, col)
            drop = np.union1d(drop, bad)
        rng = np.random.default_rng(rng_seed) if self.shuffle_rows else None
        cols = self._read_columns()
        with self._open(url) as reader:
            self._check_schema(url, reader.schema)
            offset = 0
            skipped = 0
            counted = False
            for batch, last in self._batches_marked(reader):
                m = batch.num_rows
                ords = np.arange(offset, offset + m, dtype=np.int64)
                offset += m
                if last:  # the row count against the index, before the last batch is yielded
                    self.ctx.check_count(url, offset, "rows")
                    counted = True
                local = np.flatnonzero(~_sorted_member(drop, ords))
                if rng is not None:
                    local = rng.permutation(local)
                if skipped + local.size <= start:
                    skipped += local.size
                    continue
                local = local[max(0, start - skipped) :]
                skipped = start
                if cols is not None:
                    batch = batch.select(cols)
                # IPC buffers are not checked on read: corrupt offsets or lengths abort the
                # process in the conversion below. ArrowInvalid becomes a ShardError.
                batch.validate(full=True)
                if rng is None and local.size == m:
                    yield self._rows(url, batch, ords, keys)
                else:
                    yield self._rows(url, batch, ords[local], keys, sel=local)
            if not counted:  # a shard without record batches
                self.ctx.check_count(url, offset, "rows")
