import sys
from pathlib import Path

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
