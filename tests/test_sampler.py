"""The Selector's constructor over swept hyper-parameters: accepted ones run for epochs, the
others are a ConfigError that names the argument (issue 7's bad-input sweep, by concept)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torchdata.nodes as tn
from _sweep import (
    SCALES,
    es_error_or_ok,
    few_faults,
    fractions,
    outcome_of,
    raises_as_recorded,
    small,
    sweep,
    sweep_samples,
    weird_scalars,
)
from hypothesis import strategies as st

import es_pipe
from es_pipe.errors import ConfigError

spans = st.one_of(
    weird_scalars,
    st.integers(-3, 50),
    st.builds(es_pipe.Steps, st.one_of(weird_scalars, st.floats(-5, 50))),
    st.builds(es_pipe.Epochs, st.one_of(weird_scalars, st.floats(-5, 5))),
)


def _policy():
    return st.one_of(
        st.builds(es_pipe.Evolved, fractions, fractions),
        st.builds(es_pipe.SelectiveBackprop, st.one_of(weird_scalars, st.floats(-1, 5))),
        st.sampled_from([es_pipe.Uniform(), es_pipe.RandomSubset(), es_pipe.LossProportional()]),
        weird_scalars,
        st.just("es"),
    )


def _pruning():
    return st.one_of(
        st.none(),
        weird_scalars,
        st.builds(
            es_pipe.Pruning,
            ratio=fractions,
            anneal=st.one_of(
                fractions, st.builds(es_pipe.Epochs, st.one_of(weird_scalars, st.floats(-1, 3)))
            ),
            burn_in=small,
            rescale=st.booleans(),
            max_streak=st.one_of(st.none(), small),
            score=st.sampled_from(["score", "loss", "x", None]),
            draw=st.sampled_from(["exact", "bernoulli", "x", 1]),
        ),
        st.builds(es_pipe.Pruning.infobatch, fractions, fractions),
    )


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_sampler_hyper_parameters(n, tmp_path):
    """Accepted hyper-parameters work for an epoch and more; the others are ConfigError."""
    root = tmp_path / "m"

    def check(case):
        kw = dict(case)
        policy = kw.pop("policy")
        if kw.get("manifests"):
            kw["manifests"] = str(root / str(len(os.listdir(tmp_path))))

        def build():
            return es_pipe.Selector(policy, **kw)

        sampler, error = es_error_or_ok(build, (ConfigError,))
        if error is None:  # accepted: it must run two epochs of a small stage
            for _ in range(2):
                for meta in tn.Loader(es_pipe.SelectStage(sweep_samples(23), sampler)):
                    sub = meta.select(torch.rand(len(meta)) if meta.needs_losses else None)
                    assert 1 <= len(sub) <= len(meta)
                    if sampler.scoring == "history":
                        sub.report(torch.rand(len(sub)))
        return outcome_of(error)

    span_ok = st.one_of(
        st.integers(0, 4),
        st.builds(es_pipe.Steps, st.integers(0, 4)),
        st.builds(es_pipe.Epochs, st.floats(0, 2)),
    )
    valid = {
        "policy": st.sampled_from(
            [
                es_pipe.Evolved(),
                es_pipe.Evolved(0.0, 0.9),
                es_pipe.Uniform(),
                es_pipe.RandomSubset(),
                es_pipe.LossProportional(),
                es_pipe.SelectiveBackprop(2.0),
            ]
        ),
        "meta_batch_size": st.integers(1, 10),
        "batch_size": st.integers(1, 10),
        "burn_in": span_ok,
        "anneal": span_ok,
        "total_steps": st.integers(1, 30),
        "total_epochs": st.one_of(st.integers(1, 5), st.floats(0.5, 5)),
        "replacement": st.booleans(),
        "reweight": st.booleans(),
        "init": st.sampled_from(["loss", "mean"]),
        "scoring": st.sampled_from(["forward", "history"]),
        "seed": st.integers(0, 2**64),
        "prune": st.one_of(
            st.none(),
            st.builds(
                es_pipe.Pruning,
                ratio=st.floats(0, 0.9),
                anneal=st.one_of(st.just(0), st.floats(0, 1)),
                burn_in=st.integers(1, 3),
                max_streak=st.one_of(st.none(), st.integers(1, 3)),
            ),
            st.builds(es_pipe.Pruning.infobatch, st.floats(0, 0.9), st.floats(0, 1)),
        ),
        "manifests": st.booleans(),
        "rank": st.just(0),
        "world_size": st.just(1),
        "on_mismatch": st.sampled_from(["raise", "fresh"]),
        "commit_timeout": st.floats(0.1, 5),
    }
    bad = {
        "policy": _policy(),
        "meta_batch_size": small,
        "batch_size": small,
        "burn_in": spans,
        "anneal": spans,
        "total_steps": small,
        "total_epochs": fractions,
        "replacement": weird_scalars,
        "reweight": weird_scalars,
        "init": st.sampled_from(["x", None, 1, "LOSS"]),
        "scoring": st.sampled_from(["x", None, "forward "]),
        "seed": small,
        "prune": _pruning(),
        "rank": st.one_of(st.none(), small),
        "world_size": st.one_of(st.none(), small),
        "on_mismatch": st.sampled_from(["x", None]),
        "commit_timeout": fractions,
    }
    strategy = few_faults(valid, bad, required=("policy", "meta_batch_size", "batch_size"))

    def guarded(case):
        try:
            return check(case)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    # constructors of Evolved / Pruning run while drawing: their ConfigErrors are outcomes
    sweep("hyper-parameters: Selector", _lazy_errors(strategy), _unwrap(guarded), n)


def _lazy_errors(strategy):
    """Hypothesis fails on an exception raised while drawing; turn a ConfigError raised by
    a builder (Evolved(nan), Pruning(ratio=2), ...) into a value the check counts."""

    @st.composite
    def draw(d):
        try:
            return ("value", d(strategy))
        except ConfigError as exc:  # anything else fails the test with the example
            return ("error", exc)

    return draw()


def _unwrap(check):
    def run(item):
        kind, value = item
        if kind == "error":
            assert len(str(value)) > 20
            return type(value).__name__
        return check(value)

    return run


# One example per library bug the bad-input sweep found in the sampler's arguments (each was a raw
# error or a crash).
REGRESSIONS = {
    "burn_in of a str": (ConfigError, "burn_in",
                         lambda: es_pipe.Selector(es_pipe.Evolved(), 4, 2, burn_in=es_pipe.Steps("3"))),
    "total_steps of a str": (ConfigError, "total_steps",
                             lambda: es_pipe.Selector(es_pipe.Evolved(), 4, 2, anneal=3, total_steps="10")),
    "policy of a str": (ConfigError, "policy", lambda: es_pipe.Selector("es", 4, 2)),
}  # fmt: skip


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions_found_by_the_sweep(name):
    raises_as_recorded(*REGRESSIONS[name])
