"""Child process of the crash tests: writes epoch 1 of a manifest root and SIGKILLs itself
at a chosen point (a real kill, nothing is mocked in the parent's view)."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pyarrow as pa

from es_pipe.manifests import Manifests, layout
from es_pipe.manifests.commit import Committer
from es_pipe.manifests.fs import ManifestFS

SHARDS = ["a.tar", "b.tar", "c.tar"]


def columns(epoch: int, i: int, n: int = 500) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(100 * epoch + i)
    return {
        "score": gen.random(n).astype(np.float32),
        "loss": gen.random(n).astype(np.float32),
        "visits": np.ones(n, np.uint32),
        "step": np.full(n, epoch, np.int32),
        "state": (gen.random(n) < 0.3).astype(np.uint8),
    }


def write_epoch(root: str, epoch: int, point: str | None = None) -> None:
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    m = Manifests(root)
    original_put = ManifestFS.put
    original_replace = os.replace
    original_publish = Committer._publish
    calls = {"publish": 0}

    def put(self, path, data, *, atomic):
        if point == "write" and path.endswith(".part") and "b.tar" in path:
            with open(path, "wb") as handle:  # half a file, then the power goes out
                handle.write(data[: len(data) // 2])
            die()
        return original_put(self, path, data, atomic=atomic)

    def replace(src, dst):
        if point == "finish" and "_done" in dst:
            die()
        if point == "marker" and layout.COMMITS in dst:
            die()
        return original_replace(src, dst)

    def publish(self, entry):
        calls["publish"] += 1
        if point == "publish" and calls["publish"] == 2:
            die()
        return original_publish(self, entry)

    ManifestFS.put = put
    Committer._publish = publish
    os.replace = replace
    for i, shard in enumerate(SHARDS):
        keys = pa.array([f"{shard}-{j}" for j in range(500)])
        m.write_shard(epoch, shard, columns(epoch, i), keys=keys)
    if point == "before":
        die()
    m.finish(epoch)
    if point == "cleanup":
        m.fs.rm = lambda *a, **k: die()
    m.commit(epoch)
    if point == "after":
        die()


if __name__ == "__main__":
    write_epoch(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
