"""States written by es_pipe before the sources were split into modules (commit 9a1aa6c)
still load, and resume exactly where that code resumed.

The states and the keys after them were recorded by running 9a1aa6c's code on the same
shards (written by es_pipe's shard writer to fixed ``memory://`` URLs, so the shard
list's digest is the same on every run): one stream restored on its own topology, the
merged states of 2 streams restored on 3, and a stream restored in the middle of
``equalize="pad"``'s padding cycle.
"""

from __future__ import annotations

import pytest
from _sources_helpers import SIZES, make_shards, source

KW = {"tar": {}, "parquet": {"key_column": "id"}}
BASE = "memory://golden-states"

RECORDED = {
    "parquet-merged": {
        "rest": [
            [
                "s0_4",
                "s4_0",
                "s4_1",
                "s4_2",
                "s4_3",
                "s4_4",
                "s4_5",
                "s4_6",
                "s1_0",
                "s1_1",
                "s1_2",
                "s1_3",
                "s1_4",
                "s1_5",
                "s1_6",
                "s1_7",
                "s1_8",
            ],
            ["s6_7", "s5_0"],
            [
                "s3_0",
                "s3_1",
                "s3_2",
                "s3_3",
                "s3_4",
                "s3_5",
                "s3_6",
                "s3_7",
                "s3_8",
                "s3_9",
                "s3_10",
                "s3_11",
                "s2_0",
                "s2_1",
                "s2_2",
            ],
        ],
        "states": [
            {
                "cursors": {"memory://golden-states/d0-000.parquet": 4},
                "digest": "4ded0f16",
                "done": [],
                "epoch": 0,
                "n_shards": 7,
                "padded": 0,
                "seed": 3,
                "shuffle": True,
                "stream": [0, 2],
                "version": 1,
                "yielded": 4,
            },
            {
                "cursors": {"memory://golden-states/d6-000.parquet": 7},
                "digest": "4ded0f16",
                "done": [],
                "epoch": 0,
                "n_shards": 7,
                "padded": 0,
                "seed": 3,
                "shuffle": True,
                "stream": [1, 2],
                "version": 1,
                "yielded": 7,
            },
        ],
    },
    "parquet-pad": {
        "rest": [
            "s2_2",
            "s5_0",
            "s2_0",
            "s2_1",
            "s2_2",
            "s5_0",
            "s2_0",
            "s2_1",
            "s2_2",
            "s5_0",
            "s2_0",
        ],
        "state": {
            "cursors": {},
            "digest": "4ded0f16",
            "done": [[2, 3], [5, 6]],
            "epoch": 1,
            "n_shards": 7,
            "padded": 10,
            "seed": 0,
            "shuffle": False,
            "stream": [2, 3],
            "version": 1,
            "yielded": 14,
        },
    },
    "parquet-same": {
        "rest": ["s5_0", "s0_0", "s0_1", "s0_2", "s0_3", "s0_4"],
        "state": {
            "cursors": {"memory://golden-states/d2-000.parquet": 3},
            "digest": "4ded0f16",
            "done": [],
            "epoch": 2,
            "n_shards": 7,
            "padded": 0,
            "seed": 7,
            "shuffle": True,
            "stream": [1, 2],
            "version": 1,
            "yielded": 3,
        },
    },
    "tar-merged": {
        "rest": [
            [
                "s0_4",
                "s4_0",
                "s4_1",
                "s4_2",
                "s4_3",
                "s4_4",
                "s4_5",
                "s4_6",
                "s1_0",
                "s1_1",
                "s1_2",
                "s1_3",
                "s1_4",
                "s1_5",
                "s1_6",
                "s1_7",
                "s1_8",
            ],
            ["s6_7", "s5_0"],
            [
                "s3_0",
                "s3_1",
                "s3_2",
                "s3_3",
                "s3_4",
                "s3_5",
                "s3_6",
                "s3_7",
                "s3_8",
                "s3_9",
                "s3_10",
                "s3_11",
                "s2_0",
                "s2_1",
                "s2_2",
            ],
        ],
        "states": [
            {
                "cursors": {"memory://golden-states/d0-000.tar": 4},
                "digest": "a3354664",
                "done": [],
                "epoch": 0,
                "n_shards": 7,
                "padded": 0,
                "seed": 3,
                "shuffle": True,
                "stream": [0, 2],
                "version": 1,
                "yielded": 4,
            },
            {
                "cursors": {"memory://golden-states/d6-000.tar": 7},
                "digest": "a3354664",
                "done": [],
                "epoch": 0,
                "n_shards": 7,
                "padded": 0,
                "seed": 3,
                "shuffle": True,
                "stream": [1, 2],
                "version": 1,
                "yielded": 7,
            },
        ],
    },
    "tar-pad": {
        "rest": [
            "s2_2",
            "s5_0",
            "s2_0",
            "s2_1",
            "s2_2",
            "s5_0",
            "s2_0",
            "s2_1",
            "s2_2",
            "s5_0",
            "s2_0",
        ],
        "state": {
            "cursors": {},
            "digest": "a3354664",
            "done": [[2, 3], [5, 6]],
            "epoch": 1,
            "n_shards": 7,
            "padded": 10,
            "seed": 0,
            "shuffle": False,
            "stream": [2, 3],
            "version": 1,
            "yielded": 14,
        },
    },
    "tar-same": {
        "rest": ["s5_0", "s0_0", "s0_1", "s0_2", "s0_3", "s0_4"],
        "state": {
            "cursors": {"memory://golden-states/d2-000.tar": 3},
            "digest": "a3354664",
            "done": [],
            "epoch": 2,
            "n_shards": 7,
            "padded": 0,
            "seed": 7,
            "shuffle": True,
            "stream": [1, 2],
            "version": 1,
            "yielded": 3,
        },
    },
}


def _keys(src):
    return [s["__key__"] for s in src]


@pytest.fixture(scope="module", params=["tar", "parquet"])
def shards(request):
    return request.param, make_shards(BASE, request.param)


def test_a_stream_state_resumes_as_before(shards):
    fmt, urls = shards
    got = RECORDED[f"{fmt}-same"]
    src = source(fmt, urls, shuffle=True, seed=7, epoch=2, rank=1, world_size=2, **KW[fmt])
    src.reset(got["state"])
    assert _keys(src) == got["rest"]
    assert src.epoch == 2


def test_merged_states_resume_on_another_topology_as_before(shards):
    from es_pipe.sources import merge_states

    fmt, urls = shards
    got = RECORDED[f"{fmt}-merged"]
    merged = merge_states(got["states"])
    rests = []
    for r in range(3):
        src = source(fmt, urls, shuffle=True, seed=3, rank=r, world_size=3, **KW[fmt])
        src.reset(merged)
        rests.append(_keys(src))
    assert rests == got["rest"]
    delivered = sum(st["yielded"] for st in got["states"])
    assert delivered + sum(map(len, rests)) == sum(SIZES)  # every sample exactly once


def test_a_state_saved_while_padding_replays_the_cycle_as_before(shards):
    fmt, urls = shards
    got = RECORDED[f"{fmt}-pad"]
    assert got["state"]["padded"] == 10
    counts = dict(zip(urls, SIZES, strict=True))
    src = source(fmt, urls, rank=2, world_size=3, equalize="pad", num_samples=counts, **KW[fmt])
    src.reset(got["state"])
    assert _keys(src) == got["rest"]
    assert src.last_epoch_stats["padded"] == len(got["rest"])
