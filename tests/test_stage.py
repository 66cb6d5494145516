"""The stage, its feedback channel and its checkpoint contract."""

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchdata.nodes as tn
from _sweep import (
    SCALES,
    es_error_or_ok,
    outcome_of,
    raises_as_recorded,
    sweep,
    sweep_samples,
    weird_scalars,
)
from conftest import ROOT
from hypothesis import strategies as st

import es_pipe
from es_pipe.errors import ConfigError, FeedbackError
from es_pipe.sampler import Identity, check_losses


def fake_losses(meta, step: int) -> torch.Tensor:
    """Deterministic per-sample losses that drift with the step, like a training model's."""
    return (meta.data["x"].abs().sum(1) * (1.0 + 0.1 * step)) % 3.0


def make(samples, beta1=0.2, beta2=0.8, **options):
    options = {"meta_batch_size": 8, "batch_size": 3, "seed": 5, **options}
    sampler = es_pipe.Selector(es_pipe.Evolved(beta1, beta2), **options)
    return sampler, tn.Loader(es_pipe.SelectStage(samples, sampler))


def snapshot(sampler):
    return {name: values.copy() for name, values in sampler.store.shard("shard-0").items()}


def test_meta_batch_and_selection_shapes(samples):
    sampler, loader = make(samples)
    metas = []
    for meta in loader:
        sub = meta.select(fake_losses(meta, sampler.step))
        metas.append((len(meta), len(sub), sub.data["x"].shape[0]))
    # 50 = 6 * 8 + 2: the short last meta-batch gets round(3 * 2 / 8) = 1, not dropped
    assert metas == [(8, 3, 3)] * 6 + [(2, 1, 1)]
    assert sampler.epoch == 1
    assert sampler.store.held == 50
    assert (sampler.store.shard("shard-0")["visits"] == 1).all()


def test_selected_rows_are_the_rows_of_the_chosen_members(samples):
    _sampler, loader = make(samples)
    meta = next(iter(loader))
    sub = meta.select(fake_losses(meta, 0))
    torch.testing.assert_close(sub.data["x"], meta.data["x"][sub.indices])
    assert sub.keys == [meta.keys[i] for i in sub.indices.tolist()]


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (torch.ones(7), "shape"),
        (torch.ones(8, 2), "shape"),
        (torch.ones(8, dtype=torch.int64), "dtype"),
        (torch.tensor([1.0] * 7 + [float("nan")]), "NaN"),
        (torch.tensor([1.0] * 7 + [float("inf")]), "NaN or infinite"),
        (torch.tensor([1.0] * 7 + [-0.5]), "negative"),
        ("0.5", "tensor"),
        (None, "needs its losses"),
    ],
)
def test_bad_losses_raise_and_change_nothing(samples, losses, message):
    sampler, loader = make(samples)
    it = iter(loader)
    meta = next(it)
    meta.select(fake_losses(meta, 0))
    meta = next(it)
    before_scores, before_state = snapshot(sampler), sampler.get_state()
    with pytest.raises(FeedbackError, match=message):
        meta.select(losses)
    assert sampler.get_state() == before_state
    for column, values in snapshot(sampler).items():
        np.testing.assert_array_equal(values, before_scores[column])
    sub = meta.select(fake_losses(meta, 1))  # the meta-batch is still answerable
    assert len(sub) == 3


def test_answered_twice_stale_and_unanswered_are_errors(samples):
    _sampler, loader = make(samples)
    it = iter(loader)
    first = next(it)
    with pytest.raises(FeedbackError, match="never answered"):
        next(it)
    first.select(fake_losses(first, 0))
    with pytest.raises(FeedbackError, match="already answered"):
        first.select(fake_losses(first, 0))
    second = next(it)
    with pytest.raises(FeedbackError, match="already answered"):
        first.select(fake_losses(first, 0))
    second.select(fake_losses(second, 1))
    third = next(it)
    it2 = iter(loader)  # a reset retires the current meta-batch
    with pytest.raises(FeedbackError, match="no longer current"):
        third.select(fake_losses(third, 2))
    assert next(it2) is not None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 9}, "batch_size=9 > meta_batch_size=8"),
        ({"beta1": 1.2}, "outside"),
        ({"meta_batch_size": 0}, "positive"),
        ({"seed": -1}, "seed"),
        ({"scoring": "online"}, "scoring"),
        ({"anneal": 3}, "total_steps"),
    ],
)
def test_invalid_hyper_parameters(samples, options, message):
    with pytest.raises(ConfigError, match=message):
        make(samples, **options)


