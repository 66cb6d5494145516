"""Child process of the S3 kill test (``test_s3.py``): an ESWP run over Parquet shards on
S3 with its manifests on S3, reached through s3fs with the storage options in the
``ES_PIPE_TEST_S3`` environment variable (JSON).

Losses are a fixed function of the data and the step, so two runs that see the same
samples commit the same manifests. The child checkpoints (loader + sampler) after every
step to a local file (temporary file, fsync, ``os.replace``) and resumes from it when it
exists. ``--kill-at-publish N`` SIGKILLs the process at the N-th manifest file it
publishes (inside a commit: some files of the epoch are published, its marker is not).

``python s3_child.py SHARDS_GLOB MANIFESTS_URL CHECKPOINT [--kill-at-publish N]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import warnings

import torch
import torchdata.nodes as tn

import es_pipe
from es_pipe.manifests import Manifests
from es_pipe.manifests.commit import Committer
from es_pipe.sources import ParquetSource

EPOCHS = 3


def run(shards: str, root: str, checkpoint: str, options: dict) -> int:
    """Train to the end (from ``checkpoint`` if it exists); returns the epochs done."""
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        3,
        total_epochs=EPOCHS,
        seed=5,
        eswp=es_pipe.ESWP(
            prune=es_pipe.Pruning(ratio=0.5, anneal=0),
            manifests=Manifests(root, storage_options=options),
        ),
        rank=0,
        world_size=1,
    )
    source = ParquetSource(
        shards,
        key_column="key",
        shuffle=True,
        seed=5,
        pruned=sampler.pruned,
        storage_options=options,
    )
    loader = tn.Loader(es_pipe.SelectStage(source, sampler))
    if os.path.exists(checkpoint):
        saved = torch.load(checkpoint, weights_only=True)
        loader.load_state_dict(saved["loader"])
        sampler.load_state_dict(saved["scores"])
    while True:
        it = iter(loader)  # starts (or resumes) the next epoch
        if sampler.epoch >= EPOCHS:
            return sampler.epoch
        for meta in it:
            losses = meta.data["x"][:, 0].abs() + 0.1 * (sampler.step % 5)
            meta.select(losses)
            tmp = checkpoint + ".tmp"
            with open(tmp, "wb") as f:
                torch.save({"loader": loader.state_dict(), "scores": sampler.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, checkpoint)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("shards")
    p.add_argument("manifests")
    p.add_argument("checkpoint")
    p.add_argument("--kill-at-publish", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # re-commit and lease take-over warnings are expected
    if args.kill_at_publish is not None:
        original, calls = Committer._publish, [0]

        def publish(self, entry):
            calls[0] += 1
            if calls[0] == args.kill_at_publish:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, entry)

        Committer._publish = publish
    options = json.loads(os.environ["ES_PIPE_TEST_S3"])
    print("finished", run(args.shards, args.manifests, args.checkpoint, options))


if __name__ == "__main__":
    main()
