"""Bad-input sweep over es_pipe's public API (issue #7, part 2).

Property-based (hypothesis) sweeps over what users hand es_pipe: losses, hyper-parameters,
sample dicts, source options, shard lists, manifest folders and CLI arguments. Every input
must give a correct result or an es_pipe error (``EsPipeError``: ``ConfigError``,
``FeedbackError``, ``ShardError``, ``ManifestError``) with a message; never a raw exception
from inside es_pipe or a dependency, never a hang, and a rejected call changes no state.

Counts per category are recorded by ``tests/_sweep.py`` (``ES_PIPE_SWEEP_REPORT=path.json``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn
from _sweep import SCALES, dump_report, es_error_or_ok, few_faults, outcome_of, sweep
from hypothesis import strategies as st

import es_pipe
from es_pipe.errors import ConfigError, EsPipeError, FeedbackError
from es_pipe.manifests import Manifests
from es_pipe.sampler import Identity, check_losses
from es_pipe.shard_writer import write_shards
from es_pipe.sources import ArrowSource, ParquetSource, WebDatasetSource
from es_pipe.tools.cli import main as cli_main


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    dump_report()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- values

weird_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.complex_numbers(allow_nan=False, max_magnitude=1e3),
    st.just(object()),
    st.just([]),
    st.just({}),
    st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
    st.builds(np.float32, st.floats(width=32)),
)


def _float_list(n: int):
    return st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n)


def losses_for(n: int):
    """Mostly bad, sometimes good, per-sample losses for a meta-batch of ``n``."""
    good = st.lists(st.floats(0, 1e6), min_size=n, max_size=n)
    sizes = st.integers(0, 2 * n + 2)
    return st.one_of(
        good.map(lambda v: torch.tensor(v, dtype=torch.float32)),
        good.map(np.array),
        good,  # a plain list
        sizes.flatmap(_float_list).map(lambda v: torch.tensor(v, dtype=torch.float64)),
        _float_list(n).map(torch.tensor),  # NaN / inf / negative
        st.lists(st.floats(-1e6, 0, exclude_max=True), min_size=n, max_size=n).map(torch.tensor),
        st.lists(st.integers(0, 9), min_size=n, max_size=n).map(torch.tensor),  # int dtype
        st.lists(st.booleans(), min_size=n, max_size=n).map(torch.tensor),
        good.map(lambda v: torch.tensor(v).reshape(1, -1)),  # 2-D
        good.map(lambda v: torch.tensor(v).reshape(-1, 1)),
        good.map(lambda v: torch.tensor(v).to_sparse()),
        st.just(torch.empty(n, device="meta")),
        st.floats(0, 10).map(torch.tensor),  # 0-d
        st.lists(st.floats(1e39, 1e300), min_size=n, max_size=n).map(
            lambda v: torch.tensor(v, dtype=torch.float64)
        ),  # beyond float32, where scores live
        st.lists(weird_scalars, min_size=n, max_size=n),  # lists of anything
        st.lists(st.lists(st.floats(0, 1), max_size=3), min_size=n, max_size=n),  # ragged
        st.lists(weird_scalars, min_size=n, max_size=n).map(lambda v: np.array(v, dtype=object)),
        weird_scalars,  # not a sequence at all
        st.text(max_size=n),
        st.dictionaries(st.text(max_size=3), st.floats(), max_size=n),
    )


def _samples(n: int, shard: str = "s") -> list[dict]:
    return [
        {"x": torch.full((2,), float(i)), "__key__": f"k{i}", "__shard__": shard, "__index__": i}
        for i in range(n)
    ]


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("n", SCALES)
def test_check_losses(n):
    def check(case):
        losses, nonneg = case
        result, error = es_error_or_ok(lambda: check_losses(losses, 6, nonneg), (FeedbackError,))
        if error is None:  # accepted: a finite, float, 1-D tensor of 6
            assert isinstance(result, torch.Tensor) and result.is_floating_point()
            assert result.shape == (6,) and bool(torch.isfinite(result).all())
            assert float(result.abs().max()) <= torch.finfo(torch.float32).max
            assert not nonneg or bool((result >= 0).all())
        return outcome_of(error)

    sweep("losses: check_losses", st.tuples(losses_for(6), st.booleans()), check, n)


def _twin_samplers(policy: str, **kw):
    make = {
        "es": lambda: es_pipe.Selector(es_pipe.Evolved(), 8, 3, seed=5, **kw),
        "loss": lambda: es_pipe.Selector(
            es_pipe.LossProportional(), meta_batch_size=8, batch_size=3, seed=5, **kw
        ),
        "sb": lambda: es_pipe.Selector(
            es_pipe.SelectiveBackprop(2.0),
            meta_batch_size=8,
            batch_size=3,
            seed=5,
            reweight=True,
            **kw,
        ),
    }[policy]
    return make(), make()


def _state(sampler) -> tuple:
    scores = {
        k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in sampler.store.state_dict().items()
    }
    return sampler.get_state(), scores


def _same_state(a: tuple, b: tuple) -> bool:
    (pa_, sa), (pb, sb) = a, b

    def same(x, y):
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return pa_ == pb and sa.keys() == sb.keys() and all(same(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("n", SCALES)
def test_meta_batch_select_rejects_bad_losses_without_a_trace(n):
    """A rejected ``select`` changes no score, step or RNG position: the next good answer
    selects exactly what a sampler that never saw the bad losses selects."""

    def check(case):
        policy, bad, good = case
        sampler, twin = _twin_samplers(policy)
        loaders = [tn.Loader(es_pipe.SelectStage(_samples(20), s)) for s in (sampler, twin)]
        its = [iter(loader) for loader in loaders]
        # one good step first, so that scores exist
        first = [next(it).select(torch.linspace(0.1, 2.0, 8)) for it in its]
        assert torch.equal(first[0].indices, first[1].indices)
        meta, meta_twin = next(its[0]), next(its[1])
        before = _state(sampler)
        result, error = es_error_or_ok(lambda: meta.select(bad), (FeedbackError,))
        if error is not None:
            assert _same_state(before, _state(sampler)), "a rejected select changed state"
            assert not meta.answered
            answer = torch.tensor(good, dtype=torch.float32)
            chosen = meta.select(answer)
        else:  # accepted: the twin, given the same losses, must choose the same
            chosen, answer = result, bad
        expected = meta_twin.select(answer)
        assert torch.equal(chosen.indices, expected.indices)
        assert _same_state(_state(sampler), _state(twin))
        return outcome_of(error)

    strategy = st.tuples(
        st.sampled_from(["es", "loss", "sb"]),
        losses_for(8),
        st.lists(st.floats(0, 100), min_size=8, max_size=8),
    )
    sweep("losses: MetaBatch.select", strategy, check, n)


@pytest.mark.parametrize("n", SCALES)
def test_sub_batch_report_rejects_bad_losses_without_a_trace(n):
    def check(bad):
        sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 3, seed=1, scoring="history")
        it = iter(tn.Loader(es_pipe.SelectStage(_samples(16), sampler)))
        sub = next(it).select()
        before = _state(sampler)
        _, error = es_error_or_ok(lambda: sub.report(bad), (FeedbackError,))
        if error is not None:
            assert _same_state(before, _state(sampler)), "a rejected report changed scores"
            sub.report(torch.ones(len(sub)))  # the sub-batch can still be reported
        with pytest.raises(FeedbackError, match="already reported"):
            sub.report(torch.ones(len(sub)))
        return outcome_of(error)

    sweep("losses: SubBatch.report", losses_for(3), check, n)


# --------------------------------------------------------------------------- hyper-parameters

spans = st.one_of(
    weird_scalars,
    st.integers(-3, 50),
    st.builds(es_pipe.Steps, st.one_of(weird_scalars, st.floats(-5, 50))),
    st.builds(es_pipe.Epochs, st.one_of(weird_scalars, st.floats(-5, 5))),
)
small = st.one_of(weird_scalars, st.integers(-2, 40))
fractions = st.one_of(weird_scalars, st.floats(-0.5, 1.5))


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


@pytest.mark.parametrize("n", SCALES)
def test_sampler_hyper_parameters(n, tmp_path):
    """Accepted hyper-parameters work for an epoch and more; the others are ConfigError."""
    root = tmp_path / "m"

    def check(case):
        kw = dict(case)
        policy = kw.pop("policy")
        if kw.get("manifests"):
            kw["manifests"] = str(root / str(len(os.listdir(tmp_path))))
        # ESWP's options go in its part, as the selector's own keywords are deprecated
        options = {
            k: kw.pop(k) for k in ("prune", "manifests", "on_mismatch", "commit_timeout") if k in kw
        }

        def build():
            has_part = options.get("prune") is not None or options.get("manifests") is not None
            eswp = es_pipe.ESWP(**options) if has_part else None
            return es_pipe.Selector(policy, eswp=eswp, **kw)

        sampler, error = es_error_or_ok(build, (ConfigError,))
        if error is None:  # accepted: it must run two epochs of a small stage
            for _ in range(2):
                for meta in tn.Loader(es_pipe.SelectStage(_samples(23), sampler)):
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


# --------------------------------------------------------------------------- sample dicts


@pytest.mark.parametrize("n", SCALES)
def test_stage_sample_dicts(n):
    """Samples with missing or wrongly typed identity fields or payloads: selected
    sub-batches of the samples given, or a ConfigError."""
    field_values = {
        "__key__": st.one_of(st.text(max_size=4), weird_scalars),
        "__shard__": st.one_of(st.text(max_size=4), weird_scalars),
        "__index__": st.one_of(st.integers(-3, 2**40), weird_scalars),
        "x": st.one_of(st.just(torch.zeros(2)), st.just(torch.zeros(3)), weird_scalars),
    }
    sample = st.one_of(
        st.fixed_dictionaries({}, optional=field_values),
        st.fixed_dictionaries({k: v for k, v in field_values.items() if k != "x"}),
        weird_scalars,
    )

    def check(samples):
        def run():
            sampler = es_pipe.Selector(es_pipe.Evolved(), 4, 2, seed=0)
            keys = []
            for meta in tn.Loader(es_pipe.SelectStage(samples, sampler)):
                keys += meta.select(torch.rand(len(meta))).keys
            return keys

        keys, error = es_error_or_ok(run, (ConfigError,))
        if error is None:
            given = [s["__key__"] for s in samples]
            assert all(any(k is g or k == g for g in given) for k in keys)
        return outcome_of(error)

    @st.composite
    def batches(draw):
        samples = _samples(draw(st.integers(0, 9)))
        for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
            if not samples:
                break
            i = draw(st.integers(0, len(samples) - 1))
            field = draw(st.sampled_from(sorted(field_values)))
            if draw(st.booleans()):
                samples[i].pop(field, None)
            else:
                samples[i][field] = draw(field_values[field])
        if draw(st.integers(0, 9)) == 0:
            samples.append(draw(sample))
        return samples

    sweep("sample dicts: SelectStage", batches(), check, n)


# --------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    tars = write_shards(
        [{"__key__": f"k{i}", "txt": f"t{i}"} for i in range(12)], f"{base}/t-%03d.tar", "tar", 4
    )
    table = pa.table({"id": [f"r{i}" for i in range(12)], "x": np.arange(12)})
    pqs = write_shards(table, f"{base}/p-%03d.parquet", "parquet", 4, row_group_rows=2)
    arrows = []
    for i in range(3):
        url = f"{base}/a-{i:03d}.arrow"
        with pa.OSFile(url, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table.slice(4 * i, 4))
        arrows.append(url)
    (base / "dir.tar").mkdir()
    (base / "empty.tar").write_bytes(b"")
    (base / "text.parquet").write_text("not parquet")
    return {"tar": tars, "parquet": pqs, "arrow": arrows, "base": str(base)}


SOURCE_CLASSES = {"tar": WebDatasetSource, "parquet": ParquetSource, "arrow": ArrowSource}


def _epoch(src) -> list[dict]:
    return list(src)


@pytest.mark.parametrize("n", SCALES)
def test_source_options(n, shard_sets):
    """Source options from the README: accepted ones read every sample exactly once (or
    the equalized count); the others raise a ConfigError at construction or reset."""

    def check(case):
        fmt, kw = case
        urls = shard_sets[fmt]
        other = ("columns", "key_column", "batch_rows", "shuffle_rows")
        other = other if fmt == "tar" else ("shuffle_buffer",)
        kw = {k: v for k, v in kw.items() if k not in other}
        if kw.get("num_samples") == "right":
            kw["num_samples"] = dict.fromkeys(urls, 4)

        samples, error = es_error_or_ok(
            lambda: _epoch(SOURCE_CLASSES[fmt](urls, **kw)), (EsPipeError,)
        )
        if error is None:
            ids = [(s["__shard__"], s["__index__"]) for s in samples]
            whole = kw.get("rank") in (None, 0) and kw.get("world_size") in (None, 1)
            whole &= kw.get("num_workers") in (None, 1)
            if kw.get("equalize") is None and not kw.get("pruned") and whole:
                assert sorted(ids) == sorted((u, j) for u in urls for j in range(4))
            assert len(set(ids)) == len(ids) or kw.get("equalize") == "pad"
        return outcome_of(error)

    pruned_ok = st.lists(st.integers(0, 6), max_size=4, unique=True).map(
        lambda v: lambda u, e: np.array(sorted(v), dtype=np.int64)
    )
    valid = {
        "shuffle": st.booleans(),
        "seed": st.integers(0, 2**64),
        "epoch": st.integers(0, 5),
        "rank": st.just(0),
        "world_size": st.just(1),
        "worker": st.just(0),
        "num_workers": st.just(1),
        "equalize": st.sampled_from([None, "drop", "pad"]),
        "on_error": st.sampled_from(["raise", "skip"]),
        "pruned": st.one_of(st.none(), pruned_ok),
        "num_samples": st.just("right"),
        "shuffle_buffer": st.integers(0, 8),
        "columns": st.sampled_from([None, ["x"], ["id", "x"]]),
        "key_column": st.sampled_from([None, "id"]),
        "batch_rows": st.integers(1, 5),
        "shuffle_rows": st.booleans(),
    }
    bad = {
        "shuffle": weird_scalars,
        "seed": small,
        "epoch": small,
        "rank": st.one_of(st.none(), small),
        "world_size": st.one_of(st.none(), small),
        "worker": st.one_of(st.none(), small),
        "num_workers": st.one_of(st.none(), small),
        "equalize": st.sampled_from(["x", 1, [], "DROP"]),
        "on_error": st.sampled_from(["x", None, ["raise"]]),
        "pruned": st.one_of(
            weird_scalars,
            st.lists(st.integers(-2, 6), max_size=4).map(lambda v: lambda u, e: np.array(v)),
            st.lists(weird_scalars, max_size=3).map(lambda v: lambda u, e: v),
            st.lists(st.integers(-2, 6), max_size=3).map(lambda v: {"x": v}),
        ),
        "num_samples": st.one_of(
            weird_scalars, st.dictionaries(st.text(max_size=3), weird_scalars, max_size=2)
        ),
        "shuffle_buffer": small,
        "columns": st.one_of(
            weird_scalars, st.just(["nope"]), st.just("x"), st.lists(weird_scalars, max_size=2)
        ),
        "key_column": st.one_of(weird_scalars, st.just("x"), st.just("nope")),
        "batch_rows": small,
        "shuffle_rows": weird_scalars,
    }
    options = few_faults(valid, bad)  # keys a format does not take are dropped in check

    fmts = st.sampled_from(list(SOURCE_CLASSES))
    sweep("source options", st.tuples(fmts, options), check, n)


@pytest.mark.parametrize("n", SCALES)
def test_shard_lists(n, shard_sets):
    """Shard lists: empty, non-existent, directories, weird URLs, duplicates, non-strings,
    other formats, broken brace patterns: a ShardError/ConfigError, never a raw error."""
    base = shard_sets["base"]
    entries = st.one_of(
        st.sampled_from(shard_sets["tar"] + shard_sets["parquet"] + shard_sets["arrow"]),
        st.sampled_from(
            [
                "",
                " ",
                "\x00",
                "/",
                ".",
                "..",
                f"{base}/nope.tar",
                f"{base}/dir.tar",
                f"{base}/empty.tar",
                f"{base}/text.parquet",
                f"{base}/*.nothing",
                f"{base}/t-{{000..002}}.tar",
                f"{base}/t-{{000..",
                f"{base}/t-}}.tar",
                f"{base}/[",
                "memory://nowhere/x.tar",
                "foo://bar/x",
                "file:///nope",
                "s3:/",
                "http://",
                f"{base}/t-*.tar",
                f"{base}/p-*.parquet",
            ]
        ),
        st.text(max_size=12),
        weird_scalars,
    )
    spec = st.one_of(
        entries,
        st.lists(entries, max_size=4),
        st.tuples(entries, entries),
        st.just([]),
        st.sets(st.sampled_from(shard_sets["tar"])),
    )

    def check(case):
        fmt, urls = case
        samples, error = es_error_or_ok(lambda: _epoch(SOURCE_CLASSES[fmt](urls)), (EsPipeError,))
        if error is None:
            assert all(s["__shard__"] for s in samples)
        return outcome_of(error)

    sweep("shard lists", st.tuples(st.sampled_from(list(SOURCE_CLASSES)), spec), check, n)


# --------------------------------------------------------------------------- manifests


def _columns(n, seed=0):
    gen = np.random.default_rng(seed)
    return {
        "score": gen.random(n).astype(np.float32),
        "loss": gen.random(n).astype(np.float32),
        "visits": gen.integers(0, 9, n).astype(np.uint32),
        "step": gen.integers(0, 1000, n).astype(np.int32),
        "state": np.zeros(n, np.uint8),
    }


@pytest.fixture(scope="module")
def manifest_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifests") / "m"
    for epoch in (0, 1):
        m = Manifests(str(root))
        for i, shard in enumerate(["a.tar", "b.tar"]):
            m.write_shard(
                epoch,
                shard,
                _columns(30, i + epoch),
                keys=pa.array([f"k{j}" for j in range(30)]),
                factor=1.25,
            )
        m.finish(epoch)
        m.commit(epoch, hyper={"step": 7 + epoch})
    return root


def _json_mutations():
    """Edits of a commit marker's JSON: drop, retype or replace a field, anywhere."""
    json_values = st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-5, 2**40),
            st.floats(allow_nan=False),
            st.text(max_size=6),
        ),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=6,
    )
    paths = st.sampled_from(
        [
            "",
            "files",
            "files.0",
            "files.0.path",
            "files.0.size",
            "files.0.crc32",
            "files.0.shard",
            "files.1",
            "hyper",
            "hyper.step",
            "epoch",
            "schema_version",
            "format",
            "rows",
            "committed",
        ]
    )
    return st.tuples(paths, st.sampled_from(["drop", "set"]), json_values)