def test_samples_without_keys_get_a_clear_error():
    sampler = es_pipe.Selector(es_pipe.Evolved(), 4, 2)
    with pytest.raises(ConfigError, match="__key__"):
        next(iter(tn.Loader(es_pipe.SelectStage([{"x": 1}] * 4, sampler))))


def test_burn_in_is_uniform_and_anneal_needs_no_losses(samples):
    sampler, loader = make(samples, burn_in=2, anneal=2, total_steps=7)
    phases, needs = [], []
    for meta in loader:
        needs.append(meta.needs_losses)
        sub = meta.select(fake_losses(meta, sampler.step) if meta.needs_losses else None)
        phases.append(sub.phase)
    assert phases == ["burn_in"] * 2 + ["evolve"] * 3 + ["anneal"] * 2
    assert needs == [True] * 5 + [False] * 2


def test_selection_prefers_high_weights(samples):
    """With a fixed loss landscape, high-loss samples are chosen far more often."""
    hot = {f"k{i:05d}" for i in range(0, 50, 5)}
    counts = dict.fromkeys(hot, 0)
    _sampler, loader = make(samples, beta1=0.0, beta2=0.0)
    for _ in range(30):
        for meta in loader:
            losses = torch.tensor([5.0 if k in hot else 0.1 for k in meta.keys])
            for key in meta.select(losses).keys:
                counts[key] = counts.get(key, 0) + 1
    hot_rate = sum(counts[k] for k in hot) / (30 * len(hot))
    cold_rate = sum(v for k, v in counts.items() if k not in hot) / (30 * 40)
    assert hot_rate > 0.9 and cold_rate < 0.3  # uniform would pick each 3/8 of the time


def test_callback_form_and_plain_iterable_wrapper(samples):
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=1)
    node = es_pipe.SelectStage(samples, sampler, loss_fn=lambda data: data["x"].abs().sum(1))
    subs = list(tn.Loader(node))
    assert all(isinstance(s, es_pipe.SubBatch) for s in subs)
    assert sum(len(s) for s in subs) == 6 * 4 + 1
    sampler2 = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=1)
    wrapped = tn.Loader(
        es_pipe.SelectStage(samples, sampler2, loss_fn=lambda data: data["x"].abs().sum(1))
    )
    assert [s.keys for s in wrapped] == [s.keys for s in subs]


def test_history_scoring_updates_from_reported_training_losses(samples):
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, scoring="history", seed=2)
    for meta in tn.Loader(es_pipe.SelectStage(samples, sampler)):
        assert not meta.needs_losses
        sub = meta.select()
        sub.report(sub.data["x"].abs().sum(1))
        with pytest.raises(FeedbackError, match="already reported"):
            sub.report(sub.data["x"].abs().sum(1))
    visits = sampler.store.shard("shard-0")["visits"]
    assert visits.sum() == 6 * 4 + 1
    forward = es_pipe.Selector(es_pipe.Evolved(), 8, 4)
    meta = next(iter(tn.Loader(es_pipe.SelectStage(samples, forward))))
    with pytest.raises(FeedbackError, match="history"):
        meta.select(fake_losses(meta, 0)).report(torch.ones(4))


