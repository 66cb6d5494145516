"""LitData through ``es_pipe.litdata_source``: chunks written by ``litdata.optimize`` itself,
read back with stable identities (chunk file, ordinal) whatever the shuffling, workers or
epoch; the ES stage over them scores every item once per epoch and takes the losses back;
a checkpoint mid-epoch resumes to exactly the uninterrupted run, in-process and with
DataLoader workers (litdata's own StreamingDataLoader state). Offline, on files it writes.

litdata is installed without torchvision (``pip install --no-deps``, see the Makefile):
its own requirement would replace the CPU torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchdata.nodes as tn

import es_pipe
from es_pipe.errors import ConfigError

litdata = pytest.importorskip(
    "litdata", reason="litdata: pip install --no-deps litdata==0.2.76 (see the Makefile)"
)
from es_pipe.litdata_source import (  # noqa: E402
    IdentifiedStreamingDataset,
    from_litdata,
    litdata_loader,
)

N, CHUNK = 60, 7  # 9 chunks, the last one short (the writer below uses CHUNK)

WRITER = """
import sys

import litdata
import numpy as np


def item(i):
    return {"x": np.float32(i), "y": i % 2, "id": f"item{i}"}


def pair(i):
    return (np.float32(i), i % 2)


def clashing(i):
    return {"x": np.float32(i), "__key__": str(i)}


