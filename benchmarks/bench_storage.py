"""Object-store benchmarks on a local moto S3 server (``tests/_s3.py``), side by side in
one run, median of ``--reps`` repetitions:

* ``es-pipe index`` (``index_shards``) over ``--shards`` tars written by
  ``webdataset.TarWriter`` on S3: ``--jobs`` threads against 1 thread;
* the time until an unreachable S3 endpoint is reported (``StorageError``): es_pipe's
  default botocore retries against botocore's own default (legacy mode, 5 tries).

    python benchmarks/bench_storage.py [--shards 64 --samples 50 --jobs 8 --reps 5]

The server runs in a process of its own. A local moto server answers in about a
millisecond; real object stores take 10-100 ms per request, which threads overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import s3fs
import webdataset as wds

from es_pipe.errors import StorageError
from es_pipe.indexing import index_shards


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    # the server in a process of its own, as a real store would be (not sharing our GIL)
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    code = (
        "import json, sys; from _s3 import moto_s3\n"
        "with moto_s3() as s3:\n"
        "    print(json.dumps([s3.bucket(), s3.options()]), flush=True); sys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        bucket, opts = json.loads(server.stdout.readline())
        fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        for i in range(args.shards):
            with fs.open(f"{bucket}/w-{i:04d}.tar", "wb") as f, wds.TarWriter(f) as sink:
                for j in range(args.samples):
                    sink.write({"__key__": f"k{j:05d}", "txt": "x" * 100, "cls": "1"})
        urls = [f"s3://{bucket}/w-{i:04d}.tar" for i in range(args.shards)]
        serial, threads = [], []
        for _ in range(args.reps):  # interleaved
            serial.append(timed(lambda: index_shards(urls, storage_options=opts, jobs=1)))
            threads.append(timed(lambda: index_shards(urls, storage_options=opts, jobs=args.jobs)))
        t1, tj = statistics.median(serial), statistics.median(threads)
        print(f"index {args.shards} TarWriter shards x {args.samples} samples on moto S3:")
        print(f"  jobs=1 {t1:.3f} s, jobs={args.jobs} {tj:.3f} s: {t1 / tj:.2f}x faster")

        dead = {**opts, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
        legacy = {**dead, "config_kwargs": {"retries": {"mode": "legacy"}}}

        def fail(options) -> None:
            try:
                index_shards(urls[:1], storage_options=options, jobs=1)
            except StorageError:
                return
            raise AssertionError("no StorageError")

        ours, theirs = [], []
        for _ in range(min(args.reps, 3)):
            ours.append(timed(lambda: fail(dead)))
            theirs.append(timed(lambda: fail(legacy)))
        a, b = statistics.median(ours), statistics.median(theirs)
        print("unreachable endpoint until StorageError:")
        print(f"  es_pipe default {a:.2f} s, botocore default {b:.2f} s: {b / a:.1f}x sooner")
    finally:
        server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