def test_history_scoring_refuses_to_go_on_without_a_report(samples):
    """Issue 11, item 11: a sub-batch never reported under history scoring is an error at
    the next meta-batch (also at the end of the epoch), with nothing changed; once it is
    reported, the run goes on. A real model, trained on the selected samples."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, scoring="history", seed=2)
    it = iter(tn.Loader(es_pipe.SelectStage(samples, sampler)))
    steps = 0
    while True:
        try:
            meta = next(it)
        except StopIteration:
            break
        sub = meta.select()
        per = torch.nn.functional.cross_entropy(
            model(sub.data["x"]), sub.data["y"], reduction="none"
        )
        opt.zero_grad()
        per.mean().backward()
        opt.step()
        if steps in (1, 6):  # a middle step and the epoch's last (short) one
            before, scores = sampler.get_state(), snapshot(sampler)
            with pytest.raises(FeedbackError, match=r"never reported.*sub\.report\(losses\)"):
                next(it)
            assert sampler.get_state() == before
            for column, values in snapshot(sampler).items():
                np.testing.assert_array_equal(values, scores[column])
        sub.report(per.detach())
        steps += 1
    assert steps == 7 and sampler.epoch == 1
    assert (sampler.store.shard("shard-0")["visits"] > 0).sum() > 7


def test_reweighting_gives_importance_weights(samples):
    _sampler, loader = make(samples, reweight=True)
    meta = next(iter(loader))
    sub = meta.select(fake_losses(meta, 0))
    assert sub.weights is not None and sub.weights.shape == (3,)
    assert torch.isfinite(sub.weights).all() and (sub.weights > 0).all()
    _plain_sampler, plain = make(samples)
    meta = next(iter(plain))
    assert meta.select(fake_losses(meta, 0)).weights is None


# ----------------------------------------------------------------------- checkpoints


def run(loader, sampler, steps, trace):
    """Drive ``steps`` meta-batches over epochs; record selections and scores."""
    it = iter(loader)
    while steps:
        try:
            meta = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        sub = meta.select(fake_losses(meta, sampler.step))
        trace.append((sampler.epoch, sub.keys, sub.indices.tolist()))
        steps -= 1
    return it


@pytest.mark.parametrize("split", [1, 4, 6, 7, 9, 15])  # 7 steps/epoch: 6, 7 are the boundary
def test_resume_is_bit_identical(samples, tmp_path, split):
    total = 20
    sampler, loader = make(samples)
    full = []
    run(loader, sampler, total, full)
    reference = snapshot(sampler)

    sampler, loader = make(samples)
    head = []
    run(loader, sampler, split, head)
    torch.save({"loader": loader.state_dict(), "scores": sampler.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    json.dumps(saved["loader"])  # the node state is JSON-friendly

    sampler, loader = make(samples)
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    tail = []
    run(loader, sampler, total - split, tail)
    assert head + tail == full
    for column, values in snapshot(sampler).items():
        np.testing.assert_array_equal(values, reference[column], err_msg=column)


def test_checkpoint_between_emit_and_select_re_emits_the_meta_batch(samples):
    sampler, loader = make(samples)
    it = iter(loader)
    for step in range(2):
        meta = next(it)
        meta.select(fake_losses(meta, step))
    pending = next(it)  # emitted, not answered
    state, scores = loader.state_dict(), sampler.state_dict()
    expected = pending.select(fake_losses(pending, 2))

    sampler2, loader2 = make(samples)
    loader2.load_state_dict(state)
    sampler2.load_state_dict(scores)
    again = next(iter(loader2))
    assert again.keys == pending.keys
    assert again.select(fake_losses(again, 2)).keys == expected.keys


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from conftest import keyed_samples
        from test_stage import make, run
        sampler, loader = make(keyed_samples(50))
        mode = sys.argv[1]
        trace = []
        if mode == "resume":
            saved = torch.load(sys.argv[2], weights_only=True)
            loader.load_state_dict(saved["loader"]); sampler.load_state_dict(saved["scores"])
            run(loader, sampler, 8, trace)
        elif mode == "save":
            run(loader, sampler, 5, trace)
            torch.save({{"loader": loader.state_dict(), "scores": sampler.state_dict()}},
                       sys.argv[2])
        else:
            run(loader, sampler, 13, trace)
        print(json.dumps({{"trace": trace, "scores": sampler.store.shard("shard-0")["score"].tolist()}}))
        """
    )
    ck = str(tmp_path / "ck.pt")

    def call(*args):
        out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    full = call("full")
    head = call("save", ck)
    tail = call("resume", ck)
    assert head["trace"] + tail["trace"] == full["trace"]
    assert tail["scores"] == full["scores"]


