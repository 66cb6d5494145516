"""One epoch clock: the stage drives its source's epoch from the sampler's.

A real ESWP run (4 shards x 7 samples written by es_pipe's shard writer, B=8, Parquet
manifests, a small model trained with SGD) is checkpointed at the end of an epoch, the
two ways a trainer gets such a checkpoint: (a) after the ``for meta in loader`` loop
ends, (b) right after the last ``select()`` of an epoch whose final meta-batch is short.
Restored into fresh objects (as a restarted process builds them: the sampler resumes from
the manifests first), the run must read the same samples in every epoch, select and train
the same ones, and end with the same model and committed manifests as the uninterrupted
run. Issue 11, items 1 and 2: the restored source stayed one epoch behind the sampler.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from torch.utils.data import DataLoader

import es_pipe
from es_pipe.errors import ConfigError
from es_pipe.manifests import Manifests
from es_pipe.shard_writer import write_shards
from es_pipe.sources import ParquetSource, SourceDataset, WebDatasetSource

SHARDS, PER_SHARD, DIM = 4, 7, 4
B, b = 8, 3
EPOCHS = 5
SEED = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, list[str]]:
    """The same 4 x 7 samples as Parquet and as WebDataset tar shards."""
    folder = tmp_path_factory.mktemp("clock-shards")
    urls: dict[str, list[str]] = {"parquet": [], "tar": []}
    for i in range(SHARDS):
        gen = np.random.default_rng(100 + i)
        x = gen.normal(size=(PER_SHARD, DIM)).astype(np.float32)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
        keys = [f"s{i}-{j}" for j in range(PER_SHARD)]
        urls["parquet"] += write_shards(
            {"key": np.array(keys), "x": x, "y": y},
            f"{folder}/train{i}-%03d.parquet",
            "parquet",
            10_000,
            index=False,
        )
        samples = [
            {"__key__": k, "x.bin": x[j].tobytes(), "cls": int(y[j])} for j, k in enumerate(keys)
        ]
        urls["tar"] += write_shards(
            samples, f"{folder}/train{i}-%03d.tar", "tar", 10_000, index=False
        )
    return urls


def decode(sample: dict) -> dict:
    return {
        "x": torch.from_numpy(np.frombuffer(sample["x.bin"], np.float32).copy()),
        "y": int(sample["cls"]),
        **{k: sample[k] for k in ("__key__", "__shard__", "__index__")},
    }


@dataclass
class Run:
    sampler: es_pipe.Selector
    loader: tn.Loader
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    source: Any


def build(data, fmt: str, root, wrap: str = "node") -> Run:
    """The run's objects, as a (re)started process builds them. The source gets no
    ``epoch=``: the stage sets it from the sampler."""
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        B,
        b,
        total_epochs=EPOCHS,
        seed=SEED,
        rank=0,
        world_size=1,
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5, anneal=0), manifests=str(root)),
    )
    common = {"shuffle": True, "seed": SEED, "pruned": sampler.pruned, "rank": 0, "world_size": 1}
    if fmt == "parquet":
        source = ParquetSource(data["parquet"], key_column="key", columns=["x", "y"], **common)
        node: Any = source
    else:
        source = WebDatasetSource(data["tar"], **common)
        node = tn.Mapper(source, decode)
    if wrap == "dataloader":  # the DataLoader adapter, one worker process
        node = DataLoader(SourceDataset(source), batch_size=None, num_workers=1)
    elif wrap == "threads":  # decoded by threads, prefetched
        mapped = tn.ParallelMapper(source, decode, num_workers=2, method="thread")
        node = tn.Prefetcher(mapped, prefetch_factor=4)
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    return Run(sampler, tn.Loader(es_pipe.SelectStage(node, sampler)), model, opt, source)


def checkpoint(run: Run) -> dict:
    buffer = io.BytesIO()
    torch.save(
        {
            "loader": run.loader.state_dict(),
            "scores": run.sampler.state_dict(),
            "model": run.model.state_dict(),
            "opt": run.opt.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def restore(run: Run, saved: dict) -> Run:
    run.loader.load_state_dict(saved["loader"])
    run.sampler.load_state_dict(saved["scores"])
    run.model.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["opt"])
    return run


def train(run: Run, log: list, stop: tuple[str, int] | None = None) -> dict | None:
    """Train until ``EPOCHS``; log ``(epoch, keys read, keys trained, loss)`` per step.
    ``stop=("end", k)``: checkpoint after the loop of epoch ``k`` ends and return it;
    ``("short", k)``: after the select of epoch ``k``'s short final meta-batch."""
    sampler, model = run.sampler, run.model
    while True:
        it = iter(run.loader)  # applies a loaded checkpoint; may close the epoch it ended in
        if sampler.epoch >= EPOCHS:
            return None
        epoch = sampler.epoch
        for meta in it:
            x, y = meta.data["x"], meta.data["y"]
            with torch.no_grad():
                scored = F.cross_entropy(model(x), y, reduction="none")
            sub = meta.select(scored if meta.needs_losses else None)
            short = stop == ("short", epoch) and len(meta) < B
            if short:
                saved = checkpoint(run)  # right after select(), before training on it
            per = F.cross_entropy(model(sub.data["x"]), sub.data["y"], reduction="none")
            loss = per if sub.weights is None else per * sub.weights
            run.opt.zero_grad()
            loss.mean().backward()
            run.opt.step()
            log.append((epoch, meta.keys, sub.keys, float(loss.detach().mean()).hex()))
            if short:
                saved["model"], saved["opt"] = checkpoint(run)["model"], checkpoint(run)["opt"]
                return saved
        if stop == ("end", epoch):
            return checkpoint(run)


