"""The columnar path (``ParquetSource``/``ArrowSource(columnar=True)``) against the dict path.

Shards are written by pyarrow itself. On the same data and seed, both paths must give the
same meta-batches (payload tensors, keys), the same selections, the same score tables and
the same manifests; a checkpoint taken anywhere (inside a chunk too) must resume the
columnar run bit for bit.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn
from torch.utils.data import DataLoader

import es_pipe
from es_pipe.columns import ColumnChunk
from es_pipe.errors import ConfigError
from es_pipe.manifests import Manifests
from es_pipe.sources import ArrowSource, ParquetSource, SourceDataset

SIZES = [70, 45, 93, 31]
IDENTITY = ("__key__", "__shard__", "__index__")


def _table(s: int, n: int) -> pa.Table:
    rng = np.random.default_rng(s)
    return pa.table(
        {
            "key": [f"s{s}-{i:03d}" for i in range(n)],
            "x": rng.normal(size=n).astype(np.float32),
            "label": rng.integers(0, 10, n),
            "flag": rng.random(n) > 0.5,
            "tokens": pa.array(
                list(rng.integers(0, 50, (n, 6)).astype(np.int32)), pa.list_(pa.int32())
            ),
            "emb": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.normal(size=n * 3), pa.float64()), 3
            ),
            "text": [f"row {i} of {s}" for i in range(n)],
        }
    )


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("columnar-parquet")
    urls = []
    for s, n in enumerate(SIZES):
        pq.write_table(_table(s, n), folder / f"p{s}.parquet", row_group_size=16)
        urls.append(str(folder / f"p{s}.parquet"))
    return urls


@pytest.fixture(scope="module")
def arrow(tmp_path_factory):
    folder = tmp_path_factory.mktemp("columnar-arrow")
    urls = []
    for s, n in enumerate(SIZES):
        table = _table(s, n)
        path = folder / f"a{s}.arrow"
        # file format for even shards, stream format for odd ones; batches of 20 rows
        opener = pa.ipc.new_file if s % 2 == 0 else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=20):
                writer.write_batch(batch)
        urls.append(str(path))
    return urls


def _losses(meta, step: int) -> torch.Tensor:
    return meta.data["x"].abs() + 0.01 * meta.data["label"] + 0.1 * (step % 3)


def _payload(data: dict) -> dict:
    return {name: value for name, value in data.items() if name not in IDENTITY}


def _same(a, b) -> None:
    """Two meta-batches are the same: the same fields in the same order (identity fields
    included), equal values of equal types."""
    assert list(a) == list(b)
    for name, value in a.items():
        other = b[name]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype, name
            assert torch.equal(value, other), name
        else:
            assert value == other, name


def _sampler(B=24, b=8, **options):
    return es_pipe.Selector(es_pipe.Evolved(), B, b, seed=3, total_epochs=4, **options)


def _trace(loader, sampler, epochs: int, save_at=None):
    """Run ``epochs`` epochs; return the steps (epoch, meta data, keys, selection) and, with
    ``save_at``, the checkpoint taken after that many steps (the run stops there)."""
    steps = []
    for _ in range(epochs):
        for meta in loader:
            sub = meta.select(_losses(meta, sampler.step))
            w = None if sub.weights is None else sub.weights.tolist()
            steps.append((sampler.epoch, meta.data, meta.keys, sub.indices.tolist(), sub.keys, w))
            if len(steps) == save_at:
                buffer = io.BytesIO()
                state = {"loader": loader.state_dict(), "scores": sampler.state_dict()}
                torch.save({**state, "epoch": sampler.epoch}, buffer)
                buffer.seek(0)
                return steps, torch.load(buffer, weights_only=True)
    return steps, None


def _compare(dict_steps, col_steps) -> None:
    assert len(dict_steps) == len(col_steps)
    for (e1, d1, k1, i1, s1, w1), (e2, d2, k2, i2, s2, w2) in zip(
        dict_steps, col_steps, strict=True
    ):
        assert (e1, k1, i1, s1, w1) == (e2, k2, i2, s2, w2)
        _same(d1, d2)


def _build(urls, kind, columnar, sampler, **options):
    cls = ParquetSource if kind == "parquet" else ArrowSource
    return cls(urls, columnar=columnar, seed=1, **options)


@pytest.mark.parametrize(
    "kind,options",
    [
        ("parquet", {}),
        ("parquet", {"key_column": "key", "shuffle": True}),
        ("parquet", {"shuffle_rows": True, "shuffle_window": 30, "batch_rows": 10}),
        ("parquet", {"columns": ["x", "label", "tokens"], "key_column": "key"}),
        ("arrow", {}),
        ("arrow", {"key_column": "key", "shuffle_rows": True, "shuffle": True}),
    ],
)
def test_columnar_meta_batches_selections_and_scores_equal_the_dict_path(
    parquet, arrow, kind, options
):
    urls = parquet if kind == "parquet" else arrow
    runs = {}
    for columnar in (False, True):
        sampler = _sampler(burn_in=2)
        source = _build(urls, kind, columnar, sampler, **options)
        stage = es_pipe.SelectStage(source, sampler)
        runs[columnar] = (_trace(tn.Loader(stage), sampler, 3)[0], sampler)
    _compare(runs[False][0], runs[True][0])
    assert all(isinstance(d["x"], torch.Tensor) for _, d, *_ in runs[True][0])
    for _, d, keys, *_ in runs[True][0]:  # the dict path's identity fields, from the arrays
        assert {"__key__", "__shard__"} <= set(d) and d["__key__"] == keys
        assert d["__index__"].dtype == torch.int64
    a, b = runs[False][1].store, runs[True][1].store
    slots = lambda store: store.locate(  # noqa: E731
        [u for u, n in zip(urls, SIZES, strict=True) for _ in range(n)],
        None,
        np.concatenate([np.arange(n) for n in SIZES]),
    )
    for column in ("score", "visits"):
        np.testing.assert_array_equal(
            a.gather(slots(a), (column,))[column], b.gather(slots(b), (column,))[column]
        )


def _eswp(urls, root, columnar, hook=True, key_column="key", **source_options):
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        16,
        5,
        seed=5,
        total_epochs=3,
        rank=0,
        world_size=1,
        eswp=es_pipe.ESWP(
            prune=es_pipe.Pruning(ratio=0.5, anneal=0),
            manifests=None if root is None else str(root),
        ),
    )
    source = ParquetSource(
        urls,
        key_column=key_column,
        shuffle=True,
        seed=5,
        batch_rows=12,
        columnar=columnar,
        pruned=sampler.pruned if hook else None,
        **source_options,
    )
    stage = es_pipe.SelectStage(source, sampler)
    return sampler, stage, tn.Loader(stage)


def _epochs(root) -> dict:
    m = Manifests(str(root))
    return {e: m.read_epoch(e).to_pydict() for e in m.committed()}


@pytest.mark.filterwarnings("ignore:epoch .* read and decoded")
@pytest.mark.parametrize(
    "hook,key_column",
    [(True, "key"), (False, "key"), (True, None)],
    ids=["pruned-hook", "stage-drops", "row-number-keys"],
)
def test_eswp_with_manifests_equals_the_dict_path(parquet, tmp_path, hook, key_column):
    traces, stages = {}, {}
    for columnar in (False, True):
        root = tmp_path / str(columnar)
        sampler, stage, loader = _eswp(parquet, root, columnar, hook, key_column)
        traces[columnar] = _trace(loader, sampler, 3)[0]
        stages[columnar] = stage
    _compare(traces[False], traces[True])
    assert any(w is not None and max(w) > 1 for *_, w in traces[True])  # 1/keep weights
    assert stages[True].pruned_by_stage == stages[False].pruned_by_stage
    assert (stages[True].pruned_by_stage > 0) == (not hook)
    assert _epochs(tmp_path / "False") == _epochs(tmp_path / "True")


@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize("split", [1, 2, 5, 9, 14, 20])  # 12-row chunks, B=16: inside chunks
def test_mid_epoch_checkpoint_resumes_the_columnar_path_exactly(parquet, tmp_path, split):
    sampler, _, loader = _eswp(parquet, tmp_path / "full", True)
    full = _trace(loader, sampler, 3)[0]
    dict_sampler, _, dict_loader = _eswp(parquet, tmp_path / "dict", False)
    _compare(_trace(dict_loader, dict_sampler, 3)[0], full)

    sampler, _, loader = _eswp(parquet, tmp_path / "cut", True)
    head, saved = _trace(loader, sampler, 3, save_at=split)
    json.dumps(saved["loader"])  # still JSON-friendly
    sampler, _, loader = _eswp(parquet, tmp_path / "cut", True)
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    epochs_left = 3 - sampler.epoch
    tail = _trace(loader, sampler, epochs_left)[0]
    _compare(full, head + tail)
    assert _epochs(tmp_path / "cut") == _epochs(tmp_path / "full")


@pytest.mark.parametrize("equalize", ["drop", "pad"])
def test_equalize_gives_the_dict_path_stream(parquet, equalize):
    lengths = []
    for rank in (0, 1):
        runs = []
        for columnar in (False, True):
            sampler = _sampler(B=20, b=6)
            source = ParquetSource(
                parquet,
                columnar=columnar,
                seed=2,
                shuffle=True,
                batch_rows=16,
                rank=rank,
                world_size=2,
                equalize=equalize,
            )
            runs.append(_trace(tn.Loader(es_pipe.SelectStage(source, sampler)), sampler, 2)[0])
        _compare(*runs)
        lengths.append([sum(len(k) for e, _, k, *_ in runs[1] if e == ep) for ep in (0, 1)])
    assert lengths[0] == lengths[1]  # every rank yields as many samples


def test_dataloader_workers_read_every_kept_row_once(parquet, tmp_path):
    """Workers hand whole chunks to the stage; with ESWP and manifests every kept row
    comes once per epoch, pruned ones never, as on the dict path."""
    keys = {}
    for columnar in (False, True):
        sampler = es_pipe.Selector(
            es_pipe.Evolved(),
            16,
            5,
            seed=5,
            total_epochs=3,
            eswp=es_pipe.ESWP(
                prune=es_pipe.Pruning(ratio=0.5, anneal=0), manifests=str(tmp_path / f"m{columnar}")
            ),
        )
        source = ParquetSource(
            parquet, key_column="key", columnar=columnar, batch_rows=12, pruned=sampler.pruned
        )
        loader = DataLoader(SourceDataset(source), batch_size=None, num_workers=2)
        stage = es_pipe.SelectStage(loader, sampler)
        it = tn.Loader(stage)
        seen = []
        for _ in range(3):
            seen.append([])
            for meta in it:
                meta.select(meta.data["x"].abs() + 0.1)
                seen[-1] += meta.keys
        assert stage.pruned_by_stage == 0
        keys[columnar] = seen
    for epoch, (a, b) in enumerate(zip(keys[False], keys[True], strict=True)):
        assert len(b) == len(set(b)), epoch  # every row once
        assert sorted(a) == sorted(b), epoch
    assert len(keys[True][1]) < sum(SIZES)  # epoch 1 is pruned


def test_custom_collate_fn_gets_sample_dicts(parquet):
    seen = []

    def collate(samples):
        seen.append(type(samples[0]))
        return {
            "x": torch.tensor([float(s["x"]) for s in samples]),
            "key": [s["__key__"] for s in samples],
        }

    sampler = _sampler()
    source = ParquetSource(parquet, columnar=True)
    meta = next(iter(tn.Loader(es_pipe.SelectStage(source, sampler, collate_fn=collate))))
    assert seen == [dict]
    assert meta.data["key"] == meta.keys


def test_chunks_and_dicts_mixed_are_refused(parquet):
    chunks = list(ParquetSource(parquet[:1], columnar=True))
    assert all(isinstance(c, ColumnChunk) for c in chunks)
    dicts = list(ParquetSource(parquet[:1]))
    for mixed in ([*dicts[:3], chunks[0]], [chunks[0], *dicts[:3]] * 10):
        stage = es_pipe.SelectStage(mixed, _sampler())
        with pytest.raises(ConfigError, match="both column chunks"):
            for meta in tn.Loader(stage):
                meta.select(torch.ones(len(meta)))


def test_bad_options_and_damaged_skip_are_refused(parquet):
    with pytest.raises(ConfigError, match="columnar='yes' must be True, False or None"):
        ParquetSource(parquet, columnar="yes")
    sampler = _sampler()
    loader = tn.Loader(es_pipe.SelectStage(ParquetSource(parquet, columnar=True), sampler))
    it = iter(loader)
    next(it).select(torch.ones(24))
    state = loader.state_dict()
    stage_state = next(v for v in _walk(state) if isinstance(v, dict) and "skip" in v)
    for bad, message in ((-1, "not a count of rows"), (10**6, "has no more")):
        stage_state["skip"] = bad
        fresh = tn.Loader(es_pipe.SelectStage(ParquetSource(parquet, columnar=True), _sampler()))
        with pytest.raises(ConfigError, match=message):
            fresh.load_state_dict(state)
            next(iter(fresh))


def _walk(x):
    yield x
    if isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)


def test_a_row_twice_in_a_columnar_meta_batch_is_refused(parquet):
    chunk = next(iter(ParquetSource(parquet[:1], columnar=True)))
    for upstream in ([chunk.slice(0, 10), chunk.slice(5, 15)], [chunk.slice(0, 10)] * 2):
        stage = es_pipe.SelectStage(upstream, _sampler(B=20))
        with pytest.raises(ConfigError, match="have the same identity"):
            next(iter(tn.Loader(stage)))
    shuffled = chunk.filter(np.ones(len(chunk), bool))
    order = np.array([3, 1, 2, 1])
    twice = ColumnChunk(
        shuffled.shard, shuffled.ordinals[order], {"x": shuffled.columns["x"][order]}
    )
    stage = es_pipe.SelectStage([twice], _sampler(B=4, b=2))
    with pytest.raises(ConfigError, match="have the same identity"):
        next(iter(tn.Loader(stage)))


@pytest.mark.parametrize(
    "make",
    [
        lambda i: {"x": np.float32(i), "__key__": f"k{i}", "__shard__": "s", "__index__": i},
        lambda i: {"__index__": np.int64(i), "__key__": i, "__shard__": "s", "y": np.array([i, i])},
        lambda i: {"__key__": f"k{i}", "__url__": f"u{i % 3}", "x": torch.ones(2) * i},
        # the collate fast paths: Python ints and floats, numpy rows, and the mixes that
        # must fall back to default_collate (bools among ints, two dtypes)
        lambda i: {
            "a": i,
            "f": i / 3,
            "t": i % 2 == 0,
            "__key__": str(i),
            "__shard__": "s",
            "__index__": i,
        },
        lambda i: {
            "a": True if i == 5 else i,
            "f": 1 if i == 7 else 0.5 * i,
            "__key__": str(i),
            "__shard__": f"s{i % 2}",
            "__index__": i,
        },
        lambda i: {
            "x": np.full(3, i, np.int16),
            "m": np.eye(2, dtype=np.float32) * i,
            "__key__": str(i),
            "__shard__": f"s{i // 10}",
            "__index__": i,
        },
        lambda i: {
            "x": np.full(2, i, np.float32 if i % 3 else np.float64),
            "__key__": str(i),
            "__shard__": "s",
            "__index__": i,
        },
        lambda i: {
            "x": np.full(2, i, np.float32),
            "__key__": str(i),
            "__shard__": "" if i % 4 == 0 else "s",
            "__url__": "u",
            "__index__": i,
        },
    ],
    ids=[
        "str-keys-int-index",
        "int-keys-numpy-index",
        "webdataset-url",
        "python-numbers",
        "mixed-python-types",
        "numpy-rows",
        "numpy-two-dtypes",
        "empty-shard-falls-back-to-url",
    ],
)
def test_dict_path_meta_batches_are_default_collate_of_the_samples(make):
    """The dict path takes ``__key__``/``__index__`` from the identity instead of
    collating them again: the meta-batch is still exactly ``default_collate``'s."""
    from torch.utils.data import default_collate

    samples = [make(i) for i in range(40)]
    stage = es_pipe.SelectStage(samples, _sampler(B=16, b=4))
    metas = []
    for meta in tn.Loader(stage):
        metas.append(meta.data)
        sub = meta.select(torch.arange(len(meta), dtype=torch.float32) + 1)
        rows = sub.indices.tolist()
        assert sub.keys == [meta.keys[i] for i in rows]
    for n, data in enumerate(metas):
        expected = default_collate(samples[16 * n : 16 * (n + 1)])
        assert list(data) == list(expected)
        for name, value in expected.items():
            got = data[name]
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and torch.equal(got, value), name
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                assert all(torch.equal(a, b) for a, b in zip(got, value, strict=True)), name
            else:
                assert got == value, name


