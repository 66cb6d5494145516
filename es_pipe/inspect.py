"""``es-pipe inspect``: what a run pruned and why, from its committed manifests."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from es_pipe import storage
from es_pipe.errors import EsPipeError, ManifestError
from es_pipe.manifest import Manifests

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SUMMARY_COLUMNS = ["shard", "key", "row", "score", "loss", "visits", "pruned", "streak", "weight"]

DESCRIPTION = """\
Read the Parquet shard manifests of an es_pipe run (a local folder or any fsspec URL)
and print what was pruned and why: only committed epochs are read, the newest by default.

Each manifest row is one sample at the END of epoch N: its ES score (EMA of its loss), last
loss, visits, and `pruned`: the decision for epoch N+1."""

EPILOG = """\
examples:
  es-pipe inspect runs/17/manifests
      epochs, samples, pruned fraction per epoch, score quantiles; shards of the newest epoch
  es-pipe inspect s3://bucket/run-17/manifests --epoch 4 --shard train-000123.tar
      one shard's history (a shard is matched by its full URL or any unique part of it)
  es-pipe inspect runs/17/manifests --key sample000042 --shard train-000123.tar
      one sample's score, loss and decisions across epochs
  es-pipe inspect runs/17/manifests --diff 3 4
      what changed between two epochs: newly pruned, returned, score shifts
  es-pipe inspect runs/17/manifests --plot pruning.png
      pruned fraction per epoch and the score distribution of --epoch (PNG, headless)
  es-pipe inspect runs/17/manifests --json | jq .epochs
      the same facts as JSON

plain SQL over committed epochs (DuckDB):
  duckdb -c "select epoch, avg(pruned::int) from 'ROOT/**/*.parquet' where epoch <= LAST
             group by 1 order by 1"
  (LAST = the newest committed epoch this command prints: a run may be publishing the next)
