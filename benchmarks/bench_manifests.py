"""Manifest write and read rate (rows/s) and score-store memory per sample held.

    PYTHONPATH=. python benchmarks/bench_manifests.py --rows 10_000_000 --shards 100

Write: every shard's manifest built from score-store columns + keys, encoded as Parquet,
staged, the rank's done-file, and the epoch committed (publish + marker). Read: the
restore path, every shard's committed manifest read, size + crc32 checked, decoded to
numpy and loaded into a fresh ScoreStore. Goals: >= 5M rows/s each way, <= 16 B/sample.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from es_pipe.manifest import Manifests
from es_pipe.scores import ScoreStore


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--root", help="manifest root (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    per = args.rows // args.shards
    gen = np.random.default_rng(0)
    shards = [f"s3://bucket/data/train-{i:06d}.tar" for i in range(args.shards)]

    # the score store holding every sample, as a rank would
    store = ScoreStore()
    for shard in shards:
        store.reserve(shard, per)
        store.load_shard(
            shard,
            {
                "score": gen.random(per, np.float32),
                "loss": gen.random(per, np.float32),
                "visits": gen.integers(1, 5, per).astype(np.uint32),
                "step": gen.integers(0, 10**6, per).astype(np.int32),
            },
        )
    held, grown = store.held, store.nbytes  # arena capacity after incremental growth
    store.compact()  # what the sampler does at every epoch boundary
    nbytes = store.nbytes
    payload = sum(v.nbytes for shard in shards for v in store.shard(shard).values())
    ordinals = pa.array(np.arange(per)).cast(pa.string())
    keys = {s: pc.binary_join_element_wise(f"{s[-10:-4]}-", ordinals, "") for s in shards}
    states = {s: (gen.random(per) < 0.15).astype(np.uint8) for s in shards}

    root = args.root or tempfile.mkdtemp(prefix="bench-manifests-")
    write_s, read_s = [], []
    try:
        for attempt in range(args.repeat):
            epoch = attempt
            t0 = time.perf_counter()
            m = Manifests(root)
            m.write_shards(
                epoch,
                (
                    {
                        "shard": shard,
                        "columns": {**store.shard(shard), "state": states[shard]},
                        "keys": keys[shard],
                        "factor": 1.2,
                    }
                    for shard in shards
                ),
            )
            m.finish(epoch)
            m.commit(epoch)
            write_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            reader, fresh = Manifests(root), ScoreStore()
            for got in reader.read_shards(shards, epoch):
                fresh.reserve(got.shard, got.rows)
                fresh.load_shard(got.shard, got.columns)
            read_s.append(time.perf_counter() - t0)
            last = shards[-1]
            assert np.array_equal(fresh.shard(last)["score"], store.shard(last)["score"])
        size = sum(e["size"] for e in Manifests(root).marker(args.repeat - 1)["files"])
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    rows = per * args.shards
    result = {
        "rows": rows,
        "shards": args.shards,
        "write_rows_per_s": rows / statistics.median(write_s),
        "read_rows_per_s": rows / statistics.median(read_s),
        "write_s": write_s,
        "read_s": read_s,
        "bytes_on_disk_per_row": size / rows,
        "score_store_bytes_per_sample": payload / held,
        "score_store_arena_bytes_per_sample": nbytes / held,
        "score_store_grown_bytes_per_sample": grown / held,
        "pruning_state_bytes_per_sample": 1.0,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{rows:,} rows in {args.shards} shards, median of {args.repeat}")
        print(
            f"write+commit: {result['write_rows_per_s'] / 1e6:6.2f} M rows/s "
            f"({statistics.median(write_s):.2f} s; goal >= 5)"
        )
        print(
            f"read+verify : {result['read_rows_per_s'] / 1e6:6.2f} M rows/s "
            f"({statistics.median(read_s):.2f} s; goal >= 5)"
        )
        print(f"on disk     : {result['bytes_on_disk_per_row']:.1f} B/row (lz4 Parquet)")
        print(
            f"score store : {result['score_store_bytes_per_sample']:.2f} B/sample held "
            f"(goal <= 16); arena {result['score_store_arena_bytes_per_sample']:.2f} B/sample "
            f"after the epoch-boundary compaction, "
            f"{result['score_store_grown_bytes_per_sample']:.2f} while growing; "
            "+ 1 B/sample pruning state when prune= is on"
        )
    return result


if __name__ == "__main__":
    main()
