"""The examples run, at tiny sizes, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_webdataset_pipeline() -> None:
    out = run("webdataset_pipeline.py", "--samples", "1000", "--epochs", "2")
    assert "epoch 2: trained on 250 of 1000 samples" in out


def test_hf_datasets() -> None:
    pytest.importorskip("datasets", reason="pip install 'datasets>=2.18'")
    out = run("hf_datasets.py", "--samples", "1000", "--epochs", "2")
    assert "epoch 2: trained on 250 of 1000 samples, 1000 samples scored" in out
    assert "same as uninterrupted: True" in out


def test_lm_pretrain(tmp_path: Path) -> None:
    out = run(
        "lm_pretrain.py",
        "--samples",
        "256",
        "--epochs",
        "1",
        "--window",
        "64",
        "--out",
        str(tmp_path),
    )
    assert "epoch 1: held-out loss" in out and "% of a training step" in out
    assert list((tmp_path / "shards").glob("train-*.tar"))


@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist() -> None:
    out = run("fashion_mnist.py", "--train-samples", "500", "--epochs", "1")
    assert "epoch 1: test accuracy" in out


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path) -> None:
    env = {**os.environ, "FASHION_MNIST_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fashion_mnist.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "apt-get install -y dataset-fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchrun_lm_on_two_ranks_then_resumed_on_one(tmp_path: Path) -> None:
    def torchrun(n: int, *args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={n}", str(ROOT / "examples" / "torchrun_lm.py")]
        cmd += ["--samples", "1024", "--window", "32", "--out", str(tmp_path), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = torchrun(2, "--epochs", "2")
    assert "epoch 1: held-out loss" in out and "on 2 ranks, 1024 samples read (0 repeated" in out
    assert "epoch 2: held-out loss" in out and "512 scores held per rank" in out
    out = torchrun(1, "--epochs", "3", "--resume")
    assert "epoch 1:" not in out and "epoch 3: held-out loss" in out and "on 1 ranks" in out
