"""Column chunks: many samples of one shard as arrays, the unit of the columnar path.

A Parquet or Arrow source built with ``columnar=True`` yields :class:`ColumnChunk` items
(the rows of one record batch, pruned rows already left out) instead of one dict per row;
a WebDataset tar source one per chunk of its tar reader (the samples' raw bytes as one list
per extension: ``es_pipe.sources.webdataset.tar_blocks``).
The stage buffers chunks, not dicts: a meta-batch is the chunks' slices concatenated
column by column and turned into tensors (:func:`collate_columns`), with an identity made
of arrays (the shard once per chunk, the ordinals, the keys where the shard has a key
column). No per-sample Python on the way: that is the point of the path.

Payload columns per Arrow type, as ``default_collate`` would batch the per-row values of
the dict path (the tests pin both paths to the same meta-batches):

* integer, float and bool columns without nulls: a 1-D numpy array (a tensor once
  collated);
* list columns of numbers without nulls whose rows all have one length (token windows,
  embeddings): a 2-D numpy array;
* anything else (strings, binary, nulls, ragged lists): a Python list of the row values,
  collated as ``default_collate`` collates them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import default_collate

_KEY_CACHE_ROWS = 1 << 16
_key_cache: np.ndarray | None = None


def row_keys(ordinals: np.ndarray) -> np.ndarray:
    """Row numbers as decimal strings (an object array): one numpy ``take`` from a shared
    cache of the first 65536, ``astype(str)`` beyond."""
    global _key_cache
    if ordinals.size == 0 or int(ordinals.max()) >= _KEY_CACHE_ROWS:
        return ordinals.astype(str).astype(object)
    if _key_cache is None:
        _key_cache = np.array([str(i) for i in range(_KEY_CACHE_ROWS)], dtype=object)
    return _key_cache[ordinals]


class RowKeys(Sequence[str]):
    """The keys of rows whose key is their row number, made only when read: the sampler
    needs their count, manifests their text (``pyarrow.array(keys)``, through
    ``__arrow_array__``), a user ``meta.keys``; a meta-batch that nobody reads the keys of
    never makes them."""

    __slots__ = ("_made", "ordinals")

    def __init__(self, ordinals: np.ndarray) -> None:
        self.ordinals = ordinals
        self._made: np.ndarray | None = None

    def array(self) -> np.ndarray:
        """The keys as an object array of str."""
        if self._made is None:
            self._made = row_keys(self.ordinals)
        return self._made

    def __len__(self) -> int:
        return len(self.ordinals)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, (int, np.integer)):
            return str(int(self.ordinals[i]))
        return RowKeys(self.ordinals[i])

    def __iter__(self) -> Any:
        return iter(self.array().tolist())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.array() if dtype in (None, object) else self.array().astype(dtype)

    def __arrow_array__(self, type: Any = None) -> pa.Array:
        return pa.array(self.array(), type if type is not None else pa.string())

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def column_values(arr: pa.Array | pa.ChunkedArray, sel: np.ndarray | None) -> Any:
    """One column of a record batch, rows ``sel`` (all if None), as an array (see the
    module docstring) or, for other types, a list of the row values."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if arr.null_count == 0 and _is_numeric(t):
        out = arr.to_numpy(zero_copy_only=False)
        return out if sel is None else out[sel]
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if arr.null_count == 0 and is_list and _is_numeric(t.value_type) and len(arr):
        if pa.types.is_fixed_size_list(t):
            width = t.list_size
            flat = arr.flatten()
        else:
            offsets = arr.offsets.to_numpy()
            lengths = np.diff(offsets)
            width = int(lengths[0])
            flat = arr.flatten() if (lengths == width).all() else None
        if flat is not None and flat.null_count == 0:
            out = flat.to_numpy(zero_copy_only=False).reshape(len(arr), width)
            return out if sel is None else out[sel]
    if sel is not None:
        arr = arr.take(pa.array(sel))
    if arr.null_count == 0 and is_list and _is_numeric(t.value_type):  # ragged: per row
        return list(arr.to_numpy(zero_copy_only=False))
    return arr.to_pylist()


