import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from _s3 import s3  # noqa: F401 (the session's moto S3 server: tests/_s3.py)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)


def keyed_samples(n: int, shard: str = "shard-0", dim: int = 4) -> list[dict]:
    """Sample dicts with the identity fields es_pipe's sources add."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g)
    return [
        {"x": x[i], "y": i % 3, "__key__": f"k{i:05d}", "__shard__": shard, "__index__": i}
        for i in range(n)
    ]


@pytest.fixture
def samples():
    return keyed_samples(50)


@pytest.fixture(scope="module", autouse=True)
def _sweep_report():
    """After each module, the bad-input sweeps' counts of outcomes are printed and merged
    into ``$ES_PIPE_SWEEP_REPORT`` (nothing where the module swept nothing; tests/_sweep.py)."""
    from _sweep import dump_report  # es_pipe importable: ROOT is on sys.path by now

    yield
    dump_report()


@pytest.fixture
def quiet():
    """Warnings ignored for one test: the bad-input sweeps pass deprecated and odd arguments
    on purpose, thousands of times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _manifest_columns(n, seed=0):
    gen = np.random.default_rng(seed)
    return {
        "score": gen.random(n).astype(np.float32),
        "loss": gen.random(n).astype(np.float32),
        "visits": gen.integers(0, 9, n).astype(np.uint32),
        "step": gen.integers(0, 1000, n).astype(np.int32),
        "state": np.zeros(n, np.uint8),
    }


@pytest.fixture(scope="module")
def manifest_root(tmp_path_factory):
    """A manifests folder with two committed epochs of two shards (``a.tar``, ``b.tar``, 30
    rows each), written by es_pipe: what the manifest and CLI sweeps corrupt and read."""
    from es_pipe.manifests import Manifests

    root = tmp_path_factory.mktemp("manifests") / "m"
    for epoch in (0, 1):
        m = Manifests(str(root))
        for i, shard in enumerate(["a.tar", "b.tar"]):
            m.write_shard(
                epoch,
                shard,
                _manifest_columns(30, i + epoch),
                keys=pa.array([f"k{j}" for j in range(30)]),
                factor=1.25,
            )
        m.finish(epoch)
        m.commit(epoch, hyper={"step": 7 + epoch})
    return root