def per_epoch_read(log: list) -> list[int]:
    counts = [0] * EPOCHS
    for epoch, read, _, _ in log:
        counts[epoch] += len(read)
    return counts


def committed(root) -> dict:
    m = Manifests(str(root))
    return {e: m.read_epoch(e).to_pydict() for e in m.committed()}


_FULL: dict = {}


def uninterrupted(data, fmt, tmp_path_factory) -> tuple[list, dict, dict]:
    if fmt not in _FULL:
        root = tmp_path_factory.mktemp(f"full-{fmt}")
        run, log = build(data, fmt, root), []
        train(run, log)
        _FULL[fmt] = (log, run.model.state_dict(), committed(root))
    return _FULL[fmt]


def assert_same_run(log, run, root, full) -> None:
    full_log, full_model, full_manifests = full
    assert per_epoch_read(log) == per_epoch_read(full_log)
    assert log == full_log
    for name, value in full_model.items():
        assert torch.equal(run.model.state_dict()[name], value), name
    got = committed(root)
    assert sorted(got) == sorted(full_manifests) == list(range(EPOCHS))
    for epoch, table in full_manifests.items():
        for column, values in table.items():
            assert got[epoch][column] == values, (epoch, column)


@pytest.mark.parametrize("fmt", ["parquet", "tar"])
@pytest.mark.parametrize("way", ["end", "short"], ids=["after-loop", "after-short-select"])
@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_end_of_epoch_checkpoint_resumes_into_the_right_epoch(
    data, tmp_path, tmp_path_factory, fmt, way, which
):
    full = uninterrupted(data, fmt, tmp_path_factory)
    # epochs (not the first or last) whose final meta-batch is short: pruning decides
    # which, from seeds that include the shards' paths
    short_finals = sorted({e for e, read, _, _ in full[0] if len(read) < B} & {1, 2, 3})
    assert short_finals, "the data must give some epoch a short final meta-batch"
    epoch = short_finals[which]

    head: list = []
    saved = train(build(data, fmt, tmp_path), head, stop=(way, epoch))
    assert saved is not None
    # a fresh process: the sampler resumes from the manifests, then the checkpoint loads
    run = restore(build(data, fmt, tmp_path), saved)
    tail: list = []
    train(run, tail)
    assert_same_run(head + tail, run, tmp_path, full)


@pytest.mark.parametrize("fmt", ["parquet", "tar"])
def test_resume_at_a_boundary_needs_no_epoch_argument(data, tmp_path, tmp_path_factory, fmt):
    """The README's boundary resume: a new process with the same manifests= and no
    checkpoint of the loader; the source is built without epoch= (issue 11, item 2)."""
    full = uninterrupted(data, fmt, tmp_path_factory)
    run, head = build(data, fmt, tmp_path), []
    saved = train(run, head, stop=("end", 2))
    run = build(data, fmt, tmp_path)  # resumes after the newest committed epoch
    assert run.sampler.epoch == 3 and run.source.epoch == 0
    run.model.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["opt"])
    tail: list = []
    train(run, tail)
    assert_same_run(head + tail, run, tmp_path, full)
    assert run.source.epoch == run.sampler.epoch == EPOCHS  # iter() after the last epoch


