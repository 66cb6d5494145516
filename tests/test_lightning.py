"""Lightning (issue 15): MetaBatch/SubBatch move like any batch, and a LightningModule
trained with the stage resumes exactly through Lightning's own checkpoint (examples/
lightning_es.py, run with real Trainers on CPU)."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torchdata.nodes as tn

import es_pipe

L = pytest.importorskip("lightning", reason="the lightning test extra is not installed")
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location(
        "lightning_es", ROOT / "examples" / "lightning_es.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*dataloader_iter.*")
        warnings.filterwarnings("ignore", message=".*ESWP pruned.*")  # a list: nothing to skip
        yield


def test_meta_and_sub_batches_move_with_lightning(example):
    """Lightning's batch transfer (``move_data_to_device``) moves them, in place: the
    stage still waits for the very object it emitted."""
    samples = example.make_samples(16)
    sampler = es_pipe.Selector(es_pipe.Evolved(), 8, 4, scoring="history")
    loader = iter(tn.Loader(es_pipe.SelectStage(samples, sampler)))
    meta = next(loader)
    moved = move_data_to_device(meta, torch.device("meta"))
    assert moved is meta and meta.data["x"].device.type == "meta"
    assert meta.data["y"].device.type == "meta"
    sub = meta.select()  # rows taken on the meta-batch's device
    assert sub.data["x"].device.type == "meta" and len(sub) == 4
    assert move_data_to_device(sub, torch.device("meta")) is sub
    sub.report(torch.ones(4))
    assert next(loader) is not meta  # the stage accepted the answer on the moved objects


@pytest.fixture(scope="module")
def whole(example, tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    module, trainer = example.fit(example.make_samples(192), epochs=3, root=root, every=3)
    return module, trainer, root


def _resumed(example, whole, ckpt: Path, tmp_path):
    module, trainer, _ = whole
    rest, again = example.fit(
        example.make_samples(192), epochs=3, root=tmp_path, ckpt_path=str(ckpt)
    )
    at = int(ckpt.stem[5:])
    assert rest.trained == module.trained[at:]  # same epochs, steps and samples
    assert again.global_step == trainer.global_step and again.current_epoch == 3
    for a, b in zip(module.state_dict().values(), rest.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # bit-identical weights
    return rest


def test_the_run_prunes_and_checkpoints(whole):
    module, trainer, root = whole
    epochs = [e for e, _, _ in module.trained]
    per_epoch = [epochs.count(e) for e in range(3)]
    assert per_epoch[0] == 6 and per_epoch[1] < 6  # 192 / 32, then ESWP prunes
    assert trainer.current_epoch == 3 and len(list(root.glob("step=*.ckpt"))) >= 4


@pytest.mark.parametrize("at", [3, 6])  # inside epoch 0; after its last step
def test_resume_inside_and_at_the_end_of_an_epoch(example, whole, tmp_path, at):
    _resumed(example, whole, whole[2] / f"step={at}.ckpt", tmp_path)


def test_resume_from_an_end_of_epoch_checkpoint(example, whole, tmp_path):
    """A checkpoint taken at an epoch's end (after the stage ended it): Lightning starts
    the next epoch, and so does the restored stage."""
    root = tmp_path / "epochs"
    example.fit(example.make_samples(192), epochs=3, root=root, every_epoch=True)
    first = min(root.glob("step=*.ckpt"), key=lambda p: int(p.stem[5:]))
    assert int(first.stem[5:]) == 6
    _resumed(example, whole, first, tmp_path / "resumed")


def test_the_example_runs_as_a_script(example):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "lightning_es.py"),
            "--samples",
            "128",
            "--epochs",
            "2",
            "--every",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical run: False" not in proc.stdout
    assert proc.stdout.count("identical run: True") >= 2
