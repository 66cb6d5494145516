"""Helpers shared by the tests of es_pipe.sources: write small, uneven shard sets."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from es_pipe.shard_writer import write_shards
from es_pipe.sources import ArrowSource, ParquetSource, WebDatasetSource

SIZES = [5, 9, 3, 12, 7, 1, 8]  # 45 samples in 7 uneven shards
FORMATS = ["tar", "parquet", "arrow"]


def base_url(tmp_path, fs: str) -> str:
    if fs == "memory":
        return f"memory://{uuid.uuid4().hex}"
    return str(tmp_path)


def make_shards(base: str, fmt: str, sizes=SIZES) -> list[str]:
    """Write one shard per size; sample ``j`` of shard ``i`` has key ``s{i}_{j}``."""
    urls = []
    for i, n in enumerate(sizes):
        keys = [f"s{i}_{j}" for j in range(n)]
        if fmt == "tar":
            samples = [{"__key__": k, "txt": k, "cls": j} for j, k in enumerate(keys)]
            urls += write_shards(samples, f"{base}/d{i}-%03d.tar", "tar", 10_000, index=False)
        else:
            table = pa.table({"id": keys, "x": np.arange(n, dtype=np.int64) + 100 * i})
            if fmt == "parquet":
                urls += write_shards(
                    table,
                    f"{base}/d{i}-%03d.parquet",
                    "parquet",
                    10_000,
                    row_group_rows=4,
                    index=False,
                )
            else:
                url = f"{base}/d{i}-000.arrow"
                import fsspec

                with fsspec.open(url, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                    for b in table.to_batches(max_chunksize=4):
                        w.write_batch(b)
                urls.append(url)
    return urls


def source(fmt: str, urls, **kw):
    cls = {"tar": WebDatasetSource, "parquet": ParquetSource, "arrow": ArrowSource}[
        fmt.removesuffix("-stream")
    ]
    return cls(urls, **kw)


def ident(sample) -> tuple[str, int]:
    return sample["__shard__"], sample["__index__"]


def all_idents(urls, sizes=SIZES) -> list[tuple[str, int]]:
    return sorted((u, j) for u, n in zip(urls, sizes, strict=True) for j in range(n))


def write_shard(fmt: str, path, keys: list[str]) -> str:
    """One real shard of the given keys, written by the format's own library:
    ``webdataset.TarWriter`` for ``tar``, pyarrow for ``parquet`` (row groups of 8),
    ``arrow`` (IPC file) and ``arrow-stream`` (IPC stream), record batches of 8."""
    path = str(path)
    if fmt == "tar":
        import webdataset as wds

        with wds.TarWriter(path) as w:
            for j, k in enumerate(keys):
                w.write({"__key__": k, "txt": k, "cls": str(j)})
        return path
    table = pa.table({"id": keys, "x": np.arange(len(keys), dtype=np.int64)})
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path, row_group_size=8)
        return path
    new = pa.ipc.new_file if fmt == "arrow" else pa.ipc.new_stream
    with pa.OSFile(path, "wb") as f, new(f, table.schema) as w:
        w.write_table(table, max_chunksize=8)
    return path


EXT = {"tar": "tar", "parquet": "parquet", "arrow": "arrow", "arrow-stream": "arrows"}


def real_shards(base, fmt: str, sizes) -> list[str]:
    """``write_shard`` once per size; sample ``j`` of shard ``i`` has key ``s{i}_{j}``."""
    return [
        write_shard(fmt, f"{base}/r{i}.{EXT[fmt]}", [f"s{i}_{j}" for j in range(n)])
        for i, n in enumerate(sizes)
    ]