@pytest.mark.parametrize("way", ["end", "short"], ids=["after-loop", "after-short-select"])
def test_a_source_under_threaded_nodes_resumes_into_the_right_epoch(
    data, tmp_path, tmp_path_factory, way
):
    """tn.ParallelMapper (threads) and tn.Prefetcher between the stage and the source:
    the stage reaches the source through them. (At 3d23362 this case happened to work:
    the prefetching thread pulled the restored source to its end, which advanced it.)"""
    full = uninterrupted(data, "tar", tmp_path_factory)
    epoch = sorted({e for e, read, _, _ in full[0] if len(read) < B} & {1, 2, 3})[0]
    head: list = []
    saved = train(build(data, "tar", tmp_path, wrap="threads"), head, stop=(way, epoch))
    run = restore(build(data, "tar", tmp_path, wrap="threads"), saved)
    tail: list = []
    train(run, tail)
    assert_same_run(head + tail, run, tmp_path, full)


def test_a_source_in_dataloader_workers_follows_the_sampler(data, tmp_path, tmp_path_factory):
    """A DataLoader worker reads a copy of the source made at each epoch's start: the
    stage sets the epoch of the DataLoader's SourceDataset before it, so every epoch
    reads its own shard order and pruning, like the source in the trainer's process."""
    full = uninterrupted(data, "parquet", tmp_path_factory)
    run, log = build(data, "parquet", tmp_path, wrap="dataloader"), []
    train(run, log)
    assert_same_run(log, run, tmp_path, full)


def test_a_checkpoint_whose_source_and_sampler_disagree_is_refused(data, tmp_path):
    """The loader state of one checkpoint with the sampler position of another (or one
    saved after a resume that let the source fall behind): a ConfigError that names the
    fix, and nothing restored; the right checkpoint still loads."""
    run, log = build(data, "parquet", tmp_path), []
    early = train(run, log, stop=("end", 0))  # source done with epoch 0, sampler in 1
    later = train(run, log, stop=("end", 1))  # source done with epoch 1, sampler in 2
    mixed = {**later["loader"], "root": {**later["loader"]["root"]}}
    mixed["root"]["source"] = early["loader"]["root"]["source"]

    fresh = build(data, "parquet", tmp_path / "other")
    before = fresh.sampler.get_state()
    fresh.loader.load_state_dict(mixed)
    with pytest.raises(ConfigError, match=r"source is in epoch 0 but its sampler in epoch 1"):
        iter(fresh.loader)
    assert fresh.sampler.get_state() == before
    fresh.loader.load_state_dict(later["loader"])
    iter(fresh.loader)
    assert fresh.sampler.epoch == fresh.source.epoch == 2


class Relay(tn.BaseNode):
    """A node between the stage and the source with a set_epoch that is not passed on."""

    def __init__(self, source: tn.BaseNode) -> None:
        super().__init__()
        self.source = source

    def set_epoch(self, epoch: int) -> None:
        pass

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(None if initial_state is None else initial_state["source"])

    def next(self) -> dict:
        return next(self.source)

    def get_state(self) -> dict:
        return {"source": self.source.state_dict()}


def test_a_source_the_stage_cannot_drive_is_refused_when_it_disagrees(data, tmp_path):
    run, log = build(data, "parquet", tmp_path), []
    train(run, log, stop=("end", 1))
    sampler = build(data, "parquet", tmp_path).sampler  # resumes in epoch 2
    source = ParquetSource(data["parquet"], key_column="key", columns=["x", "y"], shuffle=True)
    loader = tn.Loader(es_pipe.SelectStage(Relay(source), sampler))
    with pytest.raises(ConfigError, match="reads epoch 0 but the sampler is in epoch 2"):
        iter(loader)


