"""Merging checkpoints across topologies, and the refusals around it (in one process; the
multi-process runs are in test_distributed.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torchdata.nodes as tn
from conftest import keyed_samples

import es_pipe
from es_pipe import ConfigError, ManifestError, Manifests


def rank_checkpoint(rank: int, world: int, steps: int) -> dict:
    """A checkpoint of ``rank`` after ``steps`` meta-batches of its own shard."""
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=3, rank=rank, world_size=world)
    samples = keyed_samples(64, shard=f"shard-{rank}")
    loader = tn.Loader(es_pipe.SelectStage(samples, sampler, loss_fn=lambda d: d["x"].norm(dim=1)))
    it = iter(loader)
    for _ in range(steps):
        next(it)
    return {"loader": loader.state_dict(), "scores": sampler.state_dict()}


def test_merge_scores_is_the_union_of_the_ranks_tables():
    old = [rank_checkpoint(r, 2, 3) for r in range(2)]
    merged = es_pipe.merge_scores([c["scores"] for c in old])
    store = es_pipe.ScoreStore()
    store.load_state_dict(merged["scores"])
    assert sorted(store.shards) == ["shard-0", "shard-1"]
    for rank, checkpoint in enumerate(old):
        alone = es_pipe.ScoreStore()
        alone.load_state_dict(checkpoint["scores"]["scores"])
        for column, values in alone.shard(f"shard-{rank}").items():
            assert np.array_equal(store.shard(f"shard-{rank}")[column], values)


def test_merged_sampler_state_is_marked_and_loads_on_another_world_size():
    old = [rank_checkpoint(r, 2, 3) for r in range(2)]
    merged = es_pipe.merge_checkpoints([c["loader"] for c in old])
    sampler_state = merged["root"]["sampler"]
    assert sampler_state["merged"] is True and sampler_state["step"] == 3
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=3, rank=0, world_size=4)
    sampler.load_state(sampler_state)
    assert sampler.step == 3


def test_one_ranks_checkpoint_on_another_world_size_is_refused():
    state = rank_checkpoint(0, 2, 2)["loader"]["root"]["sampler"]
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=3, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="merge_checkpoints"):
        sampler.load_state(state)
    assert sampler.step == 0


def test_checkpoints_from_different_steps_are_refused():
    old = [rank_checkpoint(0, 2, 2), rank_checkpoint(1, 2, 3)]
    with pytest.raises(ConfigError, match="same step"):
        es_pipe.merge_checkpoints([c["loader"] for c in old])


def test_a_missing_rank_is_refused():
    old = [rank_checkpoint(0, 3, 2), rank_checkpoint(1, 3, 2)]
    with pytest.raises(ConfigError, match="every old rank"):
        es_pipe.merge_checkpoints([c["loader"] for c in old])


def test_the_same_shard_in_two_checkpoints_is_refused():
    one = rank_checkpoint(0, 2, 2)
    with pytest.raises(ConfigError, match=r"shard-0.*held by checkpoints 0 and 1"):
        es_pipe.merge_scores([one["scores"], one["scores"]])


def test_nothing_to_merge_is_refused():
    with pytest.raises(ConfigError, match="got none"):
        es_pipe.merge_checkpoints([])
    with pytest.raises(ConfigError, match="got none"):
        es_pipe.merge_scores([])


def test_prune_on_several_ranks_needs_manifests():
    with pytest.raises(ConfigError, match="needs manifests="):
        es_pipe.Selector(
            es_pipe.Evolved(),
            8,
            4,
            rank=0,
            world_size=2,
            eswp=es_pipe.ESWP(prune=es_pipe.Pruning(anneal=0)),
        )


def test_waiting_for_a_commit_names_the_ranks_that_did_not_finish(tmp_path):
    rank1 = Manifests(str(tmp_path), rank=1)
    rank1.write_shard(0, "a.tar", _columns(5))
    rank1.finish(0)
    start = time.monotonic()
    with pytest.raises(ManifestError, match=r"ranks \[0, 2\] have not written"):
        rank1.wait_committed(0, ranks=3, timeout=0.5)
    assert time.monotonic() - start < 5


def test_a_fallback_copy_yields_to_the_readers_file(tmp_path):
    reader, owner = Manifests(str(tmp_path), rank=0), Manifests(str(tmp_path), rank=1)
    reader.write_shard(0, "a.tar", _columns(5, score=2.0))
    owner.write_shard(0, "a.tar", _columns(5, score=1.0), fallback=True)
    owner.write_shard(0, "b.tar", _columns(3, score=1.0), fallback=True)
    owner.finish(0)
    reader.finish(0)
    reader.commit(0, expected_ranks=2, timeout=5)
    table = Manifests(str(tmp_path)).read_epoch(0).to_pydict()
    scores = dict(zip([str(s) for s in table["shard"]], table["score"]))
    assert scores == {"a.tar": 2.0, "b.tar": 1.0}


def _columns(n: int, score: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "score": np.full(n, score, np.float32),
        "loss": np.ones(n, np.float32),
        "visits": np.ones(n, np.uint32),
        "step": np.zeros(n, np.int32),
        "state": np.zeros(n, np.uint8),
    }


def test_ranks_draw_from_their_own_streams():
    draws = []
    for rank in range(2):
        sampler = es_pipe.Selector(es_pipe.Evolved(), 64, 8, seed=0, rank=rank, world_size=2)
        who = es_pipe.sampler.Identity.of(["s"] * 64, [f"k{i}" for i in range(64)], list(range(64)))
        draws.append(sampler.select(who, torch.ones(64), 64).indices.tolist())
    assert draws[0] != draws[1]
