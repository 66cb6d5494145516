"""One rank of the `es-pipe index` torchrun test: reads webdataset-written tars through an
index file with ``equalize=``, all-gathers how many samples each rank read (gloo), and
writes its keys and the gathered counts (for equalize="drop" and "pad") to ``--out`` for the parent to check."""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from es_pipe.sources import ShardList, WebDatasetSource


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for equalize in ("drop", "pad"):
        src = WebDatasetSource(ShardList.from_index(args.index), equalize=equalize, shuffle=False)
        keys = [(s["__shard__"].rsplit("/", 1)[-1], s["__key__"]) for s in src]
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([len(keys)]))
        result[equalize] = {"keys": keys, "counts": [int(c) for c in counts]}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