def _apply_json(marker, path, op, value):
    if not path:
        return value
    parts = path.split(".")
    node = marker
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.get(p)
        if node is None:
            return marker
    last = parts[-1]
    key = int(last) if isinstance(node, list) else last
    if isinstance(node, list) and key >= len(node):
        return marker
    if op == "drop":
        del node[key]
    else:
        node[key] = value
    return marker


def _byte_mutation():
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
        st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=32)),
    )


def _mutate_bytes(data: bytes, m) -> bytes:
    b = bytearray(data)
    at = min(int(m[1] * len(b)), max(len(b) - 1, 0))
    if m[0] == "truncate":
        return bytes(b[:at])
    if m[0] == "flip" and b:
        b[at] ^= 1 << m[2]
        return bytes(b)
    if m[0] == "overwrite":
        b[at : at + len(m[2])] = m[2]
    return bytes(b)


def _wrong_parquet(kind: str, good: bytes) -> bytes:
    """A manifest file with the wrong columns or types (es_pipe metadata kept)."""
    table = pq.read_table(io.BytesIO(good))
    if kind == "drop_column":
        table = table.drop_columns(["score"])
    elif kind == "retype":
        i = table.schema.get_field_index("visits")
        table = table.set_column(i, "visits", table.column("visits").cast(pa.float64()))
    elif kind == "extra_column":
        table = table.append_column("extra", pa.array(np.zeros(table.num_rows)))
    elif kind == "rows_shuffled":
        table = table.take(np.arange(table.num_rows)[::-1].copy())
    elif kind == "no_metadata":
        table = table.replace_schema_metadata(None)
    elif kind == "bad_metadata":
        meta = dict(table.schema.metadata)
        key = next(k for k in meta if k != b"ARROW:schema")
        meta[key] = b"{not json"
        table = table.replace_schema_metadata(meta)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _read_everything(root: str) -> str:
    """Every way of reading manifests: the API, the sampler's resume, es-pipe inspect."""
    m = Manifests(root)
    m.latest(required=True)
    m.read_epoch()
    for shard in ("a.tar", "b.tar"):
        m.read_shard(shard)
    es_pipe.Selector(
        es_pipe.Evolved(), 4, 2, eswp=es_pipe.ESWP(manifests=root, prune=es_pipe.Pruning(anneal=0))
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["inspect", root, "--no-progress", "--json"])
    return f"{rc}:{err.getvalue()}"