if __name__ == "__main__":
    for job in sys.argv[1:]:
        fn, folder, n = job.split(",")
        litdata.optimize(fn=globals()[fn], inputs=list(range(int(n))), output_dir=folder,
                         chunk_size=7, num_workers=1, start_method="fork")
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, str]:
    """Chunks written by ``litdata.optimize`` in a child process (one for all): optimize
    sets the multiprocessing start method of its whole process (to spawn), which must not
    leak into this test session's other DataLoaders."""
    root = tmp_path_factory.mktemp("lit")
    script = root / "write.py"
    script.write_text(WRITER)
    jobs = {"item": N, "pair": 10, "clashing": 10}
    subprocess.run(
        [sys.executable, str(script), *(f"{fn},{root / fn},{n}" for fn, n in jobs.items())],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return {fn: str(root / fn) for fn in jobs}


@pytest.fixture(scope="module")
def out(written):
    return written["item"]


def expected(folder: str) -> list[tuple[str, str, int, float]]:
    """(shard, key, index, x) of every item, from litdata's own index.json: chunk files in
    order, each holding ``chunk_size`` items; one writer, so x is the item's position."""
    chunks = json.loads((Path(folder) / "index.json").read_text())["chunks"]
    rows, position = [], 0
    for chunk in chunks:
        for ordinal in range(chunk["chunk_size"]):
            rows.append((f"{folder}/{chunk['filename']}", str(ordinal), ordinal, float(position)))
            position += 1
    assert position == N and len(chunks) == -(-N // CHUNK)
    return rows


def ident(rows):
    return [(r["__shard__"], r["__key__"], int(r["__index__"]), float(r["x"])) for r in rows]


def test_identity_is_the_chunk_file_and_the_ordinal(out):
    want = expected(out)
    assert ident(from_litdata(out)) == want
    keyed = list(from_litdata(out, key_field="id"))
    assert [r["__key__"] for r in keyed] == [f"item{i}" for i in range(N)]
    ds = from_litdata(out)
    assert ident([ds[13], ds[N - 1]]) == [want[13], want[N - 1]]  # map-style lookups too


def test_identities_survive_shuffle_workers_and_epochs(out):
    loader = litdata_loader(from_litdata(out, shuffle=True, seed=3), num_workers=2)
    seen = [ident(loader) for _ in range(2)]
    for rows in seen:
        assert sorted(rows) == sorted(expected(out))  # each item once, named as it is stored
    assert seen[0] != seen[1]  # reshuffled, identities unchanged


def losses_of(meta, step):
    """Deterministic per-item losses that drift with the step, like a training model's."""
    return (meta.data["x"].float() * (1.0 + 0.1 * step)) % 7.0


def run(loader, sampler, steps, trace, last):
    """Drive ``steps`` meta-batches across epochs: record what was scored and selected and
    the last loss each item got."""
    it = iter(loader)
    while steps:
        try:
            meta = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        losses = losses_of(meta, sampler.step)
        shards = list(meta.data["__shard__"])
        for shard, index, loss in zip(shards, meta.data["__index__"].tolist(), losses.tolist()):
            last[(shard, index)] = loss
        sub = meta.select(losses)
        trace.append((sampler.epoch, list(zip(shards, meta.keys)), sub.keys))
        steps -= 1


def make(out, workers):
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 3, seed=5)
    ds = from_litdata(out, shuffle=True, seed=1)
    upstream = ds if workers is None else litdata_loader(ds, num_workers=workers)
    return sampler, tn.Loader(es_pipe.SelectStage(upstream, sampler))


def scores(sampler):
    return {
        shard: {name: values.copy() for name, values in sampler.store.shard(shard).items()}
        for shard in sampler.store.shards
    }


_FULL: dict = {}


def uninterrupted(out, workers, total):
    """The uninterrupted run (trace, last losses, scores), once per upstream kind."""
    if (out, workers) not in _FULL:
        sampler, loader = make(out, workers)
        full, last = [], {}
        run(loader, sampler, total, full, last)
        _FULL[out, workers] = full, last, scores(sampler), sampler.store.held
    return _FULL[out, workers]


@pytest.mark.parametrize(
    "workers, split",
    [(None, 3), (None, 8), (None, 12), (2, 5)],  # 8 meta-batches an epoch; hops of 6
)
def test_es_stage_takes_scores_back_and_resumes_mid_epoch(out, tmp_path, workers, split):
    total = 20
    full, last, reference, held = uninterrupted(out, workers, total)
    # every item scored once an epoch, under its own identity, with the loss it was given
    for epoch in (0, 1):
        scored = [who for e, batch, _ in full if e == epoch for who in batch]
        assert len(scored) == len(set(scored)) == N
    assert held == N and len(last) == N
    for (shard, index), loss in last.items():
        assert reference[shard]["loss"][index] == pytest.approx(loss)
    assert 0 < sum(len(sub) for _, _, sub in full) < total * 8  # ES selected a subset

    # two checkpoints: at split, and 6 meta-batches after the resume from it
    sampler, loader = make(out, workers)
    trace = []
    run(loader, sampler, split, trace, {})
    for steps in (6, total - split - 6):
        torch.save({"loader": loader.state_dict(), "scores": sampler.state_dict()}, tmp_path / "c")
        saved = torch.load(tmp_path / "c", weights_only=True)
        sampler, loader = make(out, workers)  # as a new process would
        loader.load_state_dict(saved["loader"])
        sampler.load_state_dict(saved["scores"])
        run(loader, sampler, steps, trace, {})
    assert trace == full
    after = scores(sampler)
    assert after.keys() == reference.keys()
    for shard, columns in after.items():
        for name, values in columns.items():
            np.testing.assert_array_equal(values, reference[shard][name], err_msg=name)


def test_the_state_is_a_copy_that_survives_later_steps(out):
    ds = from_litdata(out)
    it = iter(ds)
    for _ in range(10):
        next(it)
    state = ds.state_dict()
    ds2 = from_litdata(out)
    ds2.load_state_dict(state)
    first = next(iter(ds2))
    before = ds2.state_dict()
    next(ds2)
    assert before["num_samples_yielded"] == 11  # not updated in place by litdata
    assert ds2.state_dict()["num_samples_yielded"] == 12
    assert ident([first]) == [expected(out)[10]]


def test_bad_inputs_are_named(out, written):
    pairs = from_litdata(written["pair"])
    with pytest.raises(ConfigError, match="not a dict"):
        next(iter(pairs))
    clash = from_litdata(written["clashing"])
    with pytest.raises(ConfigError, match="already have fields"):
        next(iter(clash))
    with pytest.raises(ConfigError, match="key_field 'nope'"):
        next(iter(from_litdata(out, key_field="nope")))
    with pytest.raises(ConfigError, match="key_field"):
        from_litdata(out, key_field="__key__")
    with pytest.raises(ConfigError, match="from_litdata"):
        litdata_loader(litdata.StreamingDataset(out))
    with pytest.raises(ConfigError, match="batch_size"):
        litdata_loader(from_litdata(out), batch_size=4)
    assert isinstance(from_litdata(out), litdata.StreamingDataset)
    assert isinstance(from_litdata(out), IdentifiedStreamingDataset)


def test_the_example_trains_and_resumes():
    """examples/litdata_es.py as a user runs it: its own chunks, DataLoader workers."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--samples", "600", "--epochs", "2", "--workers", "2"]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "litdata_es.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2: trained on 150 of 600 samples, 600 samples scored" in proc.stdout
    assert "same as uninterrupted: True" in proc.stdout
