"""Manifest write and read rate (rows/s) and score-store memory per sample held.

    PYTHONPATH=. python benchmarks/bench_manifests.py --rows 10_000_000 --shards 100

Write: every shard's manifest built from score-store columns + keys, encoded as Parquet,
staged, the rank's done-file, and the epoch committed (publish + marker). Read: the
restore path, every shard's committed manifest read, size + crc32 checked, decoded to
numpy and loaded into a fresh ScoreStore. Goals: >= 5M rows/s each way, <= 16 B/sample.

``--inspect-rss`` (issue 11): peak memory of ``es-pipe inspect ROOT --epoch 0`` on a root
with 1 committed epoch and on one with 5 (``--rows`` rows per epoch, default 5M), each
run in a fresh subprocess (its ``ru_maxrss`` from ``os.wait4``), median of ``--repeat``;
``--baseline PATH`` also runs the es_pipe found at PATH (e.g. an older checkout) the same
way, side by side::

    PYTHONPATH=. python benchmarks/bench_manifests.py --inspect-rss --rows 5_000_000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from es_pipe.manifests import Manifests
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
    parser.add_argument(
        "--inspect-rss", action="store_true", help="peak RSS of `es-pipe inspect`, 1 vs 5 epochs"
    )
    parser.add_argument("--baseline", help="with --inspect-rss: also run the es_pipe at PATH")
    args = parser.parse_args(argv)
    if args.inspect_rss:
        return inspect_rss(args)
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


def _write_epochs(root: str, epochs: int, rows: int, shards: int) -> None:
    """``epochs`` committed epochs of ``rows`` rows in ``shards`` shards, as a run writes
    them (random scores, 15% pruned, keys)."""
    per = rows // shards
    gen = np.random.default_rng(0)
    names = [f"s3://bucket/data/train-{i:06d}.tar" for i in range(shards)]
    ordinals = pa.array(np.arange(per)).cast(pa.string())
    m = Manifests(root)
    for epoch in range(epochs):
        m.write_shards(
            epoch,
            (
                {
                    "shard": shard,
                    "columns": {
                        "score": gen.random(per, np.float32),
                        "loss": gen.random(per, np.float32),
                        "visits": gen.integers(1, 5, per).astype(np.uint32),
                        "step": gen.integers(0, 10**6, per).astype(np.int32),
                        "state": (gen.random(per) < 0.15).astype(np.uint8),
                    },
                    "keys": pc.binary_join_element_wise(f"{shard[-10:-4]}-", ordinals, ""),
                    "factor": 1.2,
                }
                for shard in names
            ),
        )
        m.finish(epoch)
        m.commit(epoch)


def epoch_items(rows: int, shards: int, seed: int = 0) -> list[dict]:
    """One epoch's ``write_shards`` items as ESWP writes them: ``rows`` rows in ``shards``
    shards, random scores, 15% pruned, a key per row, the run's hyper-parameters."""
    per = rows // shards
    gen = np.random.default_rng(seed)
    ordinals = pa.array(np.arange(per)).cast(pa.string())
    items = []
    for i in range(shards):
        shard = f"s3://bucket/data/train-{i:06d}.tar"
        columns = {
            "score": gen.random(per, np.float32),
            "loss": gen.random(per, np.float32),
            "visits": gen.integers(1, 5, per).astype(np.uint32),
            "step": gen.integers(0, 10**6, per).astype(np.int32),
            "state": (gen.random(per) < 0.15).astype(np.uint8),
        }
        keys = pc.binary_join_element_wise(f"{shard[-10:-4]}-", ordinals, "")
        items.append(
            {"shard": shard, "columns": columns, "keys": keys, "factor": 1.2, "hyper": {"step": 1}}
        )
    return items


def commit_epoch(root: str, epoch: int, items: list[dict]) -> None:
    """The epoch commit of one rank alone: stage every shard's manifest, the done-file,
    the commit (publish + marker), as ``es_pipe.eswp.commit.close_epoch`` runs it."""
    m = Manifests(root)
    m.write_shards(epoch, items)
    m.finish(epoch)
    m.commit(epoch)


