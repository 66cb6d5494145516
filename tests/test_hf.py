"""Hugging Face ``datasets`` streaming through ``es_pipe.from_hf``: stable identities
(file, row) whatever the workers, shuffling or epoch; resume through HF's own
``state_dict``; the ES stage over it. Offline, on Parquet files the test writes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import torchdata.nodes as tn

import es_pipe
from es_pipe.errors import ConfigError

datasets = pytest.importorskip("datasets", reason="pip install 'datasets>=2.18'")

SIZES = (30, 20, 40)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    out = []
    for s, n in enumerate(SIZES):
        x = np.arange(n, dtype=np.float32) + 100 * s  # x names the file and the row
        table = pa.table({"id": [f"f{s}r{i}" for i in range(n)], "x": x, "y": np.arange(n) % 2})
        pq.write_table(table, folder / f"part-{s}.parquet", row_group_size=7)
        out.append(str(folder / f"part-{s}.parquet"))
    return out


def ident(rows):
    return [(r["__shard__"], r["__key__"], r["__index__"], float(r["x"])) for r in rows]


def test_identity_is_the_file_and_the_row(files):
    rows = list(es_pipe.from_hf("parquet", data_files=files[0].replace("part-0", "part-*")))
    want = [
        (f, str(i), i, float(i + 100 * s)) for s, f in enumerate(files) for i in range(SIZES[s])
    ]
    assert ident(rows) == want
    keyed = list(es_pipe.from_hf("parquet", data_files=files, key_column="id"))
    assert [r["__key__"] for r in keyed] == [f"f{s}r{i}" for s in range(3) for i in range(SIZES[s])]


def test_identities_survive_shuffle_workers_and_epochs(files):
    ds = es_pipe.from_hf("parquet", data_files=files).shuffle(seed=1, buffer_size=16)
    assert ds.n_shards == 3  # one HF shard per file: workers divide the files
    seen = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen.append(ident(loader))
    for rows in seen:
        assert len(rows) == sum(SIZES) == len({r[:2] for r in rows})  # no key twice
        for shard, _, index, x in rows:  # the identity names the row it came from
            assert x == index + 100 * files.index(shard)
    assert seen[0] != seen[1] and sorted(seen[0]) == sorted(seen[1])


def test_resume_through_hf_state_dict_continues_exactly(files):
    full = ident(es_pipe.from_hf("parquet", data_files=files))
    for cut in (1, 35, 55):
        ds = es_pipe.from_hf("parquet", data_files=files)
        it = iter(ds)
        head = ident([next(it) for _ in range(cut)])
        state = ds.state_dict()
        resumed = es_pipe.from_hf("parquet", data_files=files)
        resumed.load_state_dict(state)
        assert head + ident(resumed) == full, cut


def test_the_es_stage_scores_every_sample_once_per_epoch(files):
    ds = es_pipe.from_hf("parquet", data_files=files, columns=["x", "y"]).shuffle(
        seed=0, buffer_size=8
    )
    sampler = es_pipe.Selector(es_pipe.Evolved(), 16, 4, seed=0)
    model = torch.nn.Linear(1, 2)
    loader = tn.Loader(es_pipe.SelectStage(ds, sampler))
    for epoch in range(2):
        ds.set_epoch(epoch)
        trained = scored = 0
        for meta in loader:
            scored += len(meta.keys)
            x = meta.data["x"].float().unsqueeze(1) / 100
            with torch.no_grad():
                losses = F.cross_entropy(model(x), meta.data["y"], reduction="none")
            trained += len(meta.select(losses))
        assert scored == sum(SIZES) and 0 < trained < scored  # every sample once an epoch
    assert sampler.store.held == sum(SIZES)  # one score per (file, row): nothing collapsed


def test_bad_arguments_are_named(files, tmp_path):
    with pytest.raises(ConfigError, match="data_files"):
        es_pipe.from_hf("parquet")
    with pytest.raises(ConfigError, match="not a column"):
        es_pipe.from_hf("parquet", data_files=files, key_column="nope")
    clash = tmp_path / "clash.parquet"
    pq.write_table(pa.table({"__key__": ["a"], "x": [1.0]}), clash)
    with pytest.raises(ConfigError, match="already has columns"):
        es_pipe.from_hf("parquet", data_files=str(clash))
    with pytest.raises(ConfigError, match="empty"):
        es_pipe.from_hf("parquet", data_files=str(tmp_path / "none-*.parquet"))
