"""The tar columnar path (``WebDatasetSource(columnar=True)``, automatic under the stage)
against the dict path.

Shards are written by webdataset's own ``TarWriter``. Tar payloads stay bytes per sample
(decoded here in the loss function, as a user's training step would); what the columnar
path changes is identity and delivery: one ``ColumnChunk`` per reader chunk, identity as
arrays. On the same shards and seed both paths must give the same meta-batches (fields in
the same order, identity fields included), the same selections, the same scores and
manifests, and a checkpoint taken anywhere on one path must resume on the other exactly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchdata.nodes as tn
import webdataset as wds
from torch.utils.data import DataLoader

import es_pipe
from es_pipe.columns import ColumnChunk
from es_pipe.errors import ConfigError
from es_pipe.manifests import Manifests
from es_pipe.sources import SourceDataset, WebDatasetSource
from es_pipe.sources.webdataset import tar_blocks

SIZES = [70, 45, 93, 31]  # the reader's chunks are 64 samples: chunks end inside shards


def _write(path, s: int, n: int, extra_every: int = 0) -> str:
    rng = np.random.default_rng(s)
    xs = rng.normal(size=n)
    labels = rng.integers(0, 10, n)
    with wds.TarWriter(str(path)) as writer:
        for i in range(n):
            sample = {
                "__key__": f"s{s}-{i:03d}",
                "cls": int(labels[i]),
                "x.txt": f"{xs[i]:.6f}",
                "npy": rng.integers(0, 50, 6).astype(np.int32),
            }
            if extra_every and i % extra_every == extra_every - 1:
                sample["json"] = {"i": i}
            writer.write(sample)
    return str(path)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    folder = tmp_path_factory.mktemp("columnar-tar")
    return [_write(folder / f"t{s}.tar", s, n) for s, n in enumerate(SIZES)]


def _decoded(meta) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([float(v) for v in meta.data["x.txt"]])
    label = torch.tensor([int(v) for v in meta.data["cls"]], dtype=torch.float32)
    return x, label


def _losses(meta, step: int) -> torch.Tensor:
    x, label = _decoded(meta)
    return x.abs() + 0.01 * label + 0.1 * (step % 3)


def _same(a, b) -> None:
    """The same fields in the same order (identity fields included), equal values of equal
    types."""
    assert list(a) == list(b)
    for name, value in a.items():
        other = b[name]
        assert type(value) is type(other), name
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype, name
            assert torch.equal(value, other), name
        else:
            assert value == other, name


def _equal(a, b) -> bool:
    """Deep equality of two states (dicts, lists, tensors, arrays)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def _trace(loader, sampler, epochs: int, save_at=None):
    """Run ``epochs`` epochs; the steps (epoch, meta data, keys, selection, weights, the
    sampler's state after the step) and, with ``save_at``, the checkpoint taken after that
    many steps (the run stops there)."""
    steps = []
    for _ in range(epochs):
        for meta in loader:
            sub = meta.select(_losses(meta, sampler.step))
            w = None if sub.weights is None else sub.weights.tolist()
            state = sampler.state_dict()
            steps.append(
                (sampler.epoch, meta.data, meta.keys, sub.indices.tolist(), sub.keys, w, state)
            )
            if len(steps) == save_at:
                buffer = io.BytesIO()
                saved = {"loader": loader.state_dict(), "scores": state}
                torch.save({**saved, "epoch": sampler.epoch}, buffer)
                buffer.seek(0)
                return steps, torch.load(buffer, weights_only=True)
    return steps, None


def _compare(dict_steps, col_steps) -> None:
    assert len(dict_steps) == len(col_steps)
    for (e1, d1, k1, i1, s1, w1, st1), (e2, d2, k2, i2, s2, w2, st2) in zip(
        dict_steps, col_steps, strict=True
    ):
        assert (e1, k1, i1, s1, w1) == (e2, k2, i2, s2, w2)
        _same(d1, d2)
        assert _equal(st1, st2)  # the sampler's checkpoint: scores, visits, step, rng


def _sampler(B=24, b=8, **options):
    return es_pipe.Selector(es_pipe.Evolved(), B, b, seed=3, total_epochs=4, **options)


def _scores(sampler, urls):
    store = sampler.store
    slots = store.locate(
        [u for u, n in zip(urls, SIZES, strict=True) for _ in range(n)],
        None,
        np.concatenate([np.arange(n) for n in SIZES]),
    )
    return store.gather(slots, ("score", "visits"))


