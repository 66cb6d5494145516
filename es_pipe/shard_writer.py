"""Write data into WebDataset (``.tar``) or Parquet shards of N samples.

Users need their data sharded before they can stream it. :func:`write_shards` takes a
``pyarrow.Table``, a dict of equal-length numpy arrays, or any iterable of sample dicts
(for instance :func:`samples_from_folder`), and writes shards named by a printf pattern
(``"out/train-%06d.tar"``) on any fsspec filesystem, plus an index file listing every shard
with its sample count (what :meth:`es_pipe.sources.ShardList.from_index` reads and what
``equalize=`` needs).

Tar members are written the webdataset way: ``KEY.EXTENSION``. Values become bytes as
follows: ``bytes`` as is, ``str`` as UTF-8, numbers as their decimal text, numpy arrays
as ``.npy`` bytes (``np.save`` with ``allow_pickle=False``). No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from webdataset.tariterators import base_plus_ext

from es_pipe import storage
from es_pipe.errors import ConfigError

__all__ = ["check_out_pattern", "samples_from_folder", "write_shards"]


def samples_from_folder(
    root: str,
    *,
    follow_symlinks: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> FolderSamples:
    """Samples from a folder of files: files sharing a key (the relative path up to the
    first dot of the file name) form one sample ``{"__key__": key, ext: bytes, ...}``.

    Files are listed recursively (any fsspec URL), up front, so a bad name is refused
    before any file is read and ``len()`` of the result is the number of samples (a
    progress bar's total); samples come in sorted key order, each file read when its
    sample is.
    Files without an extension are refused (they would have no field name).

    On a local disk, a symbolic link that leads out of ``root`` (to a file or a folder) is
    refused with a :class:`ConfigError` before anything is read, unless
    ``follow_symlinks=True``: then links are followed wherever they lead (folder links
    too, each real folder once). Links that stay inside ``root`` are always read.
    ``storage_options``: fsspec filesystem arguments for a remote ``root``.
    """
    fs, base = storage.url_to_fs(root, storage.check_options(storage_options))
    base = base.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        found = _local_files(base, root, follow_symlinks)
    else:  # object stores have no symbolic links
        found = fs.find(base)
    groups: dict[str, dict[str, str]] = {}
    for path in sorted(found):
        rel = path[len(base) + 1 :]
        key, ext = base_plus_ext(rel)
        if key is None:
            raise ConfigError(
                f"file {rel!r} in {root!r} has no KEY.EXTENSION name; rename or remove it"
            )
        if ext in groups.setdefault(key, {}):
            raise ConfigError(
                f"two files for key {key!r} and extension {ext!r} in {root!r}; rename or remove one"
            )
        groups[key][ext] = path
    return FolderSamples(fs, groups)


class FolderSamples(Iterator[dict[str, Any]]):
    """The samples of a listed folder (see :func:`samples_from_folder`): an iterator with
    a length."""

    def __init__(self, fs: Any, groups: Mapping[str, Mapping[str, str]]) -> None:
        self._fs, self._groups = fs, groups
        self._keys = iter(sorted(groups))

    def __len__(self) -> int:
        return len(self._groups)

    def __next__(self) -> dict[str, Any]:
        key = next(self._keys)
        sample: dict[str, Any] = {"__key__": key}
        for ext, path in sorted(self._groups[key].items()):
            with self._fs.open(path, "rb") as f:
                sample[ext] = f.read()
        return sample


def _local_files(base: str, root: str, follow_symlinks: bool) -> list[str]:
    """The files under a local folder, spelled under ``base``; links out of it refused
    unless ``follow_symlinks`` (each real folder is walked once: no link loops)."""
    real_base = os.path.realpath(base)
    seen_dirs: set[str] = set()
    files: list[str] = []

    def outside(path: str) -> bool:
        real = os.path.realpath(path)
        return real != real_base and not real.startswith(real_base.rstrip(os.sep) + os.sep)

    def refuse(path: str) -> None:
        rel = os.path.relpath(path, base)
        raise ConfigError(
            f"{_short(rel)} in {_short(root)} is a symbolic link to "
            f"{_short(os.path.realpath(path))}, outside the folder: links out of the source "
            "are not followed; remove the link, copy the file in, or pass "
            "follow_symlinks=True (es-pipe shard --follow-symlinks)"
        )

    def unreadable(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(
        base, onerror=unreadable, followlinks=follow_symlinks
    ):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real_dir)
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not follow_symlinks:
                if outside(path):
                    refuse(path)
                dirnames.remove(name)  # inside the folder: walked where it really is
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not follow_symlinks and os.path.islink(path) and outside(path):
                refuse(path)
            files.append(path)
    return files


def _short(text: str, limit: int = 120) -> str:
    """``repr(text)``, cut to ``limit`` characters: error messages never echo huge input."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


_PRINTF = re.compile(r"%([-+ #0-9.*]*[a-zA-Z%]?)")
_MAX_WIDTH = 20  # digits of the largest 64-bit shard number


def check_out_pattern(pattern: Any) -> str:
    """Check a shard URL pattern before formatting it: exactly one ``%d`` or ``%0Nd``
    field (``N <= 20``; ``%%`` is a literal ``%``). Raises :class:`ConfigError` otherwise,
    so that a pattern like ``%999999999d`` never builds a gigabyte-long name."""
    if not isinstance(pattern, str) or not pattern:
        got = _short(pattern) if isinstance(pattern, str) else type(pattern).__name__
        raise ConfigError(f"the shard URL pattern must be a non-empty string, got {got}")
    fields = [m.group(1) for m in _PRINTF.finditer(pattern) if m.group(1) != "%"]
    spec = re.fullmatch(r"(0[0-9]{1,3})?d", fields[0]) if len(fields) == 1 else None
    if spec is None or int(spec.group(1) or 0) > _MAX_WIDTH:
        found = ", ".join(_short("%" + f, 20) for f in fields[:5]) or "none"
        raise ConfigError(
            f"shard URL pattern {_short(pattern)} needs exactly one printf field, %d or "
            f"%0Nd with N <= {_MAX_WIDTH}, for the shard number (found: {found}); e.g. "
            "'out/train-%06d.tar'; write %% for a literal %"
        )
    return pattern


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, (bool, int, float, np.generic)):
        return str(value.item() if isinstance(value, np.generic) else value).encode()
    raise ConfigError(
        f"cannot write a {type(value).__name__} into a tar member: give bytes, str, a "
        "number or a numpy array"
    )


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"sample keys must be non-empty strings, got {key!r}")
    if "." in key.rsplit("/", 1)[-1]:
        raise ConfigError(f"key {key!r} contains a dot: webdataset keys end at the first dot")
    if key.startswith("/") or ".." in key.split("/"):
        raise ConfigError(f"key {key!r} is not a relative name")
    return key


