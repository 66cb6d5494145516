"""The ES math and the baseline policies, against hand computation and exact distributions."""

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from _sweep import SCALES, es_error_or_ok, few_faults, outcome_of, sweep, weird_scalars
from hypothesis import strategies as st

import es_pipe
from es_pipe import sampling
from es_pipe.errors import ConfigError


def test_update_rule_matches_hand_computed_sequence():
    es = sampling.Evolved(beta1=0.2, beta2=0.8)
    prior = torch.tensor([1.0])  # init="loss": s(0) is the first loss
    expected = [  # (loss, weight, score) worked out by hand
        (1.0, 0.2 * 1.0 + 0.8 * 1.0, 0.8 * 1.0 + 0.2 * 1.0),
        (2.0, 0.2 * 1.0 + 0.8 * 2.0, 0.8 * 1.0 + 0.2 * 2.0),
        (0.5, 0.2 * 1.2 + 0.8 * 0.5, 0.8 * 1.2 + 0.2 * 0.5),
    ]
    for loss, weight, score in expected:
        losses = torch.tensor([loss])
        assert es.weigh(prior, losses).item() == pytest.approx(weight)
        prior = es.score(prior, losses)
        assert prior.item() == pytest.approx(score)
    assert prior.item() == pytest.approx(1.06)


def test_equal_betas_are_a_plain_ema():
    es = sampling.Evolved(beta1=0.7, beta2=0.7)
    losses = torch.rand(20, 5, generator=torch.Generator().manual_seed(1))
    score, ema = losses[0].clone(), losses[0].clone()
    for t in range(1, 20):
        weight = es.weigh(score, losses[t])
        score = es.score(score, losses[t])
        ema = 0.7 * ema + 0.3 * losses[t]
        torch.testing.assert_close(weight, ema)
        torch.testing.assert_close(score, ema)


def test_beta1_zero_is_loss_proportional():
    es = sampling.Evolved(beta1=0.0, beta2=0.9)
    prior, losses = torch.rand(8), torch.rand(8)
    torch.testing.assert_close(es.weigh(prior, losses), losses)
    torch.testing.assert_close(
        es.weigh(prior, losses), sampling.LossProportional().weigh(prior, losses)
    )


def test_rewritten_form_is_score_plus_loss_difference():
    b1, b2 = 0.2, 0.8
    es = sampling.Evolved(b1, b2)
    prior, losses = torch.rand(16), torch.rand(16)
    score = es.score(prior, losses)
    torch.testing.assert_close(es.weigh(prior, losses), score + (b2 - b1) * (losses - prior))


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "0.5"])
def test_betas_outside_unit_interval_are_refused(beta):
    with pytest.raises(ConfigError, match="outside"):
        sampling.Evolved(beta1=beta)
    with pytest.raises(ConfigError, match="outside"):
        es_pipe.Selector(es_pipe.Evolved(beta2=beta), 8, 4)


def _frequencies(weights, k, replacement, trials=15_000):
    counts = torch.zeros(len(weights), dtype=torch.float64)
    for t in range(trials):
        g = torch.Generator().manual_seed(sampling.step_seed(3, t))
        picked = sampling.draw(torch.tensor(weights), k, g, replacement=replacement)
        counts += torch.bincount(picked, minlength=len(weights)).double()
    return counts / trials


def _tolerance(p, trials=15_000):
    return 4.5 * math.sqrt(max(p * (1 - p), 1e-9) / trials)  # 4.5 sigma: false alarm < 1e-5


def test_single_draw_frequencies_are_proportional_to_weights():
    weights = [1.0, 2.0, 3.0, 4.0, 0.0]
    freq = _frequencies(weights, 1, replacement=False)
    for w, f in zip(weights, freq.tolist()):
        p = w / sum(weights)
        assert abs(f - p) < _tolerance(p), (w, f, p)


