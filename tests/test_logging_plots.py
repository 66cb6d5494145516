"""The ``es_pipe`` logger reports epoch ends and commits, restores and skips, besides the
warnings; plots without matplotlib degrade to a clear message naming the extra (issue 15,
"small things users expect"). matplotlib is made unimportable in a real subprocess."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torchdata.nodes as tn

import es_pipe
from es_pipe.shard_writer import write_shards
from es_pipe.sources import WebDatasetSource

ROOT = Path(__file__).resolve().parents[1]
NO_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
)


def _epochs(loader, n: int) -> None:
    for _ in range(n):
        for meta in loader:
            meta.select(meta.data["x"][:, 0] + 0.5)


def _tars(tmp_path: Path) -> list[str]:
    import numpy as np

    write_shards(
        [{"__key__": f"s{i}", "x.npy": np.float32([i % 7])} for i in range(60)],
        str(tmp_path / "d-%02d.tar"),
        samples_per_shard=20,
    )
    return sorted(str(p) for p in tmp_path.glob("d-*.tar"))


def _decode(sample: dict) -> dict:
    import io

    import numpy as np
    import torch

    x = torch.from_numpy(np.load(io.BytesIO(sample["x.npy"])))
    return {"x": x, **{k: sample[k] for k in ("__key__", "__shard__", "__index__")}}


def test_the_logger_reports_commits_restores_and_skips(tmp_path, caplog):
    urls = _tars(tmp_path)
    manifests = str(tmp_path / "m")
    caplog.set_level(logging.DEBUG, logger="es_pipe")

    def run(epochs: int) -> es_pipe.Selector:
        sampler = es_pipe.Selector(
            es_pipe.Evolved(),
            10,
            10,
            seed=0,
            total_epochs=4,
            eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5, anneal=0), manifests=manifests),
        )
        source = WebDatasetSource(urls, pruned=sampler.pruned)
        _epochs(tn.Loader(es_pipe.SelectStage(tn.Mapper(source, _decode), sampler)), epochs)
        return sampler

    run(2)
    text = caplog.text
    assert "epoch 0 committed under" in text and "epoch 1 committed under" in text
    assert "epoch 0 ended at step 6" in text
    assert "prune" in text and "in epoch 1" in text
    assert "pruned samples skipped unread" in text  # a DEBUG line per shard
    caplog.clear()
    run(1)  # a new process would do this: resume from the manifests
    text = caplog.text
    assert "resuming from the manifests under" in text and "continuing at epoch 2" in text
    assert "restored the scores of shard" in text
    assert all(r.name.startswith("es_pipe") for r in caplog.records)


def test_the_logger_reports_a_restored_stage(caplog):
    samples = [
        {"x": float(i), "__key__": f"k{i}", "__shard__": "s", "__index__": i} for i in range(20)
    ]
    sampler = es_pipe.Selector(es_pipe.Evolved(), 5, 5, seed=0)
    loader = tn.Loader(es_pipe.SelectStage(samples, sampler))
    it = iter(loader)
    next(it).select([1.0] * 5)
    state = loader.state_dict()
    caplog.set_level(logging.INFO, logger="es_pipe")
    loader.load_state_dict(state)
    next(iter(loader))
    assert "stage restored in epoch 0 at step 1" in caplog.text


def test_skipped_shards_are_logged_and_still_warned(tmp_path, caplog):
    urls = _tars(tmp_path)
    Path(urls[1]).write_bytes(b"not a tar" * 100)
    caplog.set_level(logging.INFO, logger="es_pipe")
    source = WebDatasetSource(urls, on_error="skip")
    with pytest.warns(UserWarning, match="skipping the rest of a shard"):
        n = sum(1 for _ in tn.Loader(source))
    assert n == 40
    assert "skipping the rest of shard" in caplog.text and urls[1] in caplog.text
    assert "40 samples read" in caplog.text


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", NO_MATPLOTLIB + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_inspect_plot_without_matplotlib_names_the_extra(tmp_path):
    urls = _tars(tmp_path)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(), 10, 10, seed=0, eswp=es_pipe.ESWP(manifests=str(tmp_path / "m"))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _epochs(
            tn.Loader(es_pipe.SelectStage(tn.Mapper(WebDatasetSource(urls), _decode), sampler)),
            1,
        )
    proc = _python(
        f"""
        from es_pipe.tools.cli import main
        raise SystemExit(main(["inspect", {str(tmp_path / "m")!r}, "--plot", "p.png"]))
        """,
        tmp_path,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode != 0 and "matplotlib" in proc.stderr and "es_pipe[plot]" in proc.stderr
    assert not (tmp_path / "p.png").exists()


def test_demo_without_matplotlib_names_the_extra(tmp_path):
    proc = _python(
        """
        from es_pipe.tools.cli import main
        raise SystemExit(main(["demo", "--samples", "128", "--val-samples", "32", "--epochs", "1",
                               "--methods", "uniform", "--batch-size", "32", "--d-model", "16",
                               "--layers", "1", "--no-progress", "--out", "out"]))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "needs matplotlib" in proc.stderr and "es_pipe[plot]" in proc.stderr
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").glob("*.png"))
