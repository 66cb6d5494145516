"""Sample identity (issue 15, item 3): identities that collide are refused or counted, for
every upstream: real webdataset pipelines (keys restart in every shard), real DataLoaders
(already batched ones included) and plain lists."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchdata.nodes as tn
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

import es_pipe
from es_pipe.errors import ConfigError
from es_pipe.sources import SourceDataset, WebDatasetSource

SHARDS, PER_SHARD = 4, 50


@pytest.fixture
def tars(tmp_path):
    """Shards written by webdataset itself, keys restarting at 000000 in every shard."""
    urls = []
    for s in range(SHARDS):
        url = str(tmp_path / f"part-{s}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(PER_SHARD):
                sink.write({"__key__": f"{i:06d}", "x.bin": np.float32([s, i]).tobytes()})
        urls.append(url)
    return urls


def _decode(sample: dict) -> dict:
    out = {"x": torch.frombuffer(bytearray(sample["x.bin"]), dtype=torch.float32)}
    return {**out, **{k: v for k, v in sample.items() if k in ("__key__", "__url__")}}


def _train(loader, epochs: int) -> list[int]:
    sizes = []
    for _ in range(epochs):
        seen = 0
        for meta in loader:
            meta.select(meta.data["x"][:, 1] + 1.0)
            seen += len(meta)
        sizes.append(seen)
    return sizes


def test_webdataset_pipeline_takes_url_as_the_shard(tars):
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(tars), wds.tarfile_to_samples(), wds.map(_decode)
    )
    sampler = es_pipe.Selector(es_pipe.Evolved(), 32, 8, seed=0)
    stage = es_pipe.SelectStage(pipeline, sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repeat warning: every sample is its own
        sizes = _train(tn.Loader(stage), 2)
    assert sizes == [SHARDS * PER_SHARD] * 2
    # 200 scores, one per (shard, key), not 50 collapsed ones
    assert sorted(sampler.store.shards) == sorted(tars)
    assert all(len(sampler.store.shard(u)["score"]) == PER_SHARD for u in tars)
    assert stage.repeats.count == 0


def test_webdataset_without_the_shard_is_refused_naming_both_samples(tars):
    """The failure of issue 15: keys restart per shard, the shard is dropped: before, 200
    samples collapsed onto 50 scores without a word."""

    def keys_only(sample):
        return {"x": _decode(sample)["x"], "__key__": sample["__key__"]}

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(tars),
        wds.tarfile_to_samples(),
        wds.shuffle(1000, rng=None),
        wds.map(keys_only),
    )
    sampler = es_pipe.Selector(es_pipe.Evolved(), 128, 8, seed=0)
    with pytest.raises(
        ConfigError,
        match=r"samples \d+ and \d+ of this meta-batch of 128 have the same identity: shard '', key '0000\d\d'",
    ) as info:
        next(iter(tn.Loader(es_pipe.SelectStage(pipeline, sampler))))
    assert "__url__" in str(info.value)
    assert sampler.step == 0 and not sampler.store.shards  # nothing scored


def test_duplicate_with_ordinals_is_refused_and_names_the_ordinal():
    samples = [
        {"x": float(i), "__key__": f"k{i}", "__shard__": "a", "__index__": i} for i in range(8)
    ]
    samples[5] = {**samples[5], "__index__": 2}
    with pytest.raises(
        ConfigError,
        match=r"samples 2 and 5 .* shard 'a', ordinal \('__index__'\) 2 \(keys 'k2' and 'k5'\)",
    ):
        next(
            iter(tn.Loader(es_pipe.SelectStage(samples, es_pipe.Selector(es_pipe.Evolved(), 8, 4))))
        )


def test_same_key_in_different_shards_is_two_samples():
    samples = [{"x": float(i), "__key__": f"k{i % 4}", "__shard__": f"s{i // 4}"} for i in range(8)]
    meta = next(
        iter(tn.Loader(es_pipe.SelectStage(samples, es_pipe.Selector(es_pipe.Evolved(), 8, 4))))
    )
    assert len(meta) == 8


@pytest.mark.parametrize("key", [lambda i: i, lambda i: f"k{i}".encode(), lambda i: (i, "t")])
def test_keys_of_any_type_are_compared_exactly(key):
    samples = [{"x": float(i), "__key__": key(i % 6), "__shard__": "s"} for i in range(8)]
    with pytest.raises(ConfigError, match="samples 0 and 6"):
        next(
            iter(tn.Loader(es_pipe.SelectStage(samples, es_pipe.Selector(es_pipe.Evolved(), 8, 4))))
        )


def test_a_sample_seen_twice_in_an_epoch_is_counted_and_warned_once(tars):
    """Across meta-batches within one epoch: a counted warning at the epoch's end (some
    pipelines repeat on purpose, e.g. wds.ResampledShards)."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(tars[:1] * 2), wds.tarfile_to_samples(), wds.map(_decode)
    )
    stage = es_pipe.SelectStage(pipeline, es_pipe.Selector(es_pipe.Evolved(), 25, 5, seed=0))
    with pytest.warns(
        UserWarning,
        match=r"epoch 0: 50 sample\(s\) came to the stage a second time .* key '000000' of shard '.*part-0.tar'",
    ) as caught:
        _train(tn.Loader(stage), 1)
    assert sum("second time" in str(w.message) for w in caught) == 1
    assert stage.repeats.count == 50