def test_restoring_with_another_seed_is_refused(samples):
    sampler, loader = make(samples)
    run(loader, sampler, 2, [])
    state = loader.state_dict()
    _other_sampler, other = make(samples, seed=6)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        next(iter(other))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_selection_runs_on_the_losses_device(samples):
    _sampler, loader = make(samples, reweight=True)
    meta = next(iter(loader))
    sub = meta.select(fake_losses(meta, 0).cuda())
    assert sub.indices.device.type == "cuda" and sub.weights.device.type == "cuda"
    assert sub.data["x"].device.type == "cpu"  # rows stay where the data lives


# ----------------------------------------------------------------------- damaged states


def _checkpoint(samples, steps=9):
    sampler, loader = make(samples)
    run(loader, sampler, steps, [])
    return loader.state_dict(), sampler.state_dict()


def _legacy(state):
    """The same state as es_pipe wrote it at 3d23362: no kind, no version."""
    return {k: v for k, v in state.items() if k not in ("kind", "version")}


def test_states_carry_kind_and_version_and_old_ones_still_load(samples, tmp_path):
    loader_state, scores = _checkpoint(samples)
    position = loader_state["root"]["sampler"]
    assert (position["kind"], position["version"]) == ("es_pipe.sampler.position", 1)
    assert (scores["kind"], scores["version"]) == ("es_pipe.sampler.scores", 1)
    expected_sampler, expected_loader = make(samples)
    expected_loader.load_state_dict(loader_state)
    expected_sampler.load_state_dict(scores)
    expected: list = []
    run(expected_loader, expected_sampler, 8, expected)

    old = {**loader_state, "root": {**loader_state["root"], "sampler": _legacy(position)}}
    sampler, loader = make(samples)
    loader.load_state_dict(old)
    sampler.load_state_dict(_legacy(scores))
    got: list = []
    run(loader, sampler, 8, got)
    assert got == expected
    assert snapshot(sampler).keys() == snapshot(expected_sampler).keys()
    for column, values in snapshot(sampler).items():
        np.testing.assert_array_equal(values, snapshot(expected_sampler)[column])