def _table_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches():
        cols = [c.to_numpy(zero_copy_only=False) for c in batch.columns]
        for vals in zip(*cols, strict=True):
            yield dict(zip(batch.schema.names, vals, strict=True))


def _as_table(data: Any) -> pa.Table | None:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, Mapping):
        cols = {}
        for name, col in data.items():
            arr = np.asarray(col)
            cols[name] = list(arr) if arr.ndim > 1 else arr
        return pa.table(cols)
    return None


def _chunks(it: Iterable[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for sample in it:
        chunk.append(sample)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_write(url: str, options: Mapping[str, Any] | None) -> Any:
    fs, path = storage.url_to_fs(url, options)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    return fs.open(path, "wb")


def _write_tar(
    url: str, samples: list[dict[str, Any]], first: int, options: Mapping[str, Any] | None
) -> None:
    seen: set[str] = set()
    with _open_write(url, options) as f, tarfile.open(fileobj=f, mode="w|") as tf:
        for i, sample in enumerate(samples):
            key = _check_key(str(sample.get("__key__", f"{first + i:09d}")))
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice in shard {url!r}; give every sample its own "
                    "'__key__'"
                )
            seen.add(key)
            for field, value in sample.items():
                if field.startswith("__") and field.endswith("__"):
                    continue
                if not field or "/" in field or "\\" in field:
                    raise ConfigError(
                        f"sample {key!r}: field {field!r} cannot name a tar member "
                        "(KEY.FIELD); use a field name without slashes"
                    )
                data = _to_bytes(value)
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                info.mode = 0o444
                tf.addfile(info, io.BytesIO(data))


ROW_GROUP_ROWS = 1024
"""Rows per Parquet row group that :func:`write_shards` (and ``es-pipe shard``) write by
default: several groups per shard, so that a resume or a pruned run can skip whole groups
(``ParquetSource`` reads only groups that hold kept rows), at no measurable cost to a full
read (``benchmarks/bench_sources.py --pruned --row-group-pruned N``)."""


def _write_parquet(
    url: str, table: pa.Table, row_group_rows: int | None, options: Mapping[str, Any] | None
) -> None:
    with _open_write(url, options) as f:
        # page checksums: ParquetSource verifies them, so flipped bits are an error
        pq.write_table(
            table,
            f,
            row_group_size=row_group_rows or ROW_GROUP_ROWS,
            write_page_checksum=True,
        )


def _write_all(
    samples_or_table: Any,
    table: pa.Table | None,
    pattern: str,
    format: str,
    per_shard: int,
    row_group_rows: int | None,
    urls: list[str],
    options: Mapping[str, Any] | None,
) -> Iterator[int]:
    """Write the shards, appending each URL to ``urls`` before writing it; yields the
    shards' sample counts."""
    if format == "parquet":
        if table is None:
            chunks = (pa.Table.from_pylist(c) for c in _chunks(samples_or_table, per_shard))
        else:
            chunks = (
                table.slice(i, per_shard) for i in range(0, max(table.num_rows, 1), per_shard)
            )
        for chunk in chunks:
            urls.append(pattern % len(urls))
            _write_parquet(urls[-1], chunk, row_group_rows, options)
            yield chunk.num_rows
    else:
        samples = _table_rows(table) if table is not None else iter(samples_or_table)
        first = 0
        for chunk in _chunks(samples, per_shard):
            urls.append(pattern % len(urls))
            _write_tar(urls[-1], chunk, first, options)
            first += len(chunk)
            yield len(chunk)


def _remove(urls: list[str], options: Mapping[str, Any] | None) -> None:
    for url in urls:
        fs, path = storage.url_to_fs(url, options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)


def write_shards(
    samples_or_table: Any,
    out_url_pattern: str,
    format: Literal["tar", "parquet"] = "tar",
    samples_per_shard: int = 10_000,
    *,
    row_group_rows: int | None = None,
    index: str | bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``samples_or_table`` into shards of ``samples_per_shard`` samples.

    Args:
        samples_or_table: a ``pyarrow.Table``/``RecordBatch``, a dict of equal-length numpy
            arrays (a 2-D array becomes a list column), or an iterable of sample dicts. A
            sample's ``"__key__"`` names it (default: its global position, 9 digits);
            other ``__*__`` fields are not written.
        out_url_pattern: shard URL with one printf integer field, ``%d`` or ``%0Nd``
            (``N <= 20``), e.g. ``"s3://b/train-%06d.parquet"`` (see
            :func:`check_out_pattern`).
        format: ``"tar"`` (WebDataset) or ``"parquet"``.
        row_group_rows: Parquet row-group size; default :data:`ROW_GROUP_ROWS` (1024).
            A row group whose rows are all pruned, or all delivered before a resume, is
            never read, so smaller groups let pruning and resumes skip more bytes
            (pyarrow's own default, about a million rows, makes one group of a shard).
        index: where to write the index file (``url count`` per line); ``True`` puts
            ``index.txt`` next to the shards, ``False`` writes none.
        storage_options: fsspec filesystem arguments for the output's storage (for S3:
            ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``).
            Missing credentials, access denied or a bucket that does not exist raise
            :class:`~es_pipe.StorageError` naming the fix.

    Returns:
        The URLs written, in order.

    If writing fails (a bad key, a value that is not bytes, a full disk), every shard this
    call wrote is removed before the error propagates: no partial shard set is left behind.
    """
    if format not in ("tar", "parquet"):
        raise ConfigError(f"format must be 'tar' or 'parquet', got {format!r}")
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    check_out_pattern(out_url_pattern)
    options = storage.check_options(storage_options)
    table = _as_table(samples_or_table)
    urls: list[str] = []
    try:
        counts = list(
            _write_all(
                samples_or_table,
                table,
                out_url_pattern,
                format,
                samples_per_shard,
                row_group_rows,
                urls,
                options,
            )
        )
    except BaseException as exc:
        found = storage.storage_error(exc, urls[-1] if urls else out_url_pattern)
        if found is not None:  # nothing was written where nothing can be reached
            with contextlib.suppress(Exception):
                _remove(urls, options)
            raise found from exc
        _remove(urls, options)  # nothing half-written stays: not this shard, not earlier ones
        raise
    if index:
        index_url = (
            index if isinstance(index, str) else out_url_pattern.rsplit("/", 1)[0] + "/index.txt"
        )
        if "/" not in out_url_pattern and index is True:
            index_url = "index.txt"
        base = index_url.rsplit("/", 1)[0] if "/" in index_url else ""
        lines = []
        for url, n in zip(urls, counts, strict=True):
            name = url[len(base) + 1 :] if base and url.startswith(base + "/") else url
            lines.append(f"{name} {n}\n")
        with storage.named_errors(index_url), _open_write(index_url, options) as f:
            f.write("".join(lines).encode("utf-8"))
    storage.remember(urls, options)
    return urls