def test_without_replacement_matches_successive_sampling_exactly():
    weights = [1.0, 2.0, 3.0, 4.0]
    p = [w / sum(weights) for w in weights]
    # P(i in S) for k=2 successive sampling: p_i + sum_j p_j * p_i / (1 - p_j)
    exact = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
    freq = _frequencies(weights, 2, replacement=False)
    for f, e in zip(freq.tolist(), exact):
        assert abs(f - e) < _tolerance(e), (f, e)


def test_with_replacement_expected_counts_are_k_times_p():
    weights = [1.0, 2.0, 3.0, 4.0]
    freq = _frequencies(weights, 3, replacement=True, trials=20_000)
    for f, w in zip(freq.tolist(), weights):
        assert abs(f - 3 * w / 10) < 3 * _tolerance(w / 10, 20_000)


def test_draw_never_repeats_without_replacement_even_with_zero_weights():
    g = torch.Generator().manual_seed(0)
    picked = sampling.draw(torch.tensor([0.0, 0.0, 5.0, 0.0]), 3, g)
    assert sorted(set(picked.tolist())) == sorted(picked.tolist())
    assert 2 in picked.tolist()
    picked = sampling.draw(torch.zeros(6), 6, g)
    assert sorted(picked.tolist()) == list(range(6))


def test_inclusion_probabilities_sum_to_k_and_are_capped():
    w = torch.tensor([100.0, 1.0, 1.0, 1.0, 1.0])
    pi = sampling.inclusion_probabilities(w, 2, 5, replacement=False)
    assert pi.sum().item() == pytest.approx(2.0)
    assert pi[0].item() == pytest.approx(1.0)
    assert pi[1:].tolist() == pytest.approx([0.25] * 4)


def test_importance_weights_make_the_sub_batch_mean_unbiased():
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    w = losses.clone()
    k, n, trials = 2, 5, 30_000
    pi = sampling.inclusion_probabilities(w, k, n, replacement=True)
    total = 0.0
    for t in range(trials):
        g = torch.Generator().manual_seed(sampling.step_seed(11, t))
        picked = sampling.draw(w, k, g, replacement=True)
        iw = sampling.importance_weights(pi, picked, k, n).double()
        total += (iw * losses[picked]).mean().item()
    assert total / trials == pytest.approx(losses.mean().item(), rel=0.02)


def test_selective_backprop_weights_are_percentiles_to_the_beta():
    sb = sampling.SelectiveBackprop(beta=2.0)
    w = sb.weigh(torch.zeros(4), torch.tensor([0.3, 0.1, 0.4, 0.2]))
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25, 1.0, 0.5]) ** 2)


def test_schedule_phases_in_steps_and_epochs():
    s = sampling.Schedule(burn_in=3, anneal=2, total_steps=10)
    assert [s.phase(t, 0) for t in range(10)] == ["burn_in"] * 3 + ["evolve"] * 5 + ["anneal"] * 2
    e = sampling.Schedule(burn_in=es_pipe.Epochs(1), anneal=es_pipe.Epochs(0.5), total_epochs=4)
    assert [e.phase(0, x) for x in (0.0, 0.99, 1.0, 3.4, 3.5, 3.9)] == [
        "burn_in",
        "burn_in",
        "evolve",
        "evolve",
        "anneal",
        "anneal",
    ]
    with pytest.raises(ConfigError, match="total_steps"):
        sampling.Schedule(anneal=5)
    with pytest.raises(ConfigError, match="Epochs"):
        sampling.Schedule(burn_in=1.5)


def test_step_seed_is_stable_and_spreads():
    assert sampling.step_seed(0, 0) == sampling.step_seed(0, 0)
    seeds = {sampling.step_seed(s, t) for s, t in itertools.product(range(20), range(50))}
    assert len(seeds) == 1000
    assert all(0 <= x < 2**63 for x in seeds)
    assert sampling.step_seed(7, 123) == 7631971775492880123  # pinned: old checkpoints depend on it


# ------------------------------------------------------- inclusion probabilities: numerics