@pytest.mark.parametrize("n", SCALES)
def test_manifest_folders(n, manifest_root, tmp_path):
    """Corrupted commit markers (JSON edits and raw bytes), truncated or flipped Parquet
    manifests, manifests with wrong columns (also with a marker whose size and crc32 were
    fixed to match): ManifestError (or the API works), and ``es-pipe inspect`` exits 2 with
    a message, never a traceback."""
    counter = iter(range(10**9))

    def check(case):
        kind, target, mutation = case
        root = tmp_path / f"r{next(counter)}"
        shutil.copytree(manifest_root, root)
        marker_path = sorted((root / "_commits").iterdir())[-1]
        marker = json.loads(marker_path.read_text())
        entry = marker["files"][target]
        data_path = root / entry["path"]
        if kind == "marker_json":
            marker = _apply_json(marker, *mutation)
            marker_path.write_text(json.dumps(marker))
        elif kind == "marker_bytes":
            marker_path.write_bytes(_mutate_bytes(marker_path.read_bytes(), mutation))
        elif kind == "parquet_bytes":
            data_path.write_bytes(_mutate_bytes(data_path.read_bytes(), mutation))
        else:  # a rewritten manifest whose marker entry matches its bytes
            data = _wrong_parquet(mutation, data_path.read_bytes())
            data_path.write_bytes(data)
            if kind == "parquet_schema_fixed_marker":
                from es_pipe.manifests.fs import crc

                entry["size"], entry["crc32"] = len(data), crc(data)
                marker_path.write_text(json.dumps(marker))

        result, error = es_error_or_ok(lambda: _read_everything(str(root)), (EsPipeError,))
        if error is not None:  # inspect reads less than the API: it may still work
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli_main(["inspect", str(root), "--no-progress"])
            assert rc == 0 or (rc == 2 and "es-pipe inspect: error:" in err.getvalue())
        else:
            assert result.startswith("0:"), result
        return outcome_of(error)

    schema_kinds = st.sampled_from(
        ["drop_column", "retype", "extra_column", "rows_shuffled", "no_metadata", "bad_metadata"]
    )
    strategy = st.one_of(
        st.tuples(st.just("marker_json"), st.integers(0, 1), _json_mutations()),
        st.tuples(st.just("marker_bytes"), st.integers(0, 1), _byte_mutation()),
        st.tuples(st.just("parquet_bytes"), st.integers(0, 1), _byte_mutation()),
        st.tuples(st.just("parquet_schema"), st.integers(0, 1), schema_kinds),
        st.tuples(st.just("parquet_schema_fixed_marker"), st.integers(0, 1), schema_kinds),
    )
    sweep("manifest folders", strategy, check, n)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, manifest_root):
    d = tmp_path_factory.mktemp("cli")
    (d / "folder").mkdir()
    (d / "folder" / "a.txt").write_text("x")
    (d / "folder" / "a.cls").write_text("1")
    (d / "empty").mkdir()
    (d / "noext").mkdir()
    (d / "noext" / "README").write_text("x")
    pq.write_table(pa.table({"x": [1, 2, 3]}), d / "t.parquet")
    (d / "bad.parquet").write_bytes(b"PAR1 nope PAR1")
    (d / "bad.arrow").write_bytes(b"ARROW1 nope")
    (d / "bad.npz").write_bytes(b"PK nope")
    np.savez(d / "obj.npz", a=np.array([{"a": 1}], dtype=object))
    np.savez(d / "ragged.npz", a=np.arange(3), b=np.arange(4))
    (d / "x.txt").write_text("x")
    return d, manifest_root