@pytest.mark.parametrize(
    "options",
    [{}, {"shuffle": True}, {"shuffle": True, "shuffle_buffer": 25}],
    ids=["in-order", "shuffled-shards", "shuffle-buffer"],
)
@pytest.mark.parametrize("columnar", [True, None], ids=["columnar", "automatic"])
def test_tar_columnar_meta_batches_selections_and_scores_equal_the_dict_path(
    tars, options, columnar
):
    runs = {}
    for path in (False, columnar):
        sampler = _sampler(burn_in=2)
        source = WebDatasetSource(tars, seed=1, columnar=path, **options)
        stage = es_pipe.SelectStage(source, sampler)
        assert source.columnar is (path is not False)
        runs[path] = (_trace(tn.Loader(stage), sampler, 3)[0], sampler)
        assert stage._intake.columnar is (path is not False) or stage._intake.held is None
    _compare(runs[False][0], runs[columnar][0])
    for _, d, keys, *_ in runs[columnar][0]:
        assert list(d)[:3] == ["__key__", "__shard__", "__index__"]  # tar: identity first
        assert d["__key__"] == keys and d["__index__"].dtype == torch.int64
        assert all(type(v) is bytes for v in d["npy"])  # payload: raw bytes, as in dicts
    a, b = _scores(runs[False][1], tars), _scores(runs[columnar][1], tars)
    for column in ("score", "visits"):
        np.testing.assert_array_equal(a[column], b[column])
    assert (a["visits"] > 0).all()  # every sample was scored


def test_tar_columnar_through_a_prefetcher_and_alone(tars):
    """Automatic through a ``tn.Prefetcher``; iterated alone (no stage) the source keeps
    dicts; ``columnar=True`` alone yields chunks that hold the dict path's samples."""
    sampler = _sampler()
    dict_steps = _trace(
        tn.Loader(es_pipe.SelectStage(WebDatasetSource(tars, seed=1, columnar=False), sampler)),
        sampler,
        2,
    )[0]
    sampler = _sampler()
    source = WebDatasetSource(tars, seed=1)
    stage = es_pipe.SelectStage(tn.Prefetcher(source, 3), sampler)
    assert source.columnar is True
    _compare(dict_steps, _trace(tn.Loader(stage), sampler, 2)[0])

    alone = WebDatasetSource(tars, shuffle=True, seed=2)
    assert isinstance(next(iter(alone)), dict)
    chunks = list(WebDatasetSource(tars, shuffle=True, seed=2, columnar=True))
    assert all(isinstance(c, ColumnChunk) for c in chunks) and max(map(len, chunks)) == 64
    samples = [s for c in chunks for s in c.to_dicts()]
    assert samples == list(WebDatasetSource(tars, shuffle=True, seed=2, columnar=False))
    assert [list(s) for s in samples[:1]] == [
        ["__key__", "__shard__", "__index__", "cls", "npy", "x.txt"]
    ]
    mapped = WebDatasetSource(tars)
    es_pipe.SelectStage(tn.Mapper(mapped, lambda s: s), _sampler())
    custom = WebDatasetSource(tars)
    es_pipe.SelectStage(custom, _sampler(), collate_fn=lambda samples: samples)
    assert (mapped.columnar, custom.columnar) == (False, False)
    with pytest.raises(ConfigError, match="columnar="):
        WebDatasetSource(tars, columnar="yes")  # type: ignore[arg-type]


def _eswp(urls, root, columnar, hook=True):
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
    source = WebDatasetSource(
        urls, shuffle=True, seed=5, columnar=columnar, pruned=sampler.pruned if hook else None
    )
    stage = es_pipe.SelectStage(source, sampler)
    return sampler, stage, tn.Loader(stage)


def _epochs(root) -> dict:
    m = Manifests(str(root))
    return {e: m.read_epoch(e).to_pydict() for e in m.committed()}


@pytest.mark.filterwarnings("ignore:epoch .* read and decoded")
@pytest.mark.parametrize("hook", [True, False], ids=["pruned-hook", "stage-drops"])
def test_tar_eswp_with_manifests_equals_the_dict_path(tars, tmp_path, hook):
    traces, stages = {}, {}
    for columnar in (False, None):
        sampler, stage, loader = _eswp(tars, tmp_path / str(columnar), columnar, hook)
        traces[columnar] = _trace(loader, sampler, 3)[0]
        stages[columnar] = stage
    assert stages[None]._sharded is not None and stages[None]._sharded.columnar is True
    _compare(traces[False], traces[None])
    assert any(w is not None and max(w) > 1 for *_, w, _ in traces[None])  # 1/keep weights
    assert stages[None].pruned_by_stage == stages[False].pruned_by_stage
    assert (stages[None].pruned_by_stage > 0) == (not hook)
    assert _epochs(tmp_path / "False") == _epochs(tmp_path / "None")