def _capped_reference(weights: list[float], k: int) -> list[Fraction]:
    """``min(1, c * w)`` with ``sum == k``, by textbook iterative capping in exact rational
    arithmetic, on the weights ``draw`` draws from (zeros floored at 1e-12 * max)."""
    exact = [Fraction(max(w, 0.0)) for w in weights]
    top = max(exact)
    exact = [w / top + Fraction(1e-12) for w in exact] if top > 0 else [Fraction(1)] * len(exact)
    capped: set[int] = set()
    while len(capped) < len(exact):
        c = (k - len(capped)) / sum(w for i, w in enumerate(exact) if i not in capped)
        more = {i for i, w in enumerate(exact) if i not in capped and c * w >= 1}
        if not more:
            return [Fraction(1) if i in capped else c * w for i, w in enumerate(exact)]
        capped |= more
    return [Fraction(1)] * len(exact)


def _successive_sampling_exact(weights: list[Fraction], k: int) -> list[Fraction]:
    """Exact inclusion probabilities of drawing ``k`` without replacement with probability
    proportional to the weights left (what Efraimidis-Spirakis keys draw), by enumeration."""
    n, total = len(weights), sum(weights)
    pi = [Fraction(0)] * n
    for seq in itertools.permutations(range(n), k):
        p, left = Fraction(1), total
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        for i in seq:
            pi[i] += p
    return pi


MAGNITUDES = [1e-30, 1e-8, 1.0, 1e6, 1e12, 1e16, 1e30, 1e300]


