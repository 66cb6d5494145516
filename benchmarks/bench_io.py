"""Issue 14's table: every I/O and selection measure of es_pipe as a ratio to its limit.

    make bench-io                                   # the full table (about 10-20 minutes)
    python benchmarks/bench_io.py --quick           # fewer reps, smaller data (< 3 minutes)
    python benchmarks/bench_io.py --out benchmarks/results/bench_io.md

Each row times es_pipe and its limit (or alternative) side by side in this one process,
interleaved (order alternating), median of ``--reps`` repetitions after a warm-up round,
1 torch thread, and prints ``measure | es_pipe | limit | ratio | goal | met?`` as a
markdown table. The ratio is es_pipe / limit: a throughput ratio where the goal says
``>= ...x``, a cost ratio (time, bytes) where it says ``<= ...``. A goal without ``x``
applies to the es_pipe figure itself (``>= 15 M/s``, ``<= 16 B``).

The rows reuse the measuring code of the other benchmarks: ``bench_sources`` (tar),
``bench_stage`` (Parquet -> stage and its columnar prototype), ``bench_manifests`` (the
epoch commit) and ``bench_select`` (select, store, ESWP).

The machine is shared and noisy: compare ratios, not absolute rates, and only between
runs on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_manifests  # noqa: E402
import bench_select  # noqa: E402
import bench_sources  # noqa: E402
import bench_stage  # noqa: E402

Row = dict[str, Any]
B, b = 4096, 2048


# --------------------------------------------------------------------------- helpers


def interleave(cases: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Wall seconds of each case, run in turn (order alternating), ``reps`` times after a
    warm-up round (page cache, imports, allocator)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for rep in range(reps + 1):
        for name in names if rep % 2 else names[::-1]:
            t0 = time.perf_counter()
            cases[name]()
            if rep:
                times[name].append(time.perf_counter() - t0)
    return times


def per_rep_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of ``num[i] / den[i]`` (pairs timed next to each other)."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def row(measure: str, es: float, limit: float, ratio: float, goal: str, unit: str) -> Row:
    return {
        "measure": measure,
        "es_pipe": es,
        "limit": limit,
        "ratio": ratio,
        "goal": goal,
        "unit": unit,
    }


def met(r: Row) -> str:
    """``yes``/``no`` against the goal (``>= 0.8x``: on the ratio; ``>= 15 M/s``,
    ``<= 16 B``: on the es_pipe figure); ``-`` where there is no goal or no figure."""
    m = re.match(r"\s*(>=|<=)\s*([0-9.]+)\s*(x?)", str(r.get("goal", "")))
    if not m:
        return "-"
    value = r["ratio"] if m.group(3) == "x" else r["es_pipe"]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    bound = float(m.group(2))
    return "yes" if (value >= bound if m.group(1) == ">=" else value <= bound) else "**no**"


def _fmt(value: Any, unit: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if unit == "samples/s" or unit == "rows/s":
        for scale, suffix in ((1e6, "M"), (1e3, "k")):
            if value >= scale:
                return f"{value / scale:.3g}{suffix}/s"
        return f"{value:.3g}/s"
    return f"{value:.3g} {unit}"


def table(rows: list[Row]) -> str:
    lines = ["| measure | es_pipe | limit | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g}"
        lines.append(
            f"| {r['measure']} | {_fmt(r['es_pipe'], r['unit'])} | "
            f"{_fmt(r['limit'], r['unit'])} | {ratio} | {r['goal'] or '-'} | {met(r)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- tar


def tar_rows(folder: str, shards: int, samples: int, payload: int, reps: int) -> list[Row]:
    """es_pipe's tar reader vs ``wds.WebDataset`` and vs reading the bytes (bench_sources)."""
    from es_pipe.shard_writer import write_shards
    from es_pipe.sources import WebDatasetSource

    total = shards * samples
    blob = np.random.default_rng(0).integers(0, 256, payload, dtype=np.uint8).tobytes()
    items = ({"__key__": f"{i:09d}", "bin": blob, "cls": i % 1000} for i in range(total))
    urls = write_shards(items, f"{folder}/t-%04d.tar", "tar", samples, index=False)
    counted: dict[str, int] = {}

    def count(name: str, fn: Callable[[], int]) -> Callable[[], None]:
        return lambda: counted.__setitem__(name, fn())

    t = interleave(
        {
            "es": count("es", lambda: bench_sources._count(WebDatasetSource(urls))),
            "wds": count("wds", lambda: bench_sources.raw_webdataset(urls)),
            "bytes": count("bytes", lambda: bench_sources.raw_bytes(urls) and total),
        },
        reps,
    )
    assert counted["es"] == counted["wds"] == total, counted
    es, wds, raw = (total / statistics.median(t[k]) for k in ("es", "wds", "bytes"))
    what = f"{total:,} samples of {payload} B in {shards} shards"
    return [
        row(
            f"tar read vs `wds.WebDataset` ({what})",
            es,
            wds,
            per_rep_ratio(t["wds"], t["es"]),
            ">= 8x",
            "samples/s",
        ),
        row(
            "tar read vs `open().read()` of the same bytes",
            es,
            raw,
            per_rep_ratio(t["bytes"], t["es"]),
            ">= 0.25x",
            "samples/s",
        ),
    ]