def _options(pairs):
    """Well-formed option lists: 0 to 3 options from ``pairs``, flattened."""
    return st.lists(st.sampled_from(pairs), max_size=3).map(
        lambda chosen: [token for option in chosen for token in option]
    )


@pytest.mark.parametrize("n", SCALES)
def test_cli_arguments(n, cli_files, tmp_path):
    """``es_pipe.tools.cli.main`` with random and invalid arguments: an exit status (argparse's
    SystemExit(2) included) and a message; never a traceback. ``demo`` always gets an
    invalid option, so that it exits in argparse instead of training."""
    d, manifests = cli_files
    counter = iter(range(10**9))
    paths = [
        str(d / p)
        for p in (
            "folder",
            "empty",
            "noext",
            "t.parquet",
            "bad.parquet",
            "bad.arrow",
            "bad.npz",
            "obj.npz",
            "ragged.npz",
            "x.txt",
            "nope",
            "nope.parquet",
        )
    ] + [str(manifests), "foo://x", ""]
    text = st.one_of(
        st.text(max_size=8),
        st.sampled_from(paths),
        st.integers(-3, 5).map(str),
        st.sampled_from(["nan", "inf", "1e9", "-"]),
    )
    shard = st.tuples(
        st.just("shard"),
        st.sampled_from(paths),
        st.sampled_from(
            [
                "out-%03d.tar",
                "out-%03d.parquet",
                "out.tar",
                "out-%s-%d.tar",
                "/proc/nope/x-%d.tar",
                "foo://x/y-%d.tar",
                "",
            ]
        ),
        st.one_of(
            _options(
                [("--format", "tar"), ("--format", "parquet"), ("--format", "json")]
                + [(o, v) for o in ("--per-shard", "--row-group") for v in ("0", "-2", "1", "x")]
            ),
            st.lists(
                st.one_of(
                    st.sampled_from(
                        ["--format", "--per-shard", "--row-group", "tar", "parquet", "json"]
                    ),
                    text,
                ),
                max_size=4,
            ),
        ),
    )
    inspect = st.tuples(
        st.just("inspect"),
        st.sampled_from(paths),
        st.one_of(
            _options(
                [("--epoch", e) for e in ("0", "1", "7", "-1")]
                + [("--shard", v) for v in ("a.tar", "tar", "zzz", "")]
                + [("--key", v) for v in ("k3", "nope", "")]
                + [("--diff", "0", "1"), ("--diff", "1", "9"), ("--json",), ("--no-progress",)]
                + [("--top", v) for v in ("-1", "0", "3")]
                + [("--plot",)]
            ),
            st.lists(
                st.one_of(
                    st.sampled_from(
                        [
                            "--epoch",
                            "--shard",
                            "--key",
                            "--diff",
                            "--json",
                            "--top",
                            "--plot",
                            "--no-progress",
                            "0",
                            "1",
                            "a.tar",
                            "k3",
                            "7",
                        ]
                    ),
                    text,
                ),
                max_size=5,
            ),
        ),
    )
    other = st.lists(
        st.one_of(
            st.sampled_from(["demo", "shard", "inspect", "bench", "--version", "--help", "-h"]),
            text,
        ),
        max_size=4,
    )

    def check(case):
        if isinstance(case, tuple):  # shard or inspect, with paths
            argv = [case[0], case[1]]
            if case[0] == "shard":
                out = case[2]
                argv.append(
                    out
                    if out.startswith(("/", "foo:")) or not out
                    else str(tmp_path / f"o{next(counter)}" / out)
                )
                argv += case[3]
            else:
                argv += [
                    str(tmp_path / f"p{next(counter)}.png") if a == "--plot" else a for a in case[2]
                ]
                if "--plot" in argv and argv.index("--plot") == len(argv) - 1:
                    argv.append(str(tmp_path / "last.png"))
        else:
            argv = list(case)
            if "demo" in argv:  # never train: an invalid option makes argparse exit first
                argv += ["--epochs", "0"]
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = cli_main(argv)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            assert exc.code in (0, 2), (argv, exc.code)
            return f"SystemExit({exc.code})"
        assert rc in (0, 1, 2), (argv, rc)
        if rc:
            assert "es-pipe" in err.getvalue() or not argv, (argv, err.getvalue())
        return f"exit {rc}"

    strategy = st.one_of(shard, shard, inspect, inspect, other)
    sweep("CLI arguments", strategy, check, n)


