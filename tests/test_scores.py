"""The per-shard score store: addressing, growth, compaction, checkpoint."""

import io

import numpy as np
import pytest
import torch

from es_pipe.errors import ConfigError
from es_pipe.scores import BYTES_PER_SAMPLE, ScoreStore


def test_locate_gathers_and_scatters_across_shards():
    store = ScoreStore()
    shards = ["a", "b", "a", "c", "b"]
    slots = store.locate(shards, ordinals=[0, 0, 3, 1, 2])
    assert len(set(slots.tolist())) == 5
    store.scatter(slots, np.arange(5, dtype=np.float32), np.ones(5, np.float32), step=7)
    again = store.locate(["b", "a"], ordinals=[2, 3])
    got = store.gather(again)
    assert got["score"].tolist() == [4.0, 2.0]
    assert got["visits"].tolist() == [1, 1]
    assert got["step"].tolist() == [7, 7]
    assert store.shard("a")["score"].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert store.held == 4 + 3 + 2


def test_blocks_grow_and_move_without_losing_values():
    store = ScoreStore()
    first = store.locate(["a"] * 3, ordinals=[0, 1, 2])
    store.scatter(first, np.array([1, 2, 3], np.float32), np.zeros(3, np.float32), 0)
    store.locate(["b"], ordinals=[0])  # "a" is no longer last in the arena
    grown = store.locate(["a"], ordinals=[100])  # forces "a" to move
    assert store.shard("a")["score"][:3].tolist() == [1, 2, 3]
    assert store.gather(grown)["visits"].tolist() == [0]
    assert len(store.shard("a")["score"]) == 101


def test_samples_without_ordinals_get_one_by_key():
    store = ScoreStore()
    s1 = store.locate(["x", "x", ""], keys=["k1", "k2", "k1"])
    s2 = store.locate(["x", ""], keys=["k2", "k1"])
    assert s1[1] == s2[0] and s1[2] == s2[1]
    assert store.keys_of("x") == ["k1", "k2"]


def test_negative_ordinals_are_refused():
    with pytest.raises(ConfigError, match=">= 0"):
        ScoreStore().locate(["a"], ordinals=[-1])


def test_drop_compacts_and_keeps_the_rest():
    store = ScoreStore()
    for i, shard in enumerate("abcd"):
        slots = store.locate([shard] * 10, ordinals=range(10))
        store.scatter(slots, np.full(10, i, np.float32), np.zeros(10, np.float32), i)
    for shard in "abc":
        store.drop(shard)
    assert store.shards == ["d"]
    assert store.shard("d")["score"].tolist() == [3.0] * 10
    assert store.nbytes <= 2 * 16 * BYTES_PER_SAMPLE


def test_state_dict_round_trips_through_weights_only_torch_load():
    store = ScoreStore()
    slots = store.locate(["a", "b", "b"], ordinals=[2, 0, 1])
    store.scatter(slots, np.array([0.5, 1.5, 2.5], np.float32), np.ones(3, np.float32), 3)
    store.locate(["k"], keys=["only-key"])
    buffer = io.BytesIO()
    torch.save(store.state_dict(), buffer)
    buffer.seek(0)
    restored = ScoreStore()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for shard in ("a", "b", "k"):
        for column, values in store.shard(shard).items():
            np.testing.assert_array_equal(restored.shard(shard)[column], values)
    assert restored.keys_of("k") == ["only-key"]


def test_sixteen_bytes_per_sample_when_shards_are_reserved():
    store = ScoreStore()
    for i in range(8):
        store.reserve(f"s{i}", 1000)
        store.locate([f"s{i}"] * 1000, ordinals=np.arange(1000))
    assert BYTES_PER_SAMPLE == 16
    assert store.nbytes / store.held <= 2 * BYTES_PER_SAMPLE  # arena doubling at most


def test_many_shards_random_operations_match_a_plain_dict_model():
    """Locate over thousands of shard ids (array lookups), with drops, compactions,
    re-added shards and ordinal-less shards: every sample keeps its own values."""
    rng = np.random.default_rng(0)
    store = ScoreStore()
    model: dict[tuple[str, int], float] = {}  # (shard, ordinal) -> last score written
    names = [f"s3://b/shard-{i:05d}.tar" for i in range(3000)]
    for step in range(40):
        shard_ix = rng.integers(0, min(3000, 1500 + 40 * step), 512)
        shards = [names[i] for i in shard_ix]
        ordinals = rng.integers(0, 5 + step * 3, 512)
        slots = store.locate(shards, ordinals=ordinals)
        before = store.gather(slots)["score"]
        expected = [model.get((s, int(o)), 0.0) for s, o in zip(shards, ordinals)]
        assert before.tolist() == expected
        scores = rng.random(512).astype(np.float32)
        # one value per sample (duplicates in a batch take the last write, like the store)
        store.scatter(slots, scores, scores, step)
        written = store.gather(slots)["score"]
        for s, o, v in zip(shards, ordinals.tolist(), written.tolist()):
            model[(s, o)] = v
        if step % 7 == 6:
            for name in {names[i] for i in rng.integers(0, 3000, 200)}:
                store.drop(name)
                model = {k: v for k, v in model.items() if k[0] != name}
        if step % 11 == 10:
            store.compact()
    for name in store.shards[:50]:
        view = store.shard(name)["score"]
        for o in range(len(view)):
            assert view[o] == model.get((name, o), 0.0)
    assert store.held == sum(len(store.shard(n)["score"]) for n in store.shards)
    assert store.nbytes >= store.held * BYTES_PER_SAMPLE
