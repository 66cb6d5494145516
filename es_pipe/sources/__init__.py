"""Sharded streaming sources: WebDataset tars, Parquet and Arrow IPC shards over fsspec.

Every source is a ``torchdata.nodes.BaseNode`` yielding one dict per sample with its
payload and three identity fields: ``__key__`` (str), ``__shard__`` (the shard URL as
listed) and ``__index__`` (the sample's ordinal in its shard).
"""

from es_pipe.sources.arrow import ArrowSource, ParquetSource
from es_pipe.sources.base import ShardedSource
from es_pipe.sources.dataset import SourceDataset
from es_pipe.sources.plan import merge_states
from es_pipe.sources.shards import ShardList, epoch_order, fingerprint
from es_pipe.sources.webdataset import WebDatasetSource

__all__ = [
    "ArrowSource",
    "ParquetSource",
    "ShardList",
    "ShardedSource",
    "SourceDataset",
    "WebDatasetSource",
    "epoch_order",
    "fingerprint",
    "merge_states",
]