"""


def add_inspect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inspect`` on an argparse sub-parsers object."""
    parser = subparsers.add_parser(
        "inspect",
        help="show what a run pruned and why, from its manifests",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="manifest root: folder or fsspec URL (manifests= of the run)")
    parser.add_argument("--epoch", type=int, help="epoch to detail (default: newest committed)")
    parser.add_argument("--shard", help="detail one shard: its full URL or a unique part of it")
    parser.add_argument("--key", help="one sample's history across epochs (its __key__)")
    parser.add_argument(
        "--diff", nargs=2, type=int, metavar=("A", "B"), help="what changed from epoch A to B"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--plot", metavar="FILE.png", help="draw pruned fraction and scores")
    parser.add_argument("--top", type=int, default=20, help="shards listed (default 20)")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar while reading files"
    )
    storage.add_storage_argument(parser)


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """``es-pipe inspect ...`` as a function; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="es-pipe inspect",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        report = build_report(args)
    except EsPipeError as exc:
        print(f"es-pipe inspect: error: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=1, default=_jsonable))
    else:
        print(render(report))
    return 0


# --------------------------------------------------------------------------- facts


class _Reader:
    def __init__(self, manifests: Manifests, epochs: list[int], progress: bool) -> None:
        self.manifests = manifests
        self.tables: dict[int, pa.Table] = {}
        files = [(e, f) for e in epochs for f in manifests.marker(e)["files"]]
        bar = None
        if progress and len(files) > 16:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(files), desc="reading manifests", unit="file", file=sys.stderr)
        parts: dict[int, list[pa.Table]] = {e: [] for e in epochs}
        for epoch, entry in files:
            table, _, _ = manifests._read_entry(epoch, entry, SUMMARY_COLUMNS)
            parts[epoch].append(table.set_column(0, "shard", table["shard"].cast(pa.string())))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        for epoch, tables in parts.items():
            self.tables[epoch] = (
                pa.concat_tables(tables) if tables else pa.table({c: [] for c in SUMMARY_COLUMNS})
            )


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {f"p{int(q * 100)}": None for q in QUANTILES}
    got = np.quantile(values.astype(np.float64), QUANTILES)
    return {f"p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, got)}


def _summary(table: pa.Table) -> dict[str, Any]:
    rows = table.num_rows
    pruned = int(pc.sum(table.column("pruned")).as_py() or 0) if rows else 0
    visits = table.column("visits").to_numpy() if rows else np.zeros(0)
    scores = table.column("score").to_numpy() if rows else np.zeros(0)
    seen = visits > 0
    return {
        "samples": rows,
        "seen": int(seen.sum()),
        "pruned": pruned,
        "pruned_fraction": pruned / rows if rows else 0.0,
        "score_mean": float(scores[seen].mean()) if seen.any() else None,
        "score": _quantiles(scores[seen]),
    }


def _match_shard(shards: list[str], wanted: str) -> str:
    if wanted in shards:
        return wanted
    hits = [s for s in shards if wanted in s]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ManifestError(f"no shard matches {wanted!r}; shards: {_few(shards)}")
    raise ManifestError(f"{wanted!r} matches {len(hits)} shards ({_few(hits)}); be more precise")


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    options = storage.options_from_cli(getattr(args, "storage_option", None))
    manifests = Manifests(args.root, storage_options=options)
    committed = manifests.committed()
    if not committed:
        raise ManifestError(manifests._no_epochs())
    epoch = committed[-1] if args.epoch is None else args.epoch
    manifests.marker(epoch)  # a clear error for an uncommitted epoch
    wanted = set(committed)
    reader = _Reader(manifests, sorted(wanted), progress=not args.no_progress)
    tables = reader.tables
    report: dict[str, Any] = {"root": args.root, "committed": committed, "epoch": epoch}
    report["epochs"] = [
        {
            "epoch": e,
            "shards": len(manifests.marker(e)["files"]),
            "committed_at": manifests.marker(e).get("committed"),
            **_summary(tables[e]),
        }
        for e in committed
    ]
    table = tables[epoch]
    if args.shard:
        names = sorted(
            set().union(*(set(t.column("shard").unique().to_pylist()) for t in tables.values()))
        )
        shard = _match_shard(names, args.shard)
        report["shard"] = shard
        report["shard_history"] = [
            {"epoch": e, **_summary(t.filter(pc.equal(t.column("shard"), shard)))}
            for e, t in tables.items()
        ]
    else:
        shard = None
        report["shards"] = _shards(table, args.top)
    if args.key is not None:
        history = []
        for e, t in tables.items():
            hit = t.filter(pc.equal(t.column("key"), args.key))
            if shard is not None:
                hit = hit.filter(pc.equal(hit.column("shard"), shard))
            for row in hit.to_pylist():
                history.append({"epoch": e, **row})
        if not history:
            raise ManifestError(
                f"no sample with key {args.key!r} in the committed manifests of {args.root}"
                + (f" (shard {shard})" if shard else "")
            )
        report["key"] = args.key
        report["key_history"] = history
    if args.diff:
        a, b = args.diff
        for e in (a, b):
            manifests.marker(e)
        report["diff"] = _diff(tables[a], tables[b], a, b, shard)
    report["distribution"] = _histogram(
        table if shard is None else table.filter(pc.equal(table.column("shard"), shard))
    )
    return report


def _shards(table: pa.Table, top: int) -> list[dict[str, Any]]:
    if not table.num_rows:
        return []
    grouped = table.group_by("shard").aggregate(
        [("row", "count"), ("pruned", "sum"), ("score", "mean")]
    )
    out = [
        {
            "shard": r["shard"],
            "samples": r["row_count"],
            "pruned": int(r["pruned_sum"] or 0),
            "pruned_fraction": (r["pruned_sum"] or 0) / r["row_count"],
            "score_mean": r["score_mean"],
        }
        for r in grouped.to_pylist()
    ]
    out.sort(key=lambda r: (-r["pruned_fraction"], r["shard"]))
    return out[:top]


def _diff(ta: pa.Table, tb: pa.Table, a: int, b: int, shard: str | None) -> dict[str, Any]:
    if shard is not None:
        ta = ta.filter(pc.equal(ta.column("shard"), shard))
        tb = tb.filter(pc.equal(tb.column("shard"), shard))
    left = ta.select(["shard", "row", "score", "pruned"])
    right = tb.select(["shard", "row", "score", "pruned"])
    joined = left.join(
        right, ["shard", "row"], left_suffix="_a", right_suffix="_b", join_type="inner"
    )
    pa_ = joined.column("pruned_a").to_numpy(zero_copy_only=False).astype(bool)
    pb = joined.column("pruned_b").to_numpy(zero_copy_only=False).astype(bool)
    delta = joined.column("score_b").to_numpy() - joined.column("score_a").to_numpy()
    shards_a = set(ta.column("shard").unique().to_pylist())
    shards_b = set(tb.column("shard").unique().to_pylist())
    return {
        "a": a,
        "b": b,
        "samples_both": joined.num_rows,
        "pruned_a": int(pa_.sum()),
        "pruned_b": int(pb.sum()),
        "newly_pruned": int((~pa_ & pb).sum()),
        "returned": int((pa_ & ~pb).sum()),
        "pruned_both": int((pa_ & pb).sum()),
        "score_change_mean": float(delta.mean()) if len(delta) else None,
        "score_change": _quantiles(delta),
        "shards_only_in_a": sorted(shards_a - shards_b),
        "shards_only_in_b": sorted(shards_b - shards_a),
    }


def _histogram(table: pa.Table, bins: int = 30) -> dict[str, Any]:
    if not table.num_rows:
        return {"edges": [], "kept": [], "pruned": []}
    visits = table.column("visits").to_numpy()
    seen = visits > 0
    scores = table.column("score").to_numpy()[seen].astype(np.float64)
    pruned = table.column("pruned").to_numpy(zero_copy_only=False).astype(bool)[seen]
    if not len(scores):
        return {"edges": [], "kept": [], "pruned": []}
    edges = np.histogram_bin_edges(scores, bins=bins)
    kept, _ = np.histogram(scores[~pruned], bins=edges)
    cut, _ = np.histogram(scores[pruned], bins=edges)
    return {"edges": edges.tolist(), "kept": kept.tolist(), "pruned": cut.tolist()}


# --------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.rjust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _summary_row(s: dict[str, Any]) -> list[Any]:
    q = s["score"]
    return [
        s["samples"],
        s["seen"],
        s["pruned"],
        f"{100 * s['pruned_fraction']:.1f}%",
        q["p10"],
        q["p50"],
        q["p90"],
    ]


SUMMARY_HEADERS = ["samples", "seen", "pruned", "pruned%", "score p10", "p50", "p90"]


def render(report: dict[str, Any]) -> str:
    out = [
        f"manifests: {report['root']}",
        f"committed epochs: {len(report['committed'])} (newest {report['committed'][-1]}); "
        "`pruned` = left out of the NEXT epoch",
        "",
        "epochs",
    ]
    out.append(
        _table(
            ["epoch", "shards", *SUMMARY_HEADERS],
            [[e["epoch"], e["shards"], *_summary_row(e)] for e in report["epochs"]],
        )
    )
    if "shards" in report:
        out += ["", f"shards of epoch {report['epoch']} (most pruned first)"]
        out.append(
            _table(
                ["shard", "samples", "pruned", "pruned%", "score mean"],
                [
                    [
                        s["shard"],
                        s["samples"],
                        s["pruned"],
                        f"{100 * s['pruned_fraction']:.1f}%",
                        s["score_mean"],
                    ]
                    for s in report["shards"]
                ],
            )
        )
    if "shard_history" in report:
        out += ["", f"shard {report['shard']}"]
        out.append(
            _table(
                ["epoch", *SUMMARY_HEADERS],
                [[h["epoch"], *_summary_row(h)] for h in report["shard_history"]],
            )
        )
    if "key_history" in report:
        out += ["", f"sample {report['key']!r}"]
        cols = ["epoch", "shard", "row", "score", "loss", "visits", "pruned", "streak", "weight"]
        out.append(_table(cols, [[h[c] for c in cols] for h in report["key_history"]]))
    if "diff" in report:
        d = report["diff"]
        out += ["", f"epoch {d['a']} -> {d['b']}"]
        out.append(
            _table(
                [
                    "samples",
                    "pruned A",
                    "pruned B",
                    "newly pruned",
                    "returned",
                    "pruned both",
                    "score change mean",
                    "p10",
                    "p50",
                    "p90",
                ],
                [
                    [
                        d["samples_both"],
                        d["pruned_a"],
                        d["pruned_b"],
                        d["newly_pruned"],
                        d["returned"],
                        d["pruned_both"],
                        d["score_change_mean"],
                        d["score_change"]["p10"],
                        d["score_change"]["p50"],
                        d["score_change"]["p90"],
                    ]
                ],
            )
        )
        for side in ("a", "b"):
            if d[f"shards_only_in_{side}"]:
                out.append(f"shards only in {d[side]}: {_few(d[f'shards_only_in_{side}'])}")
    out += [
        "",
        f"plain SQL: select epoch, avg(pruned::int) from '{report['root']}/**/*.parquet' "
        f"where epoch <= {report['committed'][-1]} group by 1 order by 1",
    ]
    return "\n".join(out)


def plot(report: dict[str, Any], path: str) -> None:
    """Pruned fraction per epoch and the score distribution (kept vs pruned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    history = report.get("shard_history") or report["epochs"]
    epochs = [e["epoch"] for e in history]
    left.bar(epochs, [100 * e["pruned_fraction"] for e in history], color="tab:red")
    left.set_xlabel("epoch N (decision for N+1)")
    left.set_ylabel("pruned %")
    left.set_title("pruned fraction" + (f" — {report['shard']}" if report.get("shard") else ""))
    dist = report["distribution"]
    if dist["edges"]:
        edges = np.asarray(dist["edges"])
        widths = np.diff(edges)
        right.bar(
            edges[:-1], dist["kept"], width=widths, align="edge", label="kept", color="tab:blue"
        )
        right.bar(
            edges[:-1],
            dist["pruned"],
            width=widths,
            align="edge",
            bottom=dist["kept"],
            label="pruned",
            color="tab:red",
        )
        right.legend()
    right.set_xlabel("score (EMA of loss)")
    right.set_ylabel("samples")
    right.set_title(f"score distribution, epoch {report['epoch']}")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")