@pytest.mark.parametrize("big", MAGNITUDES)
def test_one_large_loss_and_zeros_give_the_right_importance_weights(big):
    """Issue 11 item 8: weights reached 6e22 at loss 1e12 and inf at 1e30. With one large
    loss and five exact zeros, b=3 of B=6: the large one is always drawn, then 2 of the 5
    zeros, so pi = (1, 2/5, ...) and the weights k / (n * pi) are 0.5 and 1.25."""
    w = torch.tensor([big, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    pi = sampling.inclusion_probabilities(w, 3, 6, replacement=False)
    floored = [Fraction(1)] + [Fraction(1e-12)] * 5  # what draw draws from, scaled
    exact = _successive_sampling_exact(floored, 3)
    assert pi.tolist() == pytest.approx([float(p) for p in exact], rel=1e-9)
    assert pi.sum().item() == pytest.approx(3.0, rel=1e-12)
    iw = sampling.importance_weights(pi, torch.arange(6), 3, 6)
    assert iw.tolist() == pytest.approx([0.5] + [1.25] * 5, rel=1e-6)


def test_inclusion_probabilities_match_exact_capping_over_magnitudes():
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(1, 13))
        k = int(rng.integers(1, n + 1))
        exponents = rng.uniform(-30, 30, n)
        w = 10.0**exponents * rng.uniform(0.5, 2.0, n)
        w[rng.random(n) < 0.3] = 0.0  # exact zeros
        w *= float(10.0 ** rng.integers(-200, 200))  # whole batch at any scale
        if trial % 7 == 0:
            w[:] = 0.0
        for dtype in (torch.float64, torch.float32):
            if w.max() >= torch.finfo(dtype).max:
                continue
            t = torch.tensor(w, dtype=dtype)  # float32 losses: compare with what they hold
            want = [float(p) for p in _capped_reference(t.double().tolist(), k)]
            pi = sampling.inclusion_probabilities(t, k, n, replacement=False)
            assert pi.tolist() == pytest.approx(want, rel=1e-9), (trial, w.tolist(), k)
            assert pi.sum().item() == pytest.approx(k, rel=1e-9)
            iw = sampling.importance_weights(pi, torch.arange(n), k, n)
            assert torch.isfinite(iw).all() and (iw > 0).all()


def test_inclusion_probabilities_with_replacement_over_magnitudes():
    for big in MAGNITUDES:
        w = torch.tensor([big, 0.0, big / 3, 0.0], dtype=torch.float64)
        pi = sampling.inclusion_probabilities(w, 2, 4, replacement=True)
        total = 1 + 1 / 3 + 2e-12
        want = [2 * 1 / total, 2e-12 / total, 2 / 3 / total, 2e-12 / total]
        assert pi.tolist() == pytest.approx(want, rel=1e-5), big


@pytest.mark.parametrize("big", [1e12, 1e30])
def test_reweighted_sub_batch_of_the_stage_stays_finite(big):
    """End to end through the stage: one huge loss among zeros, reweight=True."""
    import torchdata.nodes as tn
    from conftest import keyed_samples

    sampler = es_pipe.Selector(es_pipe.Evolved(), 6, 3, seed=2, reweight=True)
    meta = next(iter(tn.Loader(es_pipe.SelectStage(keyed_samples(6), sampler))))
    losses = torch.tensor([0.0, 0.0, big, 0.0, 0.0, 0.0])
    sub = meta.select(losses)
    assert 2 in sub.indices.tolist()
    expected = [0.5 if i == 2 else 1.25 for i in sub.indices.tolist()]
    assert sub.weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite((sub.weights * losses[sub.indices]).mean())


# --------------------------------------------------------------------------- swept bad inputs
# Hypothesis sweeps (tests/_sweep.py): every input gives a correct result or an es_pipe
# error with a message, never a raw exception or a hang; a rejected call changes no state.


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_policy_pruning_schedule_constructors(n):
    """Evolved, SelectiveBackprop, Pruning, InfoBatch, Steps/Epochs through Schedule."""

    def check(case):
        kind, kw = case
        builders = {
            "evolved": es_pipe.Evolved,
            "sb": es_pipe.SelectiveBackprop,
            "pruning": es_pipe.Pruning,
            "infobatch": es_pipe.Pruning.infobatch,
            "schedule": es_pipe.sampling.Schedule,
        }
        built, error = es_error_or_ok(lambda: builders[kind](**kw), (ConfigError,))
        if error is None and kind == "pruning":
            if built.ratio == 0 or built.burn_in > 3:  # nothing to prune by, or too early
                assert not built.active(3, 10.0)
            assert not built.active(0, 10.0)  # epoch 0 has no scores
            json.dumps(built.describe())
        if error is None and kind == "schedule":
            for step in (0, 5, 100):
                assert built.phase(step, step / 10) in ("burn_in", "evolve", "anneal")
        return outcome_of(error)

    bad = st.one_of(weird_scalars, st.floats(-2, 2), st.integers(-2, 200))
    bad_span = st.one_of(bad, st.builds(es_pipe.Epochs, bad), st.builds(es_pipe.Steps, bad))
    span_ok = st.one_of(
        st.integers(0, 4),
        st.builds(es_pipe.Steps, st.integers(0, 4)),
        st.builds(es_pipe.Epochs, st.floats(0, 2)),
    )
    unit = st.floats(0, 1)
    valid = {
        "evolved": {"beta1": unit, "beta2": unit},
        "sb": {"beta": st.floats(0.1, 5)},
        "pruning": {
            "ratio": st.floats(0, 0.99),
            "anneal": st.one_of(unit, st.builds(es_pipe.Epochs, st.floats(0, 3))),
            "burn_in": st.integers(1, 3),
            "rescale": st.booleans(),
            "max_streak": st.one_of(st.none(), st.integers(1, 127)),
            "score": st.sampled_from(["score", "loss"]),
            "draw": st.sampled_from(["exact", "bernoulli"]),
        },
        "infobatch": {"ratio": st.floats(0, 0.99), "delta": unit},
        "schedule": {
            "burn_in": span_ok,
            "anneal": span_ok,
            "total_steps": st.integers(1, 50),
            "total_epochs": st.floats(0.5, 5),
        },
    }
    strategy = st.one_of(
        *[
            st.tuples(
                st.just(kind),
                few_faults(fields, {k: bad_span if kind == "schedule" else bad for k in fields}),
            )
            for kind, fields in valid.items()
        ]
    )
    sweep("hyper-parameters: policies, Pruning, Schedule", strategy, check, n)