def _damage_scores(scores, how):
    table = dict(scores["scores"])
    if how == "nan score":
        table["score"] = table["score"].clone()
        table["score"][3] = float("nan")
    elif how == "negative visits":
        table["visits"] = table["visits"].clone()
        table["visits"][0] = -1
    elif how == "float visits":
        table["visits"] = table["visits"].double()
    elif how == "short column":
        table["loss"] = table["loss"][:-1]
    elif how == "lengths":
        table["lengths"] = [n + 1 for n in table["lengths"]]
    elif how == "no shards":
        del table["shards"]
    elif how == "numpy column":
        table["score"] = table["score"].numpy()
    elif how == "pruning epoch":
        return {**scores, "pruning": {"epoch": -1, "shards": {}}}
    elif how == "pruning state":
        decision = {"state": torch.full((4,), 0.5), "factor": 2.0}
        return {**scores, "pruning": {"epoch": 1, "shards": {"shard-0": decision}}}
    elif how == "pruning factor":
        decision = {"state": torch.zeros(4, dtype=torch.uint8), "factor": float("nan")}
        return {**scores, "pruning": {"epoch": 1, "shards": {"shard-0": decision}}}
    elif how == "key book":
        return {**scores, "keys": {"shard-0": [3, 4]}}
    else:
        return how
    return {**scores, "scores": table}


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("nan score", "NaN"),
        ("negative visits", "visits"),
        ("float visits", "dtype"),
        ("short column", "1-D tensor"),
        ("lengths", "1-D tensor"),
        ("no shards", "shards"),
        ("numpy column", "1-D tensor"),
        ("pruning epoch", "no epoch"),
        ("pruning state", "uint8"),
        ("pruning factor", "factor"),
        ("key book", "keys"),
        ({"kind": "es_pipe.sampler.position", "version": 1}, "not the sampler score table"),
        ({"kind": "es_pipe.sampler.scores", "version": 2}, "newer es_pipe"),
        ({"version": "1", "scores": {}}, "damaged"),
        ({}, "no 'scores' entry"),
        ([1, 2], "not a dict"),
    ],
)
def test_a_damaged_score_table_is_refused_and_changes_nothing(samples, how, message):
    _, scores = _checkpoint(samples)
    sampler, loader = make(samples)
    run(loader, sampler, 3, [])
    before, position = snapshot(sampler), sampler.get_state()
    with pytest.raises(ConfigError, match=message):
        sampler.load_state_dict(_damage_scores(scores, how))
    assert sampler.get_state() == position
    for column, values in snapshot(sampler).items():
        np.testing.assert_array_equal(values, before[column])
    sampler.load_state_dict(scores)  # the intact one loads


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": -1}, "step=-1"),
        ({"epoch": "1"}, "epoch='1'"),
        ({"steps_in_epoch": None}, "steps_in_epoch=None"),
        ({"world_size": 0}, "world_size=0"),
        ({"merged": "yes"}, "merged"),
        ({"kind": "es_pipe.sampler.scores"}, "not the sampler position"),
        ({"version": 7}, "newer es_pipe"),
        ({"seed": None}, "seed=None"),
    ],
)
def test_a_damaged_position_is_refused_and_changes_nothing(samples, change, message):
    loader_state, _ = _checkpoint(samples)
    root = loader_state["root"]
    damaged = {**loader_state, "root": {**root, "sampler": {**root["sampler"], **change}}}
    sampler, loader = make(samples)
    run(loader, sampler, 3, [])
    position = sampler.get_state()
    loader.load_state_dict(damaged)
    with pytest.raises(ConfigError, match=message):
        iter(loader)
    assert sampler.get_state() == position
    loader.load_state_dict(loader_state)
    iter(loader)
    assert sampler.get_state() == root["sampler"]


@pytest.mark.parametrize("change", [{"done": "yes"}, {"exhausted": None}, "missing"])
def test_a_damaged_stage_state_is_refused(samples, change):
    loader_state, _ = _checkpoint(samples)
    root = dict(loader_state["root"])
    if change == "missing":
        del root["done"]
    else:
        root.update(change)
    _sampler, loader = make(samples)
    loader.load_state_dict({**loader_state, "root": root})
    with pytest.raises(ConfigError, match="stage"):
        iter(loader)


