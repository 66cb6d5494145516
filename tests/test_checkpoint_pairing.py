"""A checkpoint is one thing: the loader's position and the sampler's scores belong together.

Restoring one half without the other, or halves saved at different steps, is refused with
an error naming the fix; states written before the halves named their step still load.
The ESWP commit marker records the pruning rule the run used.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torchdata.nodes as tn

import es_pipe
from es_pipe.errors import ConfigError
from es_pipe.sources import ParquetSource


def losses_of(meta, step):
    return (meta.data["x"].abs().sum(1) * (1.0 + 0.1 * step)) % 3.0


def build(samples):
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 3, seed=5)
    return sampler, tn.Loader(es_pipe.SelectStage(samples, sampler))


def train(sampler, loader, steps, saves=()):
    """Train ``steps`` steps of one epoch; return {step: (loader state, sampler state)}."""
    saved, it = {}, iter(loader)
    for _ in range(steps):
        meta = next(it)
        meta.select(losses_of(meta, sampler.step))
        if sampler.step in saves:
            saved[sampler.step] = (loader.state_dict(), sampler.state_dict())
    return saved, it


def picks(sampler, it, steps):
    out = []
    for _ in range(steps):
        meta = next(it)
        out.append(meta.select(losses_of(meta, sampler.step)).keys)
    return out


def test_the_pair_restores_exactly(samples):
    sampler, loader = build(samples)
    saved, it = train(sampler, loader, 3, saves={3})
    expected = picks(sampler, it, 2)
    position, scores = saved[3]
    fresh, loader2 = build(samples)
    fresh.load_state_dict(scores)
    loader2.load_state_dict(position)
    assert picks(fresh, iter(loader2), 2) == expected


def test_a_loader_restored_without_its_scores_is_refused(samples):
    sampler, loader = build(samples)
    saved, _ = train(sampler, loader, 3, saves={3})
    fresh, loader2 = build(samples)
    loader2.load_state_dict(saved[3][0])  # the scores are forgotten
    it = iter(loader2)
    meta = next(it)
    with pytest.raises(ConfigError, match=r"score table was not.*sampler\.state_dict"):
        meta.select(losses_of(meta, fresh.step))
    assert fresh.store.held == 0  # nothing was scored from the empty table


@pytest.mark.parametrize("scores_first", [True, False])
def test_halves_of_two_steps_are_refused(samples, scores_first):
    sampler, loader = build(samples)
    saved, _ = train(sampler, loader, 5, saves={3, 5})
    fresh, loader2 = build(samples)
    if scores_first:
        fresh.load_state_dict(saved[5][1])
        loader2.load_state_dict(saved[3][0])
        with pytest.raises(ConfigError, match="from step 5 but the loader position is from step 3"):
            iter(loader2)
    else:
        loader2.load_state_dict(saved[3][0])
        it = iter(loader2)  # the position is restored when the loader starts
        with pytest.raises(ConfigError, match="from step 5 but the loader position is from step 3"):
            fresh.load_state_dict(saved[5][1])
        assert fresh.store.held == 0  # the refused table changed nothing
        fresh.load_state_dict(saved[3][1])  # the right half still restores
        meta = next(it)
        assert len(meta.select(losses_of(meta, fresh.step))) == 3


def test_states_from_before_the_step_was_recorded_still_load(samples):
    """3d23362 wrote neither ``kind``/``version`` nor the scores' ``step``."""
    sampler, loader = build(samples)
    saved, it = train(sampler, loader, 3, saves={3})
    expected = picks(sampler, it, 2)
    position, scores = saved[3]
    old_scores = {k: v for k, v in scores.items() if k not in ("kind", "version", "step")}
    fresh, loader2 = build(samples)
    fresh.load_state_dict(old_scores)
    loader2.load_state_dict(position)
    assert picks(fresh, iter(loader2), 2) == expected


def test_merged_score_tables_of_two_steps_are_refused(samples):
    sampler, loader = build(samples)
    saved, _ = train(sampler, loader, 5, saves={3, 5})
    with pytest.raises(ConfigError, match="different steps"):
        es_pipe.merge_scores([saved[3][1], saved[5][1]])


def test_the_commit_marker_records_the_pruning_rule(tmp_path):
    rows = 48
    x = np.random.default_rng(0).normal(size=(rows, 4)).astype(np.float32)
    path = tmp_path / "d-000.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(rows)], "x": list(x)}), path)
    prune = es_pipe.Pruning(ratio=0.5, anneal=0.25)
    eswp = es_pipe.ESWP(prune=prune, manifests=str(tmp_path / "m"))
    sampler = es_pipe.Selector(es_pipe.Evolved(), 16, 8, seed=1, total_epochs=4, eswp=eswp)
    source = ParquetSource([str(path)], key_column="key", pruned=sampler.pruned)
    loader = tn.Loader(es_pipe.SelectStage(source, sampler))
    for meta in loader:
        meta.select(meta.data["x"].abs().sum(1))
    manifests = es_pipe.Manifests(str(tmp_path / "m"))
    hyper = manifests.marker(0)["hyper"]
    assert hyper["prune"] == prune.describe()
    assert hyper["prune"] is not None
    assert (hyper["meta_batch_size"], hyper["batch_size"]) == (16, 8)