def _find(state, name):
    if isinstance(state, dict):
        if name in state:
            return state[name]
        for value in state.values():
            found = _find(value, name)
            if found is not None:
                return found
    return None


@pytest.mark.filterwarnings("ignore:re-committing")
@pytest.mark.parametrize("split", [1, 6, 17, 25])  # 16-row meta-batches of 64-row chunks
@pytest.mark.parametrize(
    "save,load",
    [(True, True), (None, False), (False, None), (False, False)],
    ids=["columnar-columnar", "columnar-dict", "dict-columnar", "dict-dict"],
)
def test_a_mid_epoch_checkpoint_resumes_across_paths_exactly(tars, tmp_path, split, save, load):
    sampler, _, loader = _eswp(tars, tmp_path / "full", False)
    full = _trace(loader, sampler, 3)[0]

    sampler, _, loader = _eswp(tars, tmp_path / "cut", save)
    head, saved = _trace(loader, sampler, 3, save_at=split)
    if split == 1 and save is not False:
        assert _find(saved["loader"], "skip") == 16  # inside the first chunk
    sampler, stage, loader = _eswp(tars, tmp_path / "cut", load)
    loader.load_state_dict(saved["loader"])
    sampler.load_state_dict(saved["scores"])
    tail = _trace(loader, sampler, 3 - sampler.epoch)[0]
    assert stage._sharded is not None and stage._sharded.columnar is (load is not False)
    _compare(full, head + tail)
    assert _epochs(tmp_path / "cut") == _epochs(tmp_path / "full")


@pytest.mark.parametrize("equalize", ["drop", "pad"])
def test_tar_equalize_gives_the_dict_path_stream(tars, equalize):
    lengths = []
    for rank in (0, 1):
        runs = []
        for columnar in (False, True):
            sampler = _sampler(B=20, b=6)
            source = WebDatasetSource(
                tars,
                columnar=columnar,
                seed=2,
                shuffle=True,
                rank=rank,
                world_size=2,
                equalize=equalize,
                num_samples=dict(zip(tars, SIZES, strict=True)),
            )
            runs.append(_trace(tn.Loader(es_pipe.SelectStage(source, sampler)), sampler, 2)[0])
        _compare(*runs)
        lengths.append([sum(len(k) for e, _, k, *_ in runs[1] if e == ep) for ep in (0, 1)])
    assert lengths[0] == lengths[1]  # every rank yields as many samples


@pytest.mark.parametrize("columnar", [None, True])
def test_dataloader_workers_keep_dicts_unless_columnar_is_asked(tars, tmp_path, columnar):
    """Behind a DataLoader the automatic option keeps sample dicts (the stage cannot
    see the source); ``columnar=True`` sends whole chunks through the workers. Either
    way, with ESWP and the pruned hook, every kept sample comes once per epoch."""
    keys = {}
    kinds = {}
    for path in (False, columnar):
        sampler = es_pipe.Selector(
            es_pipe.Evolved(),
            16,
            5,
            seed=5,
            total_epochs=3,
            eswp=es_pipe.ESWP(
                prune=es_pipe.Pruning(ratio=0.5, anneal=0), manifests=str(tmp_path / f"m{path}")
            ),
        )
        source = WebDatasetSource(tars, columnar=path, pruned=sampler.pruned)
        loader = DataLoader(SourceDataset(source), batch_size=None, num_workers=2)
        stage = es_pipe.SelectStage(loader, sampler)
        assert source.columnar is (path is True)
        seen: list[list[str]] = []
        for _ in range(3):
            seen.append([])
            for meta in tn.Loader(stage):
                x, _label = _decoded(meta)
                meta.select(x.abs() + 0.1)
                seen[-1] += meta.keys
        assert stage.pruned_by_stage == 0
        keys[path] = seen
        kinds[path] = stage._intake.columnar or stage._intake.held is not None
    assert kinds == {False: False, columnar: columnar is True}
    for epoch, (a, b) in enumerate(zip(keys[False], keys[columnar], strict=True)):
        assert len(b) == len(set(b)), epoch  # every sample once
        assert sorted(a) == sorted(b), epoch
    assert len(keys[columnar][1]) < sum(SIZES)  # epoch 1 is pruned