# --------------------------------------------------------------------------- Parquet


def parquet_batcher(urls: list[str], batch: int = 256) -> int:
    """``ParquetSource`` (one dict per row) -> ``tn.Batcher(256)`` -> ``default_collate``."""
    import torchdata.nodes as tn
    from torch.utils.data import default_collate

    from es_pipe.sources import ParquetSource

    node = tn.Batcher(tn.IterableWrapper(ParquetSource(urls)), batch, drop_last=False)
    n = 0
    for rows in tn.Loader(node):
        n += len(default_collate(rows)["x"])
    return n


def arrow_batches(urls: list[str], batch: int = 256) -> int:
    """The limit: ``iter_batches(256)`` -> one tensor per column of each 256-row batch."""
    n = 0
    for url in urls:
        for rb in pq.ParquetFile(url).iter_batches(batch_size=batch):
            rows = rb.num_rows
            data = {
                "x": torch.from_numpy(rb.column("x").to_numpy()),
                "label": torch.from_numpy(rb.column("label").to_numpy()),
                "tokens": torch.from_numpy(rb.column("tokens").flatten().to_numpy()).view(rows, -1),
            }
            n += len(data["x"])
    return n


def parquet_rows(folder: str, rows: int, shards: int, reps: int) -> list[Row]:
    """Parquet -> Batcher(256) -> collate vs iter_batches; Parquet -> stage (B=4096) vs the
    columnar prototype of bench_stage, on the same pyarrow-written shards."""
    urls = bench_stage.write_parquet(Path(folder), rows, shards)
    total = (rows // shards) * shards
    counted: dict[str, int] = {}
    t = interleave(
        {
            "batcher": lambda: counted.__setitem__("batcher", parquet_batcher(urls)),
            "arrow": lambda: counted.__setitem__("arrow", arrow_batches(urls)),
            "stage": lambda: bench_stage.parquet_stage(urls, True, B),
            "stage dict": lambda: bench_stage.parquet_stage(urls, False, B),
            "prototype": lambda: bench_stage.parquet_prototype(urls, B),
        },
        reps,
    )
    assert counted["batcher"] == counted["arrow"] == total, counted
    rate = {k: total / statistics.median(v) for k, v in t.items()}
    what = f"{total:,} rows in {shards} shards"
    return [
        row(
            f"Parquet -> `Batcher(256)` -> collate vs `iter_batches` -> 256-row tensors ({what})",
            rate["batcher"],
            rate["arrow"],
            per_rep_ratio(t["arrow"], t["batcher"]),
            "",
            "samples/s",
        ),
        row(
            "Parquet -> stage (B=4096, `ParquetSource(columnar=True)`) vs the columnar prototype",
            rate["stage"],
            rate["prototype"],
            per_rep_ratio(t["prototype"], t["stage"]),
            ">= 0.8x",
            "samples/s",
        ),
        row(
            "Parquet -> stage (B=4096, dict rows: `columnar=False`) vs the columnar prototype",
            rate["stage dict"],
            rate["prototype"],
            per_rep_ratio(t["prototype"], t["stage dict"]),
            "",
            "samples/s",
        ),
    ]


def pruned_rows(folder: str, rows: int, reps: int) -> list[Row]:
    """A Parquet epoch with 50% of the rows pruned at random vs a full one (source alone,
    dict and columnar stage), by bench_sources' ``parquet_pruned_epoch``."""
    per = 10_000
    got = bench_sources.parquet_pruned_epoch(
        shards=max(1, rows // per), per_shard=per, tokens=64, reps=reps
    )
    out = []
    for path in ("source", "dict", "columnar"):
        if f"{path} ratio" not in got:
            continue
        out.append(
            row(
                f"Parquet epoch 50% pruned at random, time vs full, {path} "
                f"(`es-pipe shard` defaults, {rows:,} rows of 64 int32)",
                got[f"{path} pruned ms"] / 1e3,
                got[f"{path} full ms"] / 1e3,
                got[f"{path} ratio"],
                "<= 0.6x",
                "s",
            )
        )
    return out


# --------------------------------------------------------------------------- in memory


def memory_rows(samples: int, reps: int) -> list[Row]:
    """In-memory dicts -> ``SelectStage`` vs ``Batcher(256)`` + ``default_collate``, by
    bench_stage's ``dict_stage_vs_batcher``."""
    got = bench_stage.dict_stage_vs_batcher(B=B, batches=max(1, samples // B), reps=reps)
    return [
        row(
            f"in-memory dict stage (B=4096) vs `Batcher(256)` + `default_collate` "
            f"({samples:,} samples, bench_stage.dict_stage_vs_batcher)",
            got["stage_samples_per_s"],
            got["batcher_samples_per_s"],
            got["ratio"],
            ">= 0.9x",
            "samples/s",
        )
    ]


# --------------------------------------------------------------------------- select


def select_rows(reps: int) -> list[Row]:
    """The select, store and ESWP rows, by bench_select."""
    rows: list[Row] = bench_select.rows(reps)
    return rows


def commit_rows(rows: int, shards: int, reps: int) -> list[Row]:
    """The epoch commit vs one ``write_table`` of the same rows (bench_manifests): wall
    time (the issue's measure) and the process's CPU time (robust to a shared machine)."""
    out = []
    for clock in ("wall", "cpu"):
        r = bench_manifests.commit_vs_write_table(rows, shards, reps, clock=clock)
        what = f"{rows:.0e} rows in {shards} shards, {clock} time"
        out.append(
            row(
                f"epoch commit vs one `pyarrow.parquet.write_table`, pyarrow defaults ({what})",
                r["commit"],
                r["write_table"],
                r["commit"] / r["write_table"],
                ">= 0.8x",
                "rows/s",
            )
        )
        out.append(
            row(
                f"epoch commit vs one `write_table` with the manifests' own options ({what})",
                r["commit"],
                r["write_table same options"],
                r["commit"] / r["write_table same options"],
                "",
                "rows/s",
            )
        )
    return out


# --------------------------------------------------------------------------- main


def _commit_id() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer reps, smaller data")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 7; quick 5)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument(
        "--only",
        default="tar,parquet,memory,select,commit,pruned",
        help="comma-separated row groups to run (default: all)",
    )
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 7)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    q = args.quick
    groups = set(args.only.split(","))
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-io-") as tmp:
        steps: list[tuple[str, Callable[[str], list[Row]]]] = [
            ("tar", lambda d: tar_rows(d, 4 if q else 8, 1000 if q else 4000, 4096, reps)),
            ("parquet", lambda d: parquet_rows(d, 2**16 if q else 2**18, 8 if q else 16, reps)),
            ("memory", lambda d: memory_rows(2**16 if q else 2**18, reps)),
            ("select", lambda d: select_rows(reps)),
            ("commit", lambda d: commit_rows(10**6, 100, reps)),
            ("pruned", lambda d: pruned_rows(d, 40_000 if q else 200_000, reps)),
        ]
        for name, step in steps:
            if name not in groups:
                continue
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            t0 = time.perf_counter()
            rows += step(folder)
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    given = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"python benchmarks/bench_io.py {given}".strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    header = [
        f"Command: `{command}`; {when} UTC; commit {_commit_id()}; {elapsed:.0f} s.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs; load "
        f"average {os.getloadavg()[0]:.1f} at the end), "
        f"python {platform.python_version()}, torch {torch.__version__}, pyarrow "
        f"{pa.__version__}; 1 torch thread; median of {reps} interleaved repetitions" + ".",
        "",
    ]
    text = "\n".join(header) + table(rows) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
