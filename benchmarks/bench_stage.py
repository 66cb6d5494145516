"""Micro-benchmark of the ES stage alone: score update + selection, in samples per second.

Two levels, for B in {256, 4096, 65536} (b = B/2):

- ``sampler``: ``Selector.select`` on a prepared identity and loss vector: the score-store
  gather/scatter, the ES weights and the draw (the stage's arithmetic);
- ``stage``: ``SelectStage`` end to end over sample dicts: buffering B samples,
  reading their identities, collating and taking the sub-batch, plus the above.

Run:  python benchmarks/bench_stage.py [--sizes 256,4096,65536] [--threads 1] [--out DIR]
The goal in issue 5: >= 5 million samples/s at B = 4096 on one core.

``--parquet`` (issue 14) instead measures Parquet shards (written by pyarrow) -> stage at
B = 4096 (b = 2048), three ways interleaved in one process, each a full pass over the
data, median of ``--reps`` (7):

- ``dict``: ``ParquetSource`` (one dict per row) -> ``SelectStage`` -> ``select``;
- ``columnar``: ``ParquetSource(columnar=True)`` -> ``SelectStage`` -> ``select``;
- ``prototype``: ``ParquetFile.iter_batches(4096)`` -> ``torch.from_numpy`` per column ->
  the same ``Selector.select`` -> one ``index_select`` per column (the limit).

Run:  python benchmarks/bench_stage.py --parquet [--rows 262144] [--reps 7] [--threads 1]

``--dict`` (issue 14) measures the in-memory dict stage (a list of sample dicts ->
``SelectStage``, B = 4096, b = 2048) against ``tn.Batcher(256)`` + ``default_collate``
over the same list, without es_pipe, interleaved, median of ``--reps``, for three payloads
(:func:`dict_stage_vs_batcher`).

Run:  python benchmarks/bench_stage.py --dict [--reps 7] [--cpu]

``--tar`` (issue 14) measures WebDataset tar shards (written by ``webdataset.TarWriter``)
-> stage at B = 4096 (b = 2048), the dict path (``columnar=False``: one sample dict per
node call, identity read from the dicts) against the columnar path (``columnar=True``, what
the stage picks by default: one ``ColumnChunk`` of up to 64 samples per node call,
identity as arrays), interleaved in one process, median of ``--reps``
(:func:`tar_stage_columnar_vs_dict`). Payloads stay raw bytes on both paths; the loss
decodes one text field per sample in both.

Run:  python benchmarks/bench_stage.py --tar [--rows 65536] [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import es_pipe
from es_pipe.sampler import Identity


def bench_sampler(B: int, shards: int, repeats: int) -> float:
    """Median samples/s of ``Selector.select`` over ``repeats`` meta-batches."""
    n = B * 8  # a dataset of 8 meta-batches, so that scores get revisited
    sampler = es_pipe.Selector(es_pipe.Evolved(), B, B // 2, seed=0)
    names = [f"shard-{i:04d}.tar" for i in range(shards)]
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    per = -(-n // shards)
    times = []
    for r in range(repeats + 2):
        pos = order[(r % 8) * B : (r % 8 + 1) * B]
        # shard names are encoded while buffering, as SelectStage does (identify)
        who = Identity.of([names[p // per] for p in pos], [str(p) for p in pos], pos % per)
        losses = torch.rand(B)
        t = time.perf_counter()
        sampler.select(who, losses, B)
        if r >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    return B / statistics.median(times)


def bench_stage(B: int, shards: int, repeats: int) -> float:
    """Samples/s through ``SelectStage`` (buffering, identity, collate, take, select)."""
    n = B * repeats
    per = -(-n // shards)
    samples = [
        {"__key__": str(i), "__shard__": f"shard-{i // per:04d}.tar", "__index__": i % per, "x": i}
        for i in range(n)
    ]
    sampler = es_pipe.Selector(es_pipe.Evolved(), B, B // 2, seed=0)
    losses = torch.rand(B)

    def collate(batch: list) -> dict:
        return {"x": torch.tensor([s["x"] for s in batch])}

    node = es_pipe.SelectStage(samples, sampler, collate_fn=collate)
    t = time.perf_counter()
    count = 0
    for meta in es_pipe.stage.tn.Loader(node):
        meta.select(losses[: len(meta)])
        count += len(meta)
    return count / (time.perf_counter() - t)


def write_parquet(folder: Path, rows: int, shards: int) -> list[str]:
    """``shards`` Parquet files written by pyarrow: a float, an int label and 32 int32 token
    ids per row (row groups of 16384 rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    per = rows // shards
    urls = []
    for s in range(shards):
        tokens = rng.integers(0, 50000, (per, 32), dtype=np.int32)
        table = pa.table(
            {
                "x": rng.random(per, dtype=np.float32),
                "label": rng.integers(0, 10, per),
                "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), 32),
            }
        )
        path = folder / f"part-{s:03d}.parquet"
        pq.write_table(table, path, row_group_size=16384)
        urls.append(str(path))
    return urls


def parquet_stage(urls: list[str], columnar: bool, B: int) -> float:
    """Seconds for one epoch of ``ParquetSource`` -> ``SelectStage`` -> ``select``."""
    from es_pipe.sources import ParquetSource

    sampler = es_pipe.Selector(es_pipe.Evolved(), B, B // 2, seed=0)
    source = ParquetSource(urls, columnar=columnar)
    t = time.perf_counter()
    for meta in es_pipe.stage.tn.Loader(es_pipe.SelectStage(source, sampler)):
        sub = meta.select(meta.data["x"])
        assert len(sub.data["tokens"]) == len(sub)
    return time.perf_counter() - t


def parquet_prototype(urls: list[str], B: int) -> float:
    """Seconds for one epoch of the columnar limit: ``iter_batches(B)`` -> tensors -> the
    same ``Selector.select`` -> ``index_select`` per column."""
    import pyarrow.parquet as pq

    from es_pipe.scores import ShardCodes

    sampler = es_pipe.Selector(es_pipe.Evolved(), B, B // 2, seed=0)
    t = time.perf_counter()
    for url in urls:
        start = 0
        for batch in pq.ParquetFile(url).iter_batches(batch_size=B):
            n = batch.num_rows
            data = {
                "x": torch.from_numpy(batch.column("x").to_numpy()),
                "label": torch.from_numpy(batch.column("label").to_numpy()),
                "tokens": torch.from_numpy(
                    batch.column("tokens").flatten().to_numpy().reshape(n, 32)
                ),
            }
            ordinals = np.arange(start, start + n, dtype=np.int64)
            start += n
            who = Identity(ShardCodes([url], np.zeros(n, np.int64)), range(n), ordinals)
            chosen = sampler.select(who, data["x"], n)
            sub = {k: v.index_select(0, chosen.indices) for k, v in data.items()}
            assert len(sub["tokens"]) == len(chosen.indices)
    return time.perf_counter() - t


def main_parquet(args: argparse.Namespace) -> None:
    import tempfile

    B = 4096
    with tempfile.TemporaryDirectory() as folder:
        urls = write_parquet(Path(folder), args.rows, args.shards)
        rows = (args.rows // args.shards) * args.shards
        times: dict[str, list[float]] = {"dict": [], "columnar": [], "prototype": []}
        for rep in range(args.reps + 1):  # the first round warms the page cache
            got = {
                "dict": parquet_stage(urls, False, B),
                "columnar": parquet_stage(urls, True, B),
                "prototype": parquet_prototype(urls, B),
            }
            if rep:
                for name, seconds in got.items():
                    times[name].append(seconds)
        rate = {name: rows / statistics.median(t) for name, t in times.items()}
    print(
        f"Parquet -> stage, B={B}, b={B // 2}, {rows} rows in {args.shards} shards, "
        f"median of {args.reps}, {torch.get_num_threads()} torch thread(s):"
    )
    for name, r in rate.items():
        print(f"  {name:10s} {r / 1e3:8.1f}k samples/s  ({r / rate['prototype']:.2f}x prototype)")
    print(f"  columnar / dict: {rate['columnar'] / rate['dict']:.2f}x")


def write_tars(folder: Path, rows: int, shards: int, writer: str = "webdataset") -> list[str]:
    """``shards`` tar files written by ``webdataset.TarWriter`` (pax headers: its float
    mtimes) or by es_pipe's ``write_shards`` (plain ustar): per sample an int label
    (``cls``), a float as text (``x.txt``) and 32 int32 token ids (``npy``), all bytes."""
    import io

    import webdataset as wds

    from es_pipe.shard_writer import write_shards

    rng = np.random.default_rng(0)
    per = rows // shards
    urls = []
    for s in range(shards):
        xs = rng.random(per)
        samples = []
        for i in range(per):
            npy = io.BytesIO()
            np.save(npy, rng.integers(0, 50000, 32, dtype=np.int32))
            samples.append(
                {
                    "__key__": f"{s:03d}-{i:07d}",
                    "cls": str(i % 10).encode(),
                    "x.txt": f"{xs[i]:.6f}".encode(),
                    "npy": npy.getvalue(),
                }
            )
        if writer == "webdataset":
            path = folder / f"part-{s:03d}.tar"
            with wds.TarWriter(str(path)) as w:
                for sample in samples:
                    w.write(sample)
            urls.append(str(path))
        else:
            pattern = str(folder / f"part-{s:03d}-%d.tar")
            urls += write_shards(samples, pattern, "tar", per, index=False)
    return urls


def tar_stage(urls: list[str], columnar: bool, B: int) -> float:
    """Seconds for one epoch of ``WebDatasetSource`` -> ``SelectStage`` -> ``select``."""
    from es_pipe.sources import WebDatasetSource

    sampler = es_pipe.Selector(es_pipe.Evolved(), B, B // 2, seed=0)
    source = WebDatasetSource(urls, columnar=columnar)
    t = time.perf_counter()
    for meta in es_pipe.stage.tn.Loader(es_pipe.SelectStage(source, sampler)):
        losses = torch.from_numpy(np.array(meta.data["x.txt"]).astype(np.float64))
        sub = meta.select(losses)
        assert len(sub.data["npy"]) == len(sub)
    return time.perf_counter() - t


def tar_stage_columnar_vs_dict(
    rows: int = 65536, shards: int = 16, reps: int = 7, B: int = 4096, writer: str = "webdataset"
) -> dict[str, float]:
    """Tar shards (see :func:`write_tars`) -> stage, dict path vs columnar path, one full
    epoch each, interleaved (the order alternates per repetition), after one warm-up
    round; medians of ``reps``. Returns samples/s of each and ``ratio`` = columnar / dict."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        urls = write_tars(Path(folder), rows, shards, writer)
        n = (rows // shards) * shards
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(reps + 1):
            for columnar in (False, True) if rep % 2 else (True, False):
                seconds = tar_stage(urls, columnar, B)
                if rep:
                    times[columnar].append(seconds)
    dict_rate = n / statistics.median(times[False])
    col_rate = n / statistics.median(times[True])
    return {
        "dict_samples_per_s": dict_rate,
        "columnar_samples_per_s": col_rate,
        "ratio": col_rate / dict_rate,
    }


def main_tar(args: argparse.Namespace) -> None:
    rows = args.rows if args.rows != 262144 else 65536
    print(
        f"tar -> stage, B=4096, b=2048, {rows} samples in {args.shards} shards, median of "
        f"{args.reps}, interleaved, {torch.get_num_threads()} torch thread(s):"
    )
    for writer in ("webdataset", "es_pipe"):
        got = tar_stage_columnar_vs_dict(rows, args.shards, args.reps, writer=writer)
        print(
            f"  shards by {writer:10s}: dict path {got['dict_samples_per_s'] / 1e3:7.1f}k/s, "
            f"columnar path {got['columnar_samples_per_s'] / 1e3:7.1f}k/s, "
            f"columnar / dict {got['ratio']:.2f}x",
            flush=True,
        )


def dict_stage_vs_batcher(
    payload: str = "int", B: int = 4096, batches: int = 16, reps: int = 7, clock: str = "wall"
) -> dict[str, float]:
    """In-memory dict stage vs the same samples without es_pipe, interleaved in one
    process, median of ``reps``: ``SelectStage`` over a list of sample dicts at
    ``B`` (b = B/2, every meta-batch answered) against ``tn.Batcher(256)`` +
    ``default_collate`` over the same list. The samples carry ``__key__``, ``__shard__``
    (16 shards), ``__index__``, a label ``y`` and a payload ``x``: a Python int
    (``"int"``), a 32-float32 numpy row (``"numpy"``) or tensor (``"tensor"``).
    Returns samples/s of both and the per-rep ratio's median (goal >= 0.9).
    ``clock="cpu"`` times with the process's CPU time (steadier on a shared box)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    import torchdata.nodes as tn
    from torch.utils.data import default_collate

    n = B * batches
    per = n // 16
    rows = np.random.default_rng(0).random((n, 32), dtype=np.float32)
    values: Any = {"int": range(n), "numpy": rows, "tensor": torch.from_numpy(rows)}[payload]
    samples = [
        {
            "x": values[i],
            "y": i % 10,
            "__key__": str(i % per),
            "__shard__": f"shard-{i // per:04d}.tar",
            "__index__": i % per,
        }
        for i in range(n)
    ]
    losses = torch.rand(B)

    def stage() -> int:
        sampler = es_pipe.Selector(es_pipe.Evolved(), B, B // 2, seed=0)
        count = 0
        for meta in es_pipe.stage.tn.Loader(es_pipe.SelectStage(samples, sampler)):
            meta.select(losses[: len(meta)])
            count += len(meta)
        return count

    def batcher() -> int:
        count = 0
        node = tn.Batcher(tn.IterableWrapper(samples), 256, drop_last=False)
        for batch in tn.Loader(node):
            count += len(default_collate(batch)["y"])
        return count

    cases = {"stage": stage, "batcher": batcher}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for rep in range(reps):
        for name in list(cases) if rep % 2 == 0 else list(cases)[::-1]:
            t = now()
            assert cases[name]() == n
            times[name].append(now() - t)
    return {
        "stage_samples_per_s": n / statistics.median(times["stage"]),
        "batcher_samples_per_s": n / statistics.median(times["batcher"]),
        "ratio": statistics.median(
            b / a for a, b in zip(times["stage"], times["batcher"], strict=True)
        ),
    }


def main_dict(args: argparse.Namespace) -> None:
    print(
        f"in-memory dict stage (B=4096, b=2048) vs tn.Batcher(256) + default_collate, "
        f"median of {args.reps}, interleaved, {torch.get_num_threads()} torch thread(s), "
        f"{'CPU' if args.cpu else 'wall'} time:"
    )
    for payload in ("int", "numpy", "tensor"):
        got = dict_stage_vs_batcher(payload, reps=args.reps, clock="cpu" if args.cpu else "wall")
        print(
            f"  payload {payload:6s}: stage {got['stage_samples_per_s'] / 1e3:7.1f}k/s, "
            f"batcher {got['batcher_samples_per_s'] / 1e3:7.1f}k/s, "
            f"ratio {got['ratio']:.2f}x  (goal >= 0.9)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,4096,65536")
    parser.add_argument("--shards", type=int, default=16, help="shards the samples come from")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write stage.csv and stage.md here")
    parser.add_argument("--parquet", action="store_true", help="Parquet -> stage, 3 ways")
    parser.add_argument("--rows", type=int, default=262144, help="--parquet: rows in all")
    parser.add_argument("--reps", type=int, default=7, help="--parquet/--dict: repetitions")
    parser.add_argument(
        "--dict", action="store_true", help="in-memory dict stage vs Batcher + default_collate"
    )
    parser.add_argument("--cpu", action="store_true", help="--dict: time with process CPU time")
    parser.add_argument("--tar", action="store_true", help="tar -> stage, dict vs columnar")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tar:
        main_tar(args)
        return
    if args.parquet:
        main_parquet(args)
        return
    if args.dict:
        main_dict(args)
        return
    rows = []
    for B in (int(s) for s in args.sizes.split(",")):
        repeats = max(5, min(args.repeats, 2_000_000 // B))
        rows.append(
            {
                "B": B,
                "b": B // 2,
                "sampler_samples_per_s": bench_sampler(B, args.shards, repeats),
                "stage_samples_per_s": bench_stage(B, args.shards, max(4, repeats // 2)),
            }
        )
        print(
            f"B={B:6d}: Selector.select {rows[-1]['sampler_samples_per_s'] / 1e6:7.3f} M/s, "
            f"SelectStage end to end {rows[-1]['stage_samples_per_s'] / 1e6:7.3f} M/s",
            flush=True,
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "stage.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        lines = [
            "| B | b | Selector.select (M samples/s) | SelectStage end to end (M/s) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['B']} | {r['b']} | {r['sampler_samples_per_s'] / 1e6:.3f} | "
            f"{r['stage_samples_per_s'] / 1e6:.3f} |"
            for r in rows
        ]
        (args.out / "stage.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