# --------------------------------------------------------------------------- regressions


def _collated(samples):
    return next(
        iter(tn.Loader(es_pipe.SelectStage(samples, es_pipe.Selector(es_pipe.Evolved(), 4, 2))))
    )


def _with(n, index, **fields):
    samples = _samples(n)
    samples[index].update(fields)
    return samples


# One example per library bug the sweep found (each was a raw error or a crash).
REGRESSIONS = {
    "unreadable losses": (FeedbackError, "could not be read",
                          lambda: check_losses(["a", None, 1.0], 3, True)),
    "sparse losses": (FeedbackError, "dense",
                      lambda: check_losses(torch.ones(3).to_sparse(), 3, True)),
    "losses beyond float32": (FeedbackError, "float32",  # would be stored as inf scores
                              lambda: check_losses(np.array([1e300, 1.0, 1.0]), 3, True)),
    "burn_in of a str": (ConfigError, "burn_in",
                         lambda: es_pipe.Selector(es_pipe.Evolved(), 4, 2, burn_in=es_pipe.Steps("3"))),
    "total_steps of a str": (ConfigError, "total_steps",
                             lambda: es_pipe.Selector(es_pipe.Evolved(), 4, 2, anneal=3, total_steps="10")),
    "policy of a str": (ConfigError, "policy", lambda: es_pipe.Selector("es", 4, 2)),
    "rank of a str": (ConfigError, "rank",
                      lambda: WebDatasetSource("x.tar", rank="0", world_size=1)),
    "open brace": (ConfigError, "braces", lambda: WebDatasetSource("x-{000..")),
    "negative seed": (ConfigError, "seed", lambda: ParquetSource("x.parquet", seed=-1)),
    "columns of a str": (ConfigError, "columns",
                         lambda: ParquetSource("x.parquet", columns="xy")),
    # allocated 16 TB of scores before
    "huge __index__": (ConfigError, "__index__", lambda: _collated(_with(4, 2, __index__=10**12))),
    "ragged tensors": (ConfigError, "collate_fn",
                       lambda: _collated(_with(4, 1, x=torch.zeros(5)))),
    "unknown protocol": (ConfigError, "Protocol", lambda: Manifests("foo://x")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions_found_by_the_sweep(name):
    error, message, call = REGRESSIONS[name]
    with pytest.raises(error, match=message):
        call()


def test_the_regressions_neighbours_still_work():
    """The inputs next to the regressions above are accepted and mean what they say."""
    assert float(check_losses([1.0, 2.0], 2, True).sum()) == 3.0
    assert Identity.of(["s"], ["k"], [0]).ordinals.tolist() == [0]
    assert len(_collated(_samples(4))) == 4