def test_equalize_pad_repeats_on_purpose_without_a_warning(tmp_path):
    from es_pipe.shard_writer import write_shards

    write_shards(
        [{"__key__": f"s{i}", "txt": b"x"} for i in range(30)],
        str(tmp_path / "t-%02d.tar"),
        samples_per_shard=10,
    )
    urls = sorted(str(p) for p in tmp_path.glob("t-*.tar"))
    source = WebDatasetSource(
        urls, rank=0, world_size=2, equalize="pad", num_samples={u: 10 for u in urls}
    )
    # stream 0 reads 2 shards (20), stream 1 one (10): its 10 are read twice
    other = WebDatasetSource(
        urls, rank=1, world_size=2, equalize="pad", num_samples={u: 10 for u in urls}
    )
    for src, n in ((source, 20), (other, 20)):
        stage = es_pipe.SelectStage(
            tn.Mapper(src, lambda s: {**s, "txt": 1, "x": torch.ones(2)}),
            es_pipe.Selector(es_pipe.Evolved(), 20, 5, seed=0),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _train(tn.Loader(stage), 1) == [n]


class _Rows(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {
            "x": torch.tensor([float(i)]),
            "__key__": f"k{i}",
            "__shard__": "rows",
            "__index__": i,
        }


def test_an_already_batched_dataloader_is_named_with_the_fix():
    loader = DataLoader(_Rows(), batch_size=32)
    with pytest.raises(
        ConfigError, match=r"already batched: '__key__' holds 32 values.*batch_size=None"
    ):
        next(
            iter(tn.Loader(es_pipe.SelectStage(loader, es_pipe.Selector(es_pipe.Evolved(), 16, 4))))
        )


def test_an_already_batched_webdataset_is_named_with_the_fix(tars):
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(tars), wds.tarfile_to_samples(), wds.map(_decode), wds.batched(10)
    )
    with pytest.raises(ConfigError, match=r"already batched.*\.batched\(\)"):
        next(
            iter(
                tn.Loader(es_pipe.SelectStage(pipeline, es_pipe.Selector(es_pipe.Evolved(), 16, 4)))
            )
        )


def test_the_fix_batch_size_none_trains():
    loader = DataLoader(_Rows(), batch_size=None, shuffle=True)
    sizes = _train_x(
        tn.Loader(es_pipe.SelectStage(loader, es_pipe.Selector(es_pipe.Evolved(), 16, 4)))
    )
    assert sizes == 64


def _train_x(loader) -> int:
    seen = 0
    for meta in loader:
        meta.select(meta.data["x"][:, 0] + 1)
        seen += len(meta)
    return seen


def test_dataloader_workers_over_an_es_pipe_source(tars):
    """Real worker processes: every sample once, identities from the source."""
    ds = SourceDataset(WebDatasetSource(tars))
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_decode_src)
    stage = es_pipe.SelectStage(loader, es_pipe.Selector(es_pipe.Evolved(), 32, 8, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert _train(tn.Loader(stage), 1) == [SHARDS * PER_SHARD]
    assert stage.repeats.count == 0


def _decode_src(sample: dict) -> dict:
    x = torch.frombuffer(bytearray(sample["x.bin"]), dtype=torch.float32)
    return {"x": x, **{k: sample[k] for k in ("__key__", "__shard__", "__index__")}}