@pytest.mark.parametrize("columnar", [False, True])
@pytest.mark.parametrize("split", [3, 7, 13])
def test_resume_through_a_prefetcher_is_exact(parquet, split, columnar):
    """A ``tn.Prefetcher`` between source and stage: the chunk held by the stage is
    found again from the prefetcher's state plus the rows to skip, in either epoch."""

    def build():
        sampler = _sampler(B=20, b=6)
        source = ParquetSource(parquet, columnar=columnar, shuffle=True, seed=4, batch_rows=16)
        return sampler, tn.Loader(es_pipe.SelectStage(tn.Prefetcher(source, 3), sampler))

    sampler, loader = build()
    full = _trace(loader, sampler, 2)[0]
    sampler, loader = build()
    head, saved = _trace(loader, sampler, 2, save_at=split)
    sampler, loader = build()
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    tail = _trace(loader, sampler, 2 - saved["epoch"])[0]  # the epochs left after the save
    _compare(full, head + tail)


def test_stateful_dataloader_workers_resume_chunks(parquet):
    """Workers yield whole chunks; a StatefulDataLoader checkpoint resumes them on the
    same and (merged) on another number of workers with every row once."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from es_pipe.sources import merge_states

    def make(workers, state=None):
        ds = SourceDataset(
            ParquetSource(parquet, columnar=True, shuffle=True, seed=4, batch_rows=10)
        )
        if state is not None:
            ds.load_state_dict(state)
        return StatefulDataLoader(ds, batch_size=None, num_workers=workers)

    def ids(chunks):
        return [(c.shard, int(o)) for c in chunks for o in c.ordinals]

    everything = sorted((u, i) for u, n in zip(parquet, SIZES, strict=True) for i in range(n))
    loader = make(2)
    it = iter(loader)
    head = ids(next(it) for _ in range(7))
    state = loader.state_dict()
    del it
    same = make(2)
    same.load_state_dict(state)
    assert sorted(head + ids(same)) == everything
    merged = merge_states(SourceDataset.states_from_loader(state))
    assert sorted(head + ids(make(1, merged))) == everything


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_columnar_is_the_default_where_it_cannot_change_the_meta_batches(parquet, arrow, kind):
    """``columnar=None`` (the default): a stage reading the source directly (or through a
    ``tn.Prefetcher``) with its default collate switches it to the columnar path, and gets
    the dict path's meta-batches, selections and keys; a ``tn.Mapper`` in between, a custom
    ``collate_fn`` or iterating the source alone keep sample dicts."""
    urls = parquet if kind == "parquet" else arrow
    cls = ParquetSource if kind == "parquet" else ArrowSource
    sampler = _sampler()
    source = cls(urls, seed=1, shuffle=True)
    assert source.columnar is False and isinstance(next(iter(source)), dict)
    dict_steps = _trace(
        tn.Loader(es_pipe.SelectStage(cls(urls, seed=1, shuffle=True, columnar=False), sampler)),
        sampler,
        2,
    )[0]
    for wrap in (lambda s: s, lambda s: tn.Prefetcher(s, 2)):
        sampler = _sampler()
        source = cls(urls, seed=1, shuffle=True)
        stage = es_pipe.SelectStage(wrap(source), sampler)
        assert source.columnar is True
        _compare(dict_steps, _trace(tn.Loader(stage), sampler, 2)[0])
    mapped = cls(urls, seed=1)
    es_pipe.SelectStage(tn.Mapper(mapped, lambda s: s), _sampler())
    custom = cls(urls, seed=1)
    es_pipe.SelectStage(custom, _sampler(), collate_fn=lambda samples: samples)
    pinned = cls(urls, seed=1, columnar=False)
    es_pipe.SelectStage(pinned, _sampler())
    assert (mapped.columnar, custom.columnar, pinned.columnar) == (False, False, False)


@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize("split", [2, 5, 9])
def test_a_dict_path_checkpoint_resumes_on_the_default_columnar_path(parquet, tmp_path, split):
    """A checkpoint saved by a dict-path run (es_pipe's default before columnar became
    automatic) resumes under the new default to the dict path's run, step for step."""
    sampler, _, loader = _eswp(parquet, tmp_path / "full", False)
    full = _trace(loader, sampler, 3)[0]
    sampler, _, loader = _eswp(parquet, tmp_path / "cut", False)
    head, saved = _trace(loader, sampler, 3, save_at=split)
    sampler, stage, loader = _eswp(parquet, tmp_path / "cut", None)
    assert stage._sharded is not None and stage._sharded.columnar is True
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    tail = _trace(loader, sampler, 3 - sampler.epoch)[0]
    _compare(full, head + tail)
    assert _epochs(tmp_path / "cut") == _epochs(tmp_path / "full")


@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize("split", [1, 5, 9])  # 12-row chunks, B=16: inside chunks
def test_a_columnar_checkpoint_resumes_on_the_dict_path(parquet, tmp_path, split):
    """A checkpoint taken inside a chunk (the source's state before it and the rows to
    skip) resumes on ``columnar=False``: the chunk's rows are the dict source's next
    samples, pulled and dropped; the run is the dict path's, step for step."""
    sampler, _, loader = _eswp(parquet, tmp_path / "full", False)
    full = _trace(loader, sampler, 3)[0]
    sampler, _, loader = _eswp(parquet, tmp_path / "cut", True)
    head, saved = _trace(loader, sampler, 3, save_at=split)
    assert "skip" in json.dumps(saved["loader"])
    sampler, stage, loader = _eswp(parquet, tmp_path / "cut", False)
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    tail = _trace(loader, sampler, 3 - sampler.epoch)[0]
    assert stage._sharded is not None and stage._sharded.columnar is False
    _compare(full, head + tail)
    assert _epochs(tmp_path / "cut") == _epochs(tmp_path / "full")
