"""ESWP / InfoBatch pruning rule: fraction, distribution, schedule, dead-lock bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import es_pipe
from es_pipe import pruning
from es_pipe.errors import ConfigError
from es_pipe.pruning import Pruning, decide, shard_seed


def _rng(epoch=1, shard="s"):
    return shard_seed(0, epoch, shard)


def test_prunes_intended_fraction_below_mean_uniformly():
    gen = np.random.default_rng(1)
    scores = gen.exponential(1.0, 20000).astype(np.float32)
    visits = np.ones_like(scores, dtype=np.uint32)
    rule = Pruning(ratio=0.3, anneal=0)
    d = decide(rule, scores, visits, None, _rng())
    below = scores < scores.mean()
    assert d.candidates == below.sum()
    assert len(d.pruned) == round(0.3 * below.sum())
    assert np.all(np.diff(d.pruned) > 0) and d.pruned.dtype == np.int64
    assert np.all(below[d.pruned])  # only below-mean samples
    # uniform among candidates: the pruned share is ~0.3 in every score quartile of them
    cand = np.flatnonzero(below)
    edges = np.quantile(scores[cand], [0, 0.25, 0.5, 0.75, 1.0])
    mask = np.zeros(len(scores), bool)
    mask[d.pruned] = True
    for lo, hi in itertools.pairwise(edges):
        inside = cand[(scores[cand] >= lo) & (scores[cand] <= hi)]
        assert abs(mask[inside].mean() - 0.3) < 0.03
    # 1/keep rescale: kept candidates stand for all candidates
    kept = cand[~mask[cand]]
    w = d.weights(np.arange(len(scores)))
    assert np.allclose(w[kept], d.factor) and np.all(w[~below] == 1) and np.all(w[d.pruned] == 1)
    assert w[kept].sum() == pytest.approx(len(cand), rel=1e-5)


def test_same_decision_on_every_rank_and_different_per_shard():
    scores = np.random.default_rng(2).random(1000).astype(np.float32)
    visits = np.ones(1000, np.uint32)
    rule = Pruning(anneal=0)
    a = decide(rule, scores, visits, None, shard_seed(7, 3, "s3://b/train-001.tar"))
    b = decide(rule, scores, visits, None, shard_seed(7, 3, "s3://b/train-001.tar"))
    c = decide(rule, scores, visits, None, shard_seed(7, 3, "s3://b/train-002.tar"))
    assert np.array_equal(a.pruned, b.pruned) and not np.array_equal(a.pruned, c.pruned)


def test_unseen_samples_are_never_pruned():
    scores = np.zeros(100, np.float32)
    scores[:50] = np.linspace(0, 1, 50)
    visits = np.r_[np.ones(50), np.zeros(50)].astype(np.uint32)
    d = decide(Pruning(ratio=0.9, anneal=0), scores, visits, None, _rng())
    assert len(d.pruned) and d.pruned.max() < 50
    unseen = np.zeros(100, np.uint32)
    assert len(decide(Pruning(anneal=0), scores, unseen, None, _rng()).pruned) == 0


@pytest.mark.parametrize("max_streak", [1, 3])
def test_every_sample_returns_within_bounded_epochs(max_streak):
    """Scores frozen while pruned (the dead-lock worry): still, nobody stays out more than
    ``max_streak`` epochs in a row."""
    n = 2000
    gen = np.random.default_rng(3)
    scores = gen.random(n).astype(np.float32)
    visits = np.ones(n, np.uint32)
    rule = Pruning(ratio=0.9, anneal=0, max_streak=max_streak)
    state = None
    out_for = np.zeros(n, int)
    longest = np.zeros(n, int)
    for epoch in range(1, 30):
        d = decide(rule, scores, visits, state, shard_seed(0, epoch, "s"))
        state = d.state
        pruned = np.zeros(n, bool)
        pruned[d.pruned] = True
        out_for = np.where(pruned, out_for + 1, 0)
        longest = np.maximum(longest, out_for)
        assert np.array_equal(d.streak, out_for)
        seen = ~pruned  # read samples get re-scored: scores of pruned ones stay frozen
        scores[seen] = gen.random(seen.sum())
    assert longest.max() == max_streak  # bounded, and the bound is reached


def test_infobatch_baseline():
    rule = es_pipe.Pruning.infobatch()
    assert (rule.ratio, rule.anneal, rule.score, rule.max_streak) == (0.5, 0.125, "loss", None)
    assert rule.active(1, 8) and rule.active(6, 8) and not rule.active(7, 8)
    losses = np.random.default_rng(4).random(40000).astype(np.float32)
    d = decide(rule, losses, np.ones(40000, np.uint32), None, _rng())
    below = losses < losses.mean()
    assert abs(len(d.pruned) / below.sum() - 0.5) < 0.02
    assert d.factor == pytest.approx(2.0)


def test_schedule_and_config():
    rule = Pruning(ratio=0.3, anneal=0.125)
    assert not rule.active(0, 8)  # no scores yet
    assert [rule.active(e, 8) for e in range(8)] == [False] + [True] * 6 + [False]
    assert not Pruning(burn_in=3, anneal=0).active(2, None)
    assert Pruning(anneal=es_pipe.Epochs(2)).active(5, 8) is True
    assert Pruning(anneal=es_pipe.Epochs(2)).active(6, 8) is False
    with pytest.raises(ConfigError, match="total_epochs"):
        rule.active(3, None)
    for bad in (dict(ratio=1.0), dict(anneal=2.0), dict(max_streak=0), dict(burn_in=0)):
        with pytest.raises(ConfigError):
            Pruning(**bad)
    with pytest.raises(ConfigError, match="total_epochs"):
        es_pipe.Selector(es_pipe.Evolved(), 8, 4, eswp=es_pipe.ESWP(prune=Pruning(anneal=0.1)))


def _samples(n_shards=4, per=64):
    return [
        {
            "x": torch.tensor([float((i * 7919) % 13)]),
            "__key__": f"k{i:04d}",
            "__shard__": f"s{s}",
            "__index__": i,
        }
        for s in range(n_shards)
        for i in range(per)
    ]


def _epoch(stage, loader, record):
    seen = 0
    for meta in loader:
        sub = meta.select(meta.data["x"][:, 0] + 0.01)
        record.append(sub)
        seen += len(meta)
    return seen


@pytest.mark.parametrize("burn_in", [es_pipe.Epochs(2), 0])
def test_sampler_prunes_only_outside_burn_in_and_anneal(burn_in):
    import torchdata.nodes as tn

    total = 6
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        16,
        8,
        burn_in=burn_in,
        anneal=es_pipe.Epochs(1),
        total_epochs=total,
        eswp=es_pipe.ESWP(prune=Pruning(ratio=0.5, anneal=0.34)),
    )
    stage = es_pipe.SelectStage(_samples(), sampler)
    loader = tn.Loader(stage)
    counts = []
    for _ in range(total):
        counts.append(_epoch(stage, loader, []))
    n = 256
    first = 2 if burn_in else 1
    # pruning: not in epoch 0 (burn-in of the rule), not in the sampler's burn-in, not in
    # the last 0.34 * 6 = 2.04 epochs (epochs 4, 5)
    expected_pruned = [False] * first + [True] * (4 - first) + [False, False]
    assert [c < n for c in counts] == expected_pruned
    assert stage.pruned_by_stage == sum(n - c for c in counts)


def test_rescale_weights_reach_the_sub_batch():
    import torchdata.nodes as tn

    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        16,
        16,
        total_epochs=3,
        reweight=True,
        eswp=es_pipe.ESWP(prune=Pruning(ratio=0.5, anneal=0)),
    )
    loader = tn.Loader(es_pipe.SelectStage(_samples(2), sampler))
    _epoch(None, loader, [])
    decisions = dict(sampler.eswp.decisions)  # for epoch 1
    record = []
    _epoch(None, loader, record)
    weights = torch.cat([sub.weights for sub in record])
    factors = {d.factor for d in decisions.values()}
    # b == B: importance weights are 1, so the weights are the rescale factors exactly
    assert set(np.round(weights.unique().numpy(), 5)) <= {1.0, *np.round(list(factors), 5)}
    assert (weights > 1).any()
    ups = sum(int(d.upweighted.sum()) for d in decisions.values())
    assert int((weights > 1).sum()) == ups
    # the pruned ones were never handed out
    keys = {(s, int(o)) for sub in record for s, o in zip(sub.who.shards, sub.who.ordinals)}
    for shard, d in decisions.items():
        assert not keys & {(shard, int(o)) for o in d.pruned}
    assert pruning.UPWEIGHT == 0x80


@pytest.mark.parametrize("policy", [es_pipe.Uniform(), es_pipe.RandomSubset()])
@pytest.mark.parametrize("rule", [es_pipe.Pruning.infobatch(), Pruning(ratio=0.5, anneal=0)])
def test_pruning_that_would_never_see_a_loss_is_refused(policy, rule):
    """Issue 11, item 10: with scoring='forward' these policies get no losses
    (needs_losses is False), so nothing would ever be pruned: refused, naming the fix."""
    with pytest.raises(ConfigError, match=r"scoring='history'.*batch\.report\(losses\)"):
        es_pipe.Selector(
            policy, meta_batch_size=16, batch_size=16, total_epochs=4, eswp=es_pipe.ESWP(prune=rule)
        )


def test_infobatch_prunes_with_history_scoring_and_reported_losses():
    """The fix the error names: InfoBatch on plain training, scored from the training
    losses fed back with report(); a real model trained on the samples."""
    import torchdata.nodes as tn

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = es_pipe.Selector(
        es_pipe.Uniform(),
        meta_batch_size=16,
        batch_size=16,
        total_epochs=4,
        scoring="history",
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning.infobatch(0.5)),
    )
    loader = tn.Loader(es_pipe.SelectStage(_samples(), sampler))
    read = []
    for _ in range(4):
        read.append(0)
        for meta in loader:
            assert not meta.needs_losses  # no scoring pass: history scoring
            sub = meta.select()
            x = sub.data["x"]
            per = (model(x) - 0.5 * x).pow(2).squeeze(1)
            weighted = per if sub.weights is None else per * sub.weights
            opt.zero_grad()
            weighted.mean().backward()
            opt.step()
            sub.report(per.detach())
            read[-1] += len(meta)
    # epoch 0 reads all 256; later ones skip about half of the below-mean samples
    assert read[0] == 256 and max(read[1:]) < 230, read


def test_a_missing_total_epochs_is_named_in_the_rule_the_user_wrote():
    with pytest.raises(
        ConfigError, match=r"Pruning\.infobatch\(delta=0.875\).*Pruning\.infobatch\(delta=1.0\)"
    ):
        es_pipe.Selector(
            es_pipe.Evolved(),
            8,
            4,
            scoring="history",
            eswp=es_pipe.ESWP(prune=es_pipe.Pruning.infobatch()),
        )
    with pytest.raises(ConfigError, match=r"Pruning\(anneal=0.25\).*Pruning\(anneal=0\)"):
        es_pipe.Selector(
            es_pipe.Evolved(), 8, 4, eswp=es_pipe.ESWP(prune=es_pipe.Pruning(anneal=0.25))
        )


def test_every_sampler_takes_its_sizes_the_same_way():
    plain = es_pipe.Selector(es_pipe.Uniform(), 64, 32)
    evolved = es_pipe.Selector(es_pipe.Evolved(), 64, 32)
    assert (plain.meta_batch_size, plain.batch_size) == (64, 32)
    assert (evolved.meta_batch_size, evolved.batch_size) == (64, 32)
