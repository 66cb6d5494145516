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
    cls = {"tar": WebDatasetSource, "parquet": ParquetSource, "arrow": ArrowSource}[fmt]
    return cls(urls, **kw)


def ident(sample) -> tuple[str, int]:
    return sample["__shard__"], sample["__index__"]


def all_idents(urls, sizes=SIZES) -> list[tuple[str, int]]:
    return sorted((u, j) for u, n in zip(urls, sizes, strict=True) for j in range(n))
