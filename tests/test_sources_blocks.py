"""Readers whose chunk items are blocks of samples (columns of several rows) deliver
through ``ShardedSource.take_block``: a block is counted as its samples and cut where
``equalize`` ends the stream, so the states and counts are those of sample-by-sample
delivery. Checked on WebDataset shards written by webdataset's own ``TarWriter``."""

from __future__ import annotations

from typing import Any

from _sources_helpers import SIZES, write_shard

from es_pipe.sources import WebDatasetSource


class Block:
    """A few samples handed out together (what a columnar chunk is to the node)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def slice(self, start: int, stop: int) -> Block:
        return Block(self.samples[start:stop])


class BlockSource(WebDatasetSource):
    """The tar reader, its samples grouped into blocks of up to 3."""

    def iter_shard(self, url, start, pruned, rng_seed):
        for chunk in super().iter_shard(url, start, pruned, rng_seed):
            yield [Block(chunk[i : i + 3]) for i in range(0, len(chunk), 3)]

    def _from_chunk(self) -> Any:
        return self.take_block()


def _shards(tmp_path) -> list[str]:
    return [
        write_shard("tar", tmp_path / f"b{i}.tar", [f"s{i}_{j}" for j in range(n)])
        for i, n in enumerate(SIZES)
    ]


def _keys(items) -> list[str]:
    return [s["__key__"] for item in items for s in item.samples]


def test_blocks_carry_the_same_samples_states_and_counts(tmp_path):
    urls = _shards(tmp_path)
    plain = WebDatasetSource(urls, rank=1, world_size=2)
    blocks = BlockSource(urls, rank=1, world_size=2)
    head = [next(blocks) for _ in range(2)]  # 6 samples
    want = [next(plain)["__key__"] for _ in range(6)]
    assert _keys(head) == want and all(isinstance(b, Block) for b in head)
    state = blocks.state_dict()
    assert state == plain.state_dict() and blocks.stats["samples"] == 6
    resumed = BlockSource(urls, rank=1, world_size=2)
    resumed.reset(state)
    assert _keys(resumed) == [s["__key__"] for s in plain]


def test_a_block_is_cut_where_equalize_drop_ends_the_stream(tmp_path):
    urls = _shards(tmp_path)
    counts = dict(zip(urls, SIZES, strict=True))
    limit = min(sum(SIZES[i::3]) for i in range(3))  # streams 0..2 of 3 read shards i, i+3, i+6
    for rank in range(3):
        src = BlockSource(urls, rank=rank, world_size=3, equalize="drop", num_samples=counts)
        plain = WebDatasetSource(urls, rank=rank, world_size=3, equalize="drop", num_samples=counts)
        got = list(src)
        assert sum(map(len, got)) == limit == src.last_epoch_stats["samples"]
        assert _keys(got) == [s["__key__"] for s in plain]