def commit_vs_write_table(
    rows: int = 10**6, shards: int = 100, reps: int = 7, clock: str = "wall"
) -> dict:
    """The epoch commit of ``rows`` rows in ``shards`` shards against one
    ``pyarrow.parquet.write_table`` of the same rows (the same manifest table, all shards
    concatenated) to one local file: with pyarrow's default options (issue 14's limit) and
    with the codec's own (lz4, dictionary only for ``shard``: the same encoding work).
    Interleaved, order alternating, median of ``reps`` after a warm-up round; rows/s.
    ``clock="cpu"``: the process's CPU time instead of wall time (every thread's, so the
    commit's thread pool gains nothing; robust to other jobs preempting this one)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    from es_pipe.manifests import codec
    from es_pipe.manifests.writer import STATE_BITS

    items = epoch_items(rows, shards)
    tables = [
        codec.build_table(it["shard"], it["columns"], bits=STATE_BITS, keys=it["keys"])
        for it in items
    ]
    full = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
    total = full.num_rows
    same = {"compression": "lz4", "use_dictionary": ["shard"], "write_statistics": ["row"]}
    base = tempfile.mkdtemp(prefix="bench-commit-")
    root = os.path.join(base, "root")
    done = {"commit": 0, "write_table": 0, "write_table same options": 0}

    def fresh(name: str) -> str:  # a new file every time, as every epoch writes new files
        done[name] += 1
        return os.path.join(base, f"{name.replace(' ', '-')}-{done[name]}.parquet")

    def commit() -> None:
        done["commit"] += 1
        commit_epoch(root, done["commit"], items)

    cases = {
        "commit": commit,
        "write_table": lambda: pq.write_table(full, fresh("write_table")),
        "write_table same options": lambda: pq.write_table(
            full, fresh("write_table same options"), **same
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    try:
        names = list(cases)
        for rep in range(reps + 1):  # the first round warms up
            for name in names if rep % 2 else names[::-1]:
                t0 = timer()
                cases[name]()
                if rep:
                    times[name].append(timer() - t0)
            # what each wrote piles up on disk as in a run; the last 3 rounds are kept
            for old in os.listdir(root):
                if old.startswith("epoch=") and int(old[6:]) < done["commit"] - 2:
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
            for name in ("write_table", "write_table same options"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(
                        os.path.join(base, f"{name.replace(' ', '-')}-{done[name] - 3}.parquet")
                    )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {name: total / statistics.median(t) for name, t in times.items()}


def _peak_rss_mib(root: str, pythonpath: str) -> float:
    """Peak RSS (MiB) of ``es-pipe inspect ROOT --epoch 0`` in a fresh subprocess."""
    code = (  # a baseline checkout from before es_pipe.tools has es_pipe.cli
        "import sys, es_pipe\n"
        "try:\n    from es_pipe.tools.cli import main\n"
        "except ImportError:\n    from es_pipe.cli import main\n"
        "print(es_pipe.__file__, file=sys.stderr); sys.exit(main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, "inspect", root, "--epoch", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": pythonpath}
    # cwd: not a checkout (`python -c` puts the cwd first on sys.path, before PYTHONPATH)
    proc = subprocess.Popen(
        cmd, env=env, cwd=os.path.dirname(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {err[-2000:]}")
    imported = err.splitlines()[0]
    if not imported.startswith(os.path.join(pythonpath, "es_pipe")):
        raise SystemExit(f"PYTHONPATH={pythonpath} imported es_pipe from {imported}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def inspect_rss(args: argparse.Namespace) -> dict:
    base = args.root or tempfile.mkdtemp(prefix="bench-inspect-")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    builds = {"es_pipe (this checkout)": here}
    if args.baseline:
        builds[f"baseline ({args.baseline})"] = os.path.abspath(args.baseline)
    roots = {n: os.path.join(base, f"epochs-{n}") for n in (1, 5)}
    try:
        t0 = time.perf_counter()
        for n, root in roots.items():
            _write_epochs(root, n, args.rows, args.shards)
        written = time.perf_counter() - t0
        peaks: dict[str, dict[int, list[float]]] = {b: {1: [], 5: []} for b in builds}
        for _ in range(args.repeat):  # interleaved: the box's load hits both alike
            for build, path in builds.items():
                for n, root in roots.items():
                    peaks[build][n].append(_peak_rss_mib(root, path))
    finally:
        if not args.root:
            shutil.rmtree(base, ignore_errors=True)
    result = {
        "rows_per_epoch": args.rows,
        "shards": args.shards,
        "repeat": args.repeat,
        "write_s": round(written, 1),
        "peak_rss_mib": {
            b: {str(n): round(statistics.median(v), 1) for n, v in by.items()}
            for b, by in peaks.items()
        },
        "runs_mib": peaks,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"es-pipe inspect ROOT --epoch 0, {args.rows:,} rows per epoch in {args.shards} "
            f"shards: peak RSS (MiB), median of {args.repeat} fresh processes"
        )
        for build, by in result["peak_rss_mib"].items():
            ratio = by["5"] / by["1"]
            print(f"  {build}: 1 epoch {by['1']:.0f}, 5 epochs {by['5']:.0f} ({ratio:.2f}x)")
    return result


if __name__ == "__main__":
    main()