def test_float8_losses_select_like_their_float32_values(samples):
    """Losses in a float8 format are read as the float32 values they are; a format that
    cannot be converted is a FeedbackError that changes nothing."""
    narrow, loader = make(samples)
    wide, wide_loader = make(samples)
    for meta, twin in zip(loader, wide_loader):
        losses = fake_losses(meta, narrow.step).to(torch.float8_e4m3fn)
        assert meta.select(losses).keys == twin.select(losses.float()).keys
    for column, values in snapshot(narrow).items():
        np.testing.assert_array_equal(values, snapshot(wide)[column])

    history = es_pipe.Selector(es_pipe.Evolved(), 8, 3, scoring="history", seed=5)
    sub = next(iter(tn.Loader(es_pipe.SelectStage(samples, history)))).select()
    before = snapshot(history)
    packed = torch.zeros(3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(FeedbackError, match=r"float4_e2m1fn_x2.*losses\.float"):
        sub.report(packed)
    for column, values in snapshot(history).items():
        np.testing.assert_array_equal(values, before[column])
    sub.report(torch.ones(3, dtype=torch.float8_e5m2))
    assert snapshot(history)["visits"].sum() == 3


# --------------------------------------------------------------------------- swept bad inputs
# Hypothesis sweeps (tests/_sweep.py): every input gives a correct result or an es_pipe
# error with a message, never a raw exception or a hang; a rejected call changes no state.


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


@pytest.mark.usefixtures("quiet")
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


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_meta_batch_select_rejects_bad_losses_without_a_trace(n):
    """A rejected ``select`` changes no score, step or RNG position: the next good answer
    selects exactly what a sampler that never saw the bad losses selects."""

    def check(case):
        policy, bad, good = case
        sampler, twin = _twin_samplers(policy)
        loaders = [tn.Loader(es_pipe.SelectStage(sweep_samples(20), s)) for s in (sampler, twin)]
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


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_sub_batch_report_rejects_bad_losses_without_a_trace(n):
    def check(bad):
        sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 3, seed=1, scoring="history")
        it = iter(tn.Loader(es_pipe.SelectStage(sweep_samples(16), sampler)))
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


@pytest.mark.usefixtures("quiet")
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
        samples = sweep_samples(draw(st.integers(0, 9)))
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


def _collated(samples):
    return next(
        iter(tn.Loader(es_pipe.SelectStage(samples, es_pipe.Selector(es_pipe.Evolved(), 4, 2))))
    )


def _with(n, index, **fields):
    samples = sweep_samples(n)
    samples[index].update(fields)
    return samples


# One example per library bug the bad-input sweep found in losses and sample dicts (each was a raw
# error or a crash).
REGRESSIONS = {
    "unreadable losses": (FeedbackError, "could not be read",
                          lambda: check_losses(["a", None, 1.0], 3, True)),
    "sparse losses": (FeedbackError, "dense",
                      lambda: check_losses(torch.ones(3).to_sparse(), 3, True)),
    "losses beyond float32": (FeedbackError, "float32",  # would be stored as inf scores
                              lambda: check_losses(np.array([1e300, 1.0, 1.0]), 3, True)),
    # allocated 16 TB of scores before
    "huge __index__": (ConfigError, "__index__", lambda: _collated(_with(4, 2, __index__=10**12))),
    "ragged tensors": (ConfigError, "collate_fn",
                       lambda: _collated(_with(4, 1, x=torch.zeros(5)))),
}  # fmt: skip


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions_found_by_the_sweep(name):
    raises_as_recorded(*REGRESSIONS[name])


@pytest.mark.usefixtures("quiet")
def test_the_regressions_neighbours_still_work():
    """The inputs next to the regressions above are accepted and mean what they say."""
    assert float(check_losses([1.0, 2.0], 2, True).sum()) == 3.0
    assert Identity.of(["s"], ["k"], [0]).ordinals.tolist() == [0]
    assert len(_collated(sweep_samples(4))) == 4


class _RestartingOnIter:
    """An iterable that is its own iterator and starts over whenever ``iter()`` is called
    on it (as litdata's ``StreamingDataset`` does): only ``next()`` may be used to go on."""

    def __init__(self, n: int) -> None:
        self.n, self.at = n, 0

    def __iter__(self) -> "_RestartingOnIter":
        self.at = 0
        return self

    def __next__(self) -> dict:
        if self.at >= self.n:
            raise StopIteration
        self.at += 1
        return {"__key__": str(self.at - 1), "__shard__": "s", "x": torch.tensor([self.at - 1])}


def test_an_iterable_that_restarts_on_iter_is_read_once_in_order():
    sampler = es_pipe.Selector(es_pipe.Uniform(), 8, 8, seed=0)
    keys = []
    for meta in tn.Loader(es_pipe.SelectStage(_RestartingOnIter(20), sampler)):
        keys.append(list(meta.keys))
        meta.select(None)
    assert keys == [[str(i) for i in range(s, min(s + 8, 20))] for s in (0, 8, 16)]