def _take_list(values: list[Any], picked: np.ndarray) -> list[Any]:
    """Rows ``picked`` of a list column in one C-level ``itemgetter`` call."""
    rows = picked.tolist()
    if len(rows) == 1:
        return [values[rows[0]]]
    return list(itemgetter(*rows)(values)) if rows else []


def _rows(value: Any, start: int, stop: int) -> Any:
    return value[start:stop]


@dataclass(frozen=True)
class ColumnChunk:
    """Rows of one shard: payload ``columns`` (name -> array or list, one entry per row)
    and their identity, the ``shard`` URL, the ``ordinals`` (int64) and the ``keys``
    (object array of str) where the shard has a key column, else ``None`` (the key is then
    the row number, made on demand by :meth:`key_array`). ``identity_first``: the dict
    path's sample dicts put the identity fields before the payload (tar samples) rather
    than after it (Parquet and Arrow rows); the meta-batch keeps that field order.

    Tar chunks (``WebDatasetSource(columnar=True)``) hold one list of payload values per
    member extension, the raw bytes of every sample, with every sample of the chunk
    having the same extensions in the same order."""

    shard: str
    ordinals: np.ndarray
    columns: dict[str, Any]
    keys: np.ndarray | None = None
    identity_first: bool = False

    def __len__(self) -> int:
        return len(self.ordinals)

    def slice(self, start: int, stop: int) -> ColumnChunk:
        """Rows ``[start, stop)``: views, no copy."""
        return ColumnChunk(
            self.shard,
            self.ordinals[start:stop],
            {name: _rows(v, start, stop) for name, v in self.columns.items()},
            None if self.keys is None else self.keys[start:stop],
            self.identity_first,
        )

    def filter(self, keep: np.ndarray) -> ColumnChunk:
        """The rows where the boolean mask ``keep`` is true (one array op per column)."""
        picked = np.flatnonzero(keep)
        return ColumnChunk(
            self.shard,
            self.ordinals[picked],
            {
                name: v[picked] if isinstance(v, np.ndarray) else _take_list(v, picked)
                for name, v in self.columns.items()
            },
            None if self.keys is None else self.keys[picked],
            self.identity_first,
        )

    def key_array(self) -> np.ndarray:
        """The keys as an object array of str (the row numbers where no key column)."""
        return self.keys if self.keys is not None else row_keys(self.ordinals)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One sample dict per row, as the dict path yields them (for a custom
        ``collate_fn``, which takes sample dicts)."""
        names = list(self.columns)
        cols = [self.columns[name] for name in names]
        keys = self.key_array().tolist()
        ords = self.ordinals.tolist()
        if self.identity_first:
            fields = ("__key__", "__shard__", "__index__", *names)
            return [
                dict(zip(fields, (k, self.shard, o, *row), strict=True))
                for k, o, *row in zip(keys, ords, *cols, strict=True)
            ]
        fields = (*names, "__key__", "__shard__", "__index__")
        return [
            dict(zip(fields, (*row, k, self.shard, o), strict=True))
            for *row, k, o in zip(*cols, keys, ords, strict=True)
        ]


def _concat(values: Sequence[Any]) -> Any:
    if all(isinstance(v, np.ndarray) for v in values):
        return values[0] if len(values) == 1 else np.concatenate(values)
    return [row for v in values for row in v]


def collate_columns(parts: Sequence[ColumnChunk]) -> dict[str, Any]:
    """The meta-batch of chunk slices ``parts``: each array column concatenated once and
    turned into a tensor (``torch.from_numpy``, as ``default_collate`` types them); other
    columns collated by ``default_collate`` from their row values."""
    if not parts:
        return {}
    out: dict[str, Any] = {}
    for name in parts[0].columns:
        joined = _concat([part.columns[name] for part in parts])
        if isinstance(joined, np.ndarray) and joined.dtype != object:
            if not joined.flags.writeable or not joined.flags.c_contiguous:
                joined = np.ascontiguousarray(joined).copy()
            out[name] = torch.from_numpy(joined)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                out[name] = default_collate(list(joined))
    return out
