"""Throughput of es_pipe's shard readers against the raw libraries, in one run.

Writes WebDataset and Parquet shards into a temporary folder, then, for several
repetitions in alternating order:

* tar: ``es_pipe.sources.WebDatasetSource`` vs ``webdataset.WebDataset(urls)`` (both yield
  raw bytes per extension, nothing decoded);
* Parquet: ``es_pipe.sources.ParquetSource`` vs ``pyarrow.parquet.ParquetFile.iter_batches``
  turned into the same per-row dicts (the least a per-sample pipeline does by hand); the
  batch-only rate of ``iter_batches`` is printed too, for scale;
* pruning: an epoch with 50% of the rows pruned (scattered at random, as ESWP prunes)
  timed as a fraction of the full epoch; for Parquet also with the pruned rows clustered
  in whole row groups (the best case).

Prints medians; goals: es_pipe >= 0.9x raw; pruned Parquet epoch <= 0.6 of a full one.

``--tar-only`` measures the tar reader alone (issue 14's goal: 10x ``wds.WebDataset``):
es_pipe vs ``webdataset.WebDataset`` vs reading the same bytes with ``open().read()``
(the limit), and an epoch with 50% of the samples pruned at random vs a full one; one
torch thread, the cases interleaved, medians of ``--reps`` (7 by default there).

    python benchmarks/bench_sources.py [--reps 5] [--shards 8] [--samples 4000]
    python benchmarks/bench_sources.py --tar-only [--tarwriter]

``--pruned`` measures issue 14's Parquet goal alone (:func:`parquet_pruned_epoch`): an
epoch (source -> stage, B = 4096 -> select) with 50% of the rows pruned at random vs a
full one, on shards written by ``write_shards`` with ``es-pipe shard``'s defaults, dict
and columnar paths and the source alone; ``--profile`` shows where a pruned epoch's time
goes.

    python benchmarks/bench_sources.py --pruned [--reps 7] [--shards 8] [--profile]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from es_pipe.shard_writer import write_shards
from es_pipe.sources import ParquetSource, WebDatasetSource


def _timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def _count(it) -> int:
    n = 0
    for _ in it:
        n += 1
    return n


def raw_webdataset(urls: list[str]) -> int:
    import webdataset as wds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _count(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def raw_bytes(urls: list[str]) -> int:
    """The limit: the same bytes, read whole, nothing parsed."""
    n = 0
    for url in urls:
        with open(url, "rb") as f:
            n += len(f.read())
    return n


def write_tarwriter_shards(tmp: str, shards: int, samples: int, blob: bytes) -> list[str]:
    """Shards written by ``webdataset.TarWriter`` (most users' shards): a pax header
    (``mtime`` as a float) before every member, uname/gname set, mode 0o444."""
    import webdataset as wds

    urls = []
    for j in range(shards):
        url = f"{tmp}/w-{j:04d}.tar"
        with wds.TarWriter(url) as w:
            for i in range(j * samples, (j + 1) * samples):
                w.write({"__key__": f"{i:09d}", "bin": blob, "cls": str(i % 1000).encode()})
        urls.append(url)
    return urls


def tar_only(args: argparse.Namespace) -> None:
    """es_pipe's tar reader vs webdataset vs the bytes, interleaved, median of reps.

    With ``--tarwriter`` the shards are written by ``webdataset.TarWriter`` (a pax header
    before every member) instead of es_pipe's writer."""
    import torch

    torch.set_num_threads(1)
    reps = args.reps or 7
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        total = args.shards * args.samples
        blob = rng.integers(0, 256, size=args.payload, dtype=np.uint8).tobytes()
        samples = ({"__key__": f"{i:09d}", "bin": blob, "cls": i % 1000} for i in range(total))
        if args.tarwriter:
            urls = write_tarwriter_shards(tmp, args.shards, args.samples, blob)
        else:
            urls = write_shards(samples, f"{tmp}/t-%04d.tar", "tar", args.samples, index=False)
        n = args.samples
        half = {u: np.sort(rng.choice(n, n // 2, replace=False)).astype(np.int64) for u in urls}
        cases = {
            "es_pipe": lambda: _count(WebDatasetSource(urls)),
            "wds.WebDataset": lambda: raw_webdataset(urls),
            "open().read()": lambda: raw_bytes(urls) and total,
            "es_pipe 50% pruned": lambda: _count(WebDatasetSource(urls, pruned=half)),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():  # warm-up: page cache, imports
            fn()
        names = list(cases)
        for rep in range(reps):
            for k in names if rep % 2 == 0 else names[::-1]:
                dt, got = _timed(cases[k])
                assert got == (total // 2 if "pruned" in k else total), (k, got)
                times[k].append(dt)

    def ratio(a: str, b: str) -> float:  # throughput of a / throughput of b, per rep
        return statistics.median(y / x for x, y in zip(times[a], times[b], strict=True))

    writer = "webdataset.TarWriter" if args.tarwriter else "es_pipe"
    print(
        f"tar ({writer} shards): {total} samples ({args.payload} B + a 3 B member each), "
        f"{args.shards} shards, "
        f"{reps} reps interleaved (median), 1 torch thread"
    )
    for k, v in times.items():
        t = statistics.median(v)
        print(f"  {k:22s} {t * 1e3:8.1f} ms  {total / t / 1e3:8.1f} k samples/s")
    vs_wds = ratio("es_pipe", "wds.WebDataset")
    vs_bytes = ratio("es_pipe", "open().read()")
    print(f"  es_pipe / wds.WebDataset:   {vs_wds:6.2f}x  (goal >= 8x)")
    print(f"  es_pipe / open().read():    {vs_bytes:6.3f}x  (goal >= 0.25x)")
    pruned = 1 / ratio("es_pipe 50% pruned", "es_pipe")
    print(f"  50%-pruned epoch time / full epoch time: {pruned:.2f}")


def raw_parquet_rows(urls: list[str], columns: list[str] | None, batch_rows: int) -> int:
    n = 0
    for url in urls:
        with pq.ParquetFile(url) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                names = batch.schema.names
                cols = [c.to_numpy(zero_copy_only=False) for c in batch.columns]
                for vals in zip(*cols, strict=True):
                    sample = dict(zip(names, vals, strict=True))
                    n += sample is not None
    return n


def raw_parquet_batches(urls: list[str], columns: list[str] | None, batch_rows: int) -> int:
    n = 0
    for url in urls:
        with pq.ParquetFile(url) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                n += batch.num_rows
    return n


def _token_table(rng: np.random.Generator, total: int, tokens: int) -> pa.Table:
    """``total`` rows of ``tokens`` random int32 token ids and an int64 label."""
    return pa.table(
        {
            "tokens": pa.array(
                list(rng.integers(0, 50_000, size=(total, tokens), dtype=np.int32)),
                type=pa.list_(pa.int32()),
            ),
            "label": np.arange(total, dtype=np.int64) % 1000,
        }
    )


def _write(tmp: str, shards: int, samples: int, payload: int, tokens: int, rg: int):
    rng = np.random.default_rng(0)
    total = shards * samples
    blob = rng.integers(0, 256, size=payload, dtype=np.uint8).tobytes()
    tar_samples = ({"__key__": f"{i:09d}", "bin": blob, "cls": i % 1000} for i in range(total))
    tar_urls = write_shards(tar_samples, f"{tmp}/t-%04d.tar", "tar", samples, index=False)
    table = _token_table(rng, total, tokens)
    pq_urls = write_shards(
        table, f"{tmp}/p-%04d.parquet", "parquet", samples, row_group_rows=rg, index=False
    )
    return tar_urls, pq_urls


def parquet_pruned_epoch(
    shards: int = 8,
    per_shard: int = 10_000,
    tokens: int = 256,
    reps: int = 7,
    row_group_rows: int | None = None,
    profile: bool = False,
    clock: str = "wall",
) -> dict[str, float]:
    """A Parquet epoch with 50% of each shard's rows pruned at random, as a fraction of the
    full epoch's time, on shards written by ``write_shards`` (what ``es-pipe shard`` runs)
    with its defaults (``row_group_rows=None``) unless given. An epoch is the source ->
    ``SelectStage`` (B = 4096, b = 2048) -> ``select``, on the dict path
    (``columnar=False``) and the columnar path (``columnar=True``); the source alone too.
    The cases interleaved in one process, median of ``reps`` per-rep ratios. Each row: a
    list of ``tokens`` int32 token ids and an int64 label. ``profile=True`` prints a
    cProfile of one pruned columnar epoch (where the time goes). ``clock="cpu"`` times
    with the process's CPU time instead of the wall clock (steadier on a shared box)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    import es_pipe

    def epoch(urls: list[str], pruned: Any, columnar: bool) -> int:
        sampler = es_pipe.Selector(es_pipe.Evolved(), 4096, 2048, seed=0)
        source = ParquetSource(urls, columnar=columnar, pruned=pruned)
        count = 0
        for meta in es_pipe.stage.tn.Loader(es_pipe.SelectStage(source, sampler)):
            meta.select(meta.data["label"].float())
            count += len(meta)
        return count

    def source_only(urls: list[str], pruned: Any) -> int:
        return sum(len(chunk) for chunk in ParquetSource(urls, columnar=True, pruned=pruned))

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        total = shards * per_shard
        table = _token_table(rng, total, tokens)
        urls = write_shards(
            table, f"{tmp}/p-%04d.parquet", "parquet", per_shard, row_group_rows=row_group_rows
        )
        half = {
            u: np.sort(rng.choice(per_shard, per_shard // 2, replace=False)).astype(np.int64)
            for u in urls
        }
        cases = {
            "dict full": lambda: epoch(urls, None, False),
            "dict pruned": lambda: epoch(urls, half, False),
            "columnar full": lambda: epoch(urls, None, True),
            "columnar pruned": lambda: epoch(urls, half, True),
            "source full": lambda: source_only(urls, None),
            "source pruned": lambda: source_only(urls, half),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():  # warm-up: page cache, imports
            fn()
        names = list(cases)
        for rep in range(reps):
            for k in names if rep % 2 == 0 else names[::-1]:
                t0 = now()
                got = cases[k]()
                times[k].append(now() - t0)
                assert got == (total // 2 if "pruned" in k else total), (k, got)
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            epoch(urls, half, True)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(8)
    out = {f"{k} ms": statistics.median(v) * 1e3 for k, v in times.items()}
    for path in ("dict", "columnar", "source"):
        full, pruned = times[f"{path} full"], times[f"{path} pruned"]
        out[f"{path} ratio"] = statistics.median(p / f for f, p in zip(full, pruned, strict=True))
    return out


def main_pruned(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    rg = None if args.row_group_pruned is None else args.row_group_pruned
    got = parquet_pruned_epoch(
        args.shards,
        10_000,
        args.tokens,
        args.reps or 7,
        rg,
        profile=args.profile,
        clock="cpu" if args.cpu else "wall",
    )
    print(
        f"Parquet epoch, 50% of rows pruned at random vs full: {args.shards} shards x 10000 "
        f"rows ({args.tokens} int32 tokens + a label), written by write_shards with "
        f"row_group_rows={rg} (None: es-pipe shard's default), B=4096, 1 torch thread, "
        f"median of {args.reps or 7}, interleaved, {'CPU' if args.cpu else 'wall'} time"
    )
    for k, v in got.items():
        if k.endswith("ms"):
            print(f"  {k[:-3]:18s} {v:8.1f} ms")
    for path in ("dict", "columnar", "source"):
        print(f"  {path:9s} pruned / full: {got[path + ' ratio']:.2f}  (goal <= 0.6)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=None, help="default 5; 7 with --tar-only")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4000, help="samples per shard")
    ap.add_argument("--payload", type=int, default=4096, help="bytes per tar sample")
    ap.add_argument("--tokens", type=int, default=256, help="int32 tokens per Parquet row")
    ap.add_argument("--row-group", type=int, default=1000, help="Parquet row-group rows")
    ap.add_argument("--batch-rows", type=int, default=1000)
    ap.add_argument("--tar-only", action="store_true", help="only the tar reader (issue 14)")
    ap.add_argument(
        "--tarwriter",
        action="store_true",
        help="--tar-only: shards written by webdataset.TarWriter (pax headers) instead",
    )
    ap.add_argument(
        "--pruned",
        action="store_true",
        help="only the Parquet epoch with 50%% pruned at random vs full (es-pipe shard defaults)",
    )
    ap.add_argument(
        "--row-group-pruned",
        type=int,
        default=None,
        help="--pruned: row_group_rows to write with (default: es-pipe shard's)",
    )
    ap.add_argument("--profile", action="store_true", help="--pruned: cProfile a pruned epoch")
    ap.add_argument("--cpu", action="store_true", help="--pruned: time with process CPU time")
    args = ap.parse_args()

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"python {platform.python_version()}, pyarrow {pa.__version__}"
    )
    if args.tar_only:
        tar_only(args)
        return
    if args.pruned:
        main_pruned(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tar_urls, pq_urls = _write(
            tmp, args.shards, args.samples, args.payload, args.tokens, args.row_group
        )
        total = args.shards * args.samples
        rng = np.random.default_rng(1)
        n_per = args.samples
        scattered = {
            u: np.sort(rng.choice(n_per, n_per // 2, replace=False)).astype(np.int64)
            for u in tar_urls + pq_urls
        }
        groups = np.arange(n_per) // args.row_group
        clustered = {u: np.flatnonzero(groups % 2 == 0).astype(np.int64) for u in pq_urls}
        bs = args.batch_rows

        cases = {
            "tar es_pipe": lambda: _count(WebDatasetSource(tar_urls)),
            "tar raw webdataset": lambda: raw_webdataset(tar_urls),
            "tar es_pipe 50% pruned": lambda: _count(WebDatasetSource(tar_urls, pruned=scattered)),
            "parquet es_pipe": lambda: _count(ParquetSource(pq_urls, batch_rows=bs)),
            "parquet raw iter_batches+rows": lambda: raw_parquet_rows(pq_urls, None, bs),
            "parquet raw iter_batches only": lambda: raw_parquet_batches(pq_urls, None, bs),
            "parquet es_pipe 50% pruned scattered": lambda: _count(
                ParquetSource(pq_urls, batch_rows=bs, pruned=scattered)
            ),
            "parquet es_pipe 50% pruned row groups": lambda: _count(
                ParquetSource(pq_urls, batch_rows=bs, pruned=clustered)
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():  # warm-up: page cache, imports
            fn()
        names = list(cases)
        for rep in range(args.reps or 5):
            for k in names if rep % 2 == 0 else names[::-1]:
                dt, n = _timed(cases[k])
                expect = total // 2 if "pruned" in k else total
                assert n == expect, (k, n, expect)
                times[k].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{total} samples/format, {args.shards} shards, {args.reps or 5} reps (median)")
        for k, t in med.items():
            print(f"  {k:40s} {t * 1e3:8.1f} ms  {total / t / 1e3:8.1f} k samples/s")

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[b], times[a], strict=True))

        print("throughput ratio es_pipe / raw (per-rep ratios, median):")
        print(f"  tar:     {ratio('tar es_pipe', 'tar raw webdataset'):.2f}x   (goal >= 0.9)")
        print(
            f"  parquet: {ratio('parquet es_pipe', 'parquet raw iter_batches+rows'):.2f}x   "
            "(goal >= 0.9)"
        )
        print("epoch time with 50% of rows pruned, as a fraction of the full epoch:")
        tp = 1 / ratio("tar es_pipe 50% pruned", "tar es_pipe")
        print(f"  tar:                      {tp:.2f}")
        sc = 1 / ratio("parquet es_pipe 50% pruned scattered", "parquet es_pipe")
        cl = 1 / ratio("parquet es_pipe 50% pruned row groups", "parquet es_pipe")
        print(f"  parquet (scattered rows): {sc:.2f}   (goal <= 0.6)")
        print(f"  parquet (whole groups):   {cl:.2f}")


if __name__ == "__main__":
    main()