def train_steps(run: Run, log: list, steps: int) -> dict:
    """Train ``steps`` more steps (across epochs), then checkpoint, as ``train`` does."""
    sampler, model = run.sampler, run.model
    while True:
        it = iter(run.loader)
        assert sampler.epoch < EPOCHS
        epoch = sampler.epoch
        for meta in it:
            x, y = meta.data["x"], meta.data["y"]
            with torch.no_grad():
                scored = F.cross_entropy(model(x), y, reduction="none")
            sub = meta.select(scored if meta.needs_losses else None)
            per = F.cross_entropy(model(sub.data["x"]), sub.data["y"], reduction="none")
            loss = per if sub.weights is None else per * sub.weights
            run.opt.zero_grad()
            loss.mean().backward()
            run.opt.step()
            log.append((epoch, meta.keys, sub.keys, float(loss.detach().mean()).hex()))
            steps -= 1
            if steps == 0:
                return checkpoint(run)


@pytest.mark.parametrize("fmt", ["parquet", "tar"])
@pytest.mark.parametrize("way", ["end", "short"], ids=["after-loop", "after-short-select"])
def test_a_checkpoint_in_the_epoch_after_an_end_of_epoch_restore_is_current(
    data, tmp_path, tmp_path_factory, fmt, way
):
    """Bug A of the random-time kill harness (issue 11): restored at the end of an epoch,
    torchdata's Loader looked one item ahead, met the epoch's end, started the next epoch
    and kept the end-of-epoch state as its cached ``state_dict`` for the whole next epoch:
    a checkpoint taken in that epoch sent the next restart back to the previous one. The
    stage now starts the next epoch inside ``reset()``."""
    full = uninterrupted(data, fmt, tmp_path_factory)
    epoch = sorted({e for e, read, _, _ in full[0] if len(read) < B} & {1, 2, 3})[0]
    head: list = []
    saved = train(build(data, fmt, tmp_path), head, stop=(way, epoch))
    run = restore(build(data, fmt, tmp_path), saved)
    middle: list = []
    saved = train_steps(run, middle, 2)  # inside the next epoch
    assert {e for e, *_ in middle} == {epoch + 1}
    assert saved["loader"]["root"]["sampler"]["epoch"] == epoch + 1
    run = restore(build(data, fmt, tmp_path), saved)
    tail: list = []
    train(run, tail)
    assert_same_run(head + middle + tail, run, tmp_path, full)


def test_restored_where_the_epoch_ends_exactly_the_next_epoch_starts(tmp_path):
    """Bug A, the other way to meet it: 2 shards x 8 samples, B=8, checkpointed after an
    epoch's last full meta-batch (the source has not noticed its end yet). The Loader's
    look-ahead after the restore must find the next epoch's first meta-batch, and a
    checkpoint taken in that epoch must hold that epoch's position."""
    keys = [f"k{i:02d}" for i in range(16)]
    x = np.arange(16 * DIM, dtype=np.float32).reshape(16, DIM)
    urls = write_shards(
        {"key": np.array(keys), "x": x}, f"{tmp_path}/exact-%03d.parquet", "parquet", 8
    )

    def build_exact() -> tuple[es_pipe.Selector, tn.Loader]:
        sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 3, seed=SEED, rank=0, world_size=1)
        source = ParquetSource(urls, key_column="key", columns=["x"], shuffle=True, seed=SEED)
        return sampler, tn.Loader(es_pipe.SelectStage(source, sampler))

    def steps(sampler, loader, n: int | None, log: list) -> dict | None:
        while True:
            it = iter(loader)  # applies a loaded checkpoint
            if sampler.epoch >= 4:
                return None
            epoch = sampler.epoch
            for meta in it:
                sub = meta.select(meta.data["x"].sum(1) % 7 + 1)
                log.append((epoch, meta.keys, sub.keys))
                if n is not None and len(log) == n:
                    return {"loader": loader.state_dict(), "scores": sampler.state_dict()}

    full: list = []
    steps(*build_exact(), None, full)
    assert [e for e, *_ in full] == [0, 0, 1, 1, 2, 2, 3, 3]
    log: list = []
    saved = steps(*build_exact(), 4, log)  # the end of epoch 1, not yet noticed
    for n in (5, None):  # a checkpoint inside epoch 2, then to the end
        sampler, loader = build_exact()
        sampler.load_state_dict(saved["scores"])
        loader.load_state_dict(saved["loader"])
        saved = steps(sampler, loader, n, log)
        if saved is not None:
            assert saved["loader"]["root"]["sampler"]["epoch"] == 2
    assert log == full