def test_custom_collate_fn_gets_the_dict_paths_sample_dicts(tars):
    got = {}
    for columnar in (False, True):
        seen = []

        def collate(samples, seen=seen):
            seen.append(samples)
            return {"n": torch.arange(len(samples))}

        stage = es_pipe.SelectStage(
            WebDatasetSource(tars, columnar=columnar), _sampler(), collate_fn=collate
        )
        for meta in tn.Loader(stage):
            meta.select(torch.ones(len(meta)))
        got[columnar] = seen
    assert got[False] == got[True]
    assert [list(s) for s in got[True][0][:2]] == [list(s) for s in got[False][0][:2]]


def test_samples_with_other_extensions_batch_as_default_collate_does(tmp_path):
    """A chunk whose samples differ in their extensions is cut into runs that agree; the
    meta-batches (or the error when a later sample lacks a field of the first) are the
    dict path's: ``default_collate`` batches the first sample's fields."""
    urls = [_write(tmp_path / "odd0.tar", 0, 40, extra_every=7)]
    urls.append(_write(tmp_path / "odd1.tar", 1, 30, extra_every=0))
    chunks = list(WebDatasetSource(urls, columnar=True))
    assert [len(c) for c in chunks] == [6, 1] * 5 + [5, 30]
    assert all("json" in c.columns for c in chunks[1:10:2])
    outcomes = {}
    for columnar in (False, True):
        for B in (6, 7):
            sampler = _sampler(B=B, b=3)
            stage = es_pipe.SelectStage(WebDatasetSource(urls, columnar=columnar), sampler)
            steps: list[tuple] = []
            try:
                for meta in tn.Loader(stage):
                    meta.select(_losses(meta, 0))
                    steps.append((sorted(meta.data), meta.keys))
                error = None
            except ConfigError as exc:
                error = str(exc)
            outcomes[columnar, B] = (steps, error)
    for B in (6, 7):
        assert outcomes[False, B] == outcomes[True, B], B
    steps, error = outcomes[True, 7]  # no meta-batch starts with a "json" sample
    assert error is None and len(steps) == 10 and all("json" not in f for f, _ in steps)
    steps, error = outcomes[True, 6]  # the second starts with one: a clear error, both paths
    assert len(steps) == 1 and error is not None and "KeyError: 'json'" in error


def test_tar_blocks_cut_runs_of_equal_fields():
    samples = [
        {"__key__": k, "__shard__": "u", "__index__": i, **fields}
        for i, (k, fields) in enumerate(
            [
                ("a", {"x": b"1"}),
                ("b", {"x": b"2"}),
                ("c", {"x": b"3", "y": b"!"}),
                ("d", {"x": b"4"}),
            ]
        )
    ]
    blocks = tar_blocks("u", samples)
    assert [len(b) for b in blocks] == [2, 1, 1]
    assert [b.columns for b in blocks] == [
        {"x": [b"1", b"2"]},
        {"x": [b"3"], "y": [b"!"]},
        {"x": [b"4"]},
    ]
    assert blocks[0].keys.tolist() == ["a", "b"] and blocks[2].ordinals.tolist() == [3]
    assert [s for b in blocks for s in b.to_dicts()] == samples
    assert tar_blocks("u", []) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_truncated_shard_gives_the_dict_paths_samples_and_error(tars, tmp_path):
    """A shard cut short: the samples completed before the cut come on both paths, then
    the same ``ShardError`` (``on_error="raise"``) or the same skip (``"skip"``)."""
    from pathlib import Path

    from es_pipe.errors import ShardError

    cut = tmp_path / "cut.tar"
    raw = Path(tars[0]).read_bytes()
    cut.write_bytes(raw[: len(raw) // 2 + 100])
    urls = [tars[1], str(cut), tars[3]]
    got = {}
    for columnar in (False, True):
        items = []
        with pytest.raises(ShardError, match=r"cut\.tar") as info:
            for item in WebDatasetSource(urls, columnar=columnar):
                items += item.to_dicts() if isinstance(item, ColumnChunk) else [item]
        skipped = WebDatasetSource(urls, columnar=columnar, on_error="skip")
        kept = [s for i in skipped for s in (i.to_dicts() if columnar else [i])]
        got[columnar] = (items, str(info.value), kept, skipped.stats)
    assert got[False] == got[True]
    items, _, kept, stats = got[True]
    assert 0 < len(items) - SIZES[1] < SIZES[0]  # part of the cut shard came first
    assert len(kept) == len(items) + SIZES[3] and len(stats["errors"]) == 1
