"""``es-pipe inspect``: what a run pruned and why, from its committed manifests, read
through the public :class:`es_pipe.manifests.ManifestReader` (committed epochs only)."""

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
from es_pipe.manifests import ManifestReader
from es_pipe.tools.argtypes import add_command

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
KEY_COLUMNS = ["key", "row", "score", "loss", "visits", "pruned", "streak", "weight"]

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

SQL over committed epochs only (DuckDB from Python; the dataset names exactly the
committed files):
  m = es_pipe.manifests_dataset("ROOT")
  duckdb.sql("select epoch, avg(pruned::int) from m group by 1 order by 1")
or the DuckDB CLI over a glob, filtered to the committed epochs:
  duckdb -c "select epoch, avg(pruned::int) from 'ROOT/**/*.parquet' where epoch <= LAST
             group by 1 order by 1"
  (LAST = the newest committed epoch this command prints: a run may be publishing the next)
"""


def add_inspect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inspect`` on an argparse sub-parsers object."""
    parser = add_command(
        subparsers,
        "inspect",
        run,
        help="show what a run pruned and why, from its manifests",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    _arguments(parser)
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
#
# Memory: the per-epoch counts come from the commit markers (each file entry records its
# rows, how many were pruned for the next epoch and how many of those were pruned again);
# only the epochs a report details are read, one file at a time, projected to the columns
# it needs. Peak memory depends on the detailed epoch, not on how many are committed.

DETAIL_COLUMNS = ["score", "visits", "pruned"]  # the detailed epoch: one file = one shard
DIFF_COLUMNS = ["row", "score", "pruned"]


def _read_files(
    manifests: ManifestReader,
    epoch: int,
    columns: list[str],
    shard: str | None,
    bar: Any,
) -> Any:
    """Yield ``(entry, table)`` for each file of ``epoch`` (``shard``'s only), read with
    only ``columns``; size and crc32 checked against the marker."""
    for entry, table in manifests.iter_files(epoch, columns, shard):
        if bar is not None:
            bar.update(1)
        yield entry, table


def _bar(manifests: ManifestReader, reads: list[tuple[int, str | None]], progress: bool) -> Any:
    total = sum(len(manifests.files(e, s)) for e, s in reads)
    if not progress or total <= 16:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="reading manifests", unit="file", file=sys.stderr)


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {f"p{int(q * 100)}": None for q in QUANTILES}
    got = np.quantile(values.astype(np.float64), QUANTILES)
    return {f"p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, got)}


def _counts(manifests: ManifestReader, committed: list[int], shard: str | None) -> list[dict]:
    """Per committed epoch E, from the markers alone (no manifest file is read):

    - ``samples``: rows of E's manifests;
    - ``skipped``: left out of E, by E-1's decision (the sources skip exactly those);
    - ``read``: ``samples - skipped``, what the sources read in E;
    - ``returned``: read in E after being left out of E-1;
    - ``pruned``: left out of E+1 (the decision recorded at E).

    A count the markers do not hold (written by an older es_pipe) is ``None``."""
    known = set(committed)
    by_epoch: dict[int, dict[str, dict[str, Any]]] = {}

    def entries(e: int) -> dict[str, dict[str, Any]]:
        if e not in known:
            return {}
        if e not in by_epoch:
            by_epoch[e] = {f["shard"]: f for f in manifests.files(e, shard)}
        return by_epoch[e]

    def total(files: dict[str, dict[str, Any]], names: Any, field: str) -> int | None:
        values = [files[n].get(field) for n in names if n in files]
        return None if any(v is None for v in values) else sum(v for v in values if v)

    out = []
    for e in committed:
        now = entries(e)
        names = list(now)
        before, twice = entries(e - 1), entries(e - 2)
        samples = sum(f["rows"] for f in now.values())
        skipped = total(before, names, "pruned")
        # read in E after being left out of E-1: left out of E-1 (pruned at E-2) minus
        # those left out of E as well (pruned at E-1 again: the marker's 'repruned')
        left_out = total(twice, names, "pruned")
        again = total(before, names, "repruned")
        if left_out == 0:
            returned: int | None = 0  # nothing was left out of E-1
        else:
            returned = None if left_out is None or again is None else left_out - again
        pruned = total(now, names, "pruned")
        out.append(
            {
                "epoch": e,
                "shards": len(now),
                "committed_at": manifests.marker(e).get("committed"),
                "samples": samples,
                "read": None if skipped is None else samples - skipped,
                "skipped": skipped,
                "returned": returned,
                "pruned": pruned,
                "pruned_fraction": None
                if pruned is None
                else (pruned / samples if samples else 0.0),
            }
        )
        by_epoch.pop(e - 2, None)  # only E-1 and E are needed next
    return out


class _Detail:
    """The detailed summary of one epoch (or one shard of it), accumulated file by file:
    per-shard rows, pruned and mean score; the scores of scored samples and their pruned
    flags (for quantiles and the histogram)."""

    def __init__(self) -> None:
        self.shards: list[dict[str, Any]] = []
        self.scores: list[np.ndarray] = []
        self.pruned_seen: list[np.ndarray] = []
        self.rows = 0
        self.pruned = 0

    def add(self, shard: str, table: pa.Table) -> None:
        rows = table.num_rows
        scores = table.column("score").to_numpy()
        pruned = table.column("pruned").to_numpy(zero_copy_only=False).astype(bool)
        seen = table.column("visits").to_numpy() > 0
        n_pruned = int(pruned.sum())
        self.rows += rows
        self.pruned += n_pruned
        self.scores.append(scores[seen])
        self.pruned_seen.append(pruned[seen])
        self.shards.append(
            {
                "shard": shard,
                "samples": rows,
                "pruned": n_pruned,
                "pruned_fraction": n_pruned / rows if rows else 0.0,
                "score_mean": float(scores.mean()) if rows else None,
            }
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0, np.float32)
        pruned = np.concatenate(self.pruned_seen) if self.pruned_seen else np.zeros(0, bool)
        return scores, pruned

    def summary(self) -> dict[str, Any]:
        scores, _ = self.arrays()
        return {
            "samples": self.rows,
            "scored": len(scores),
            "pruned": self.pruned,
            "pruned_fraction": self.pruned / self.rows if self.rows else 0.0,
            "score_mean": float(scores.astype(np.float64).mean()) if len(scores) else None,
            "score": _quantiles(scores),
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
    manifests = ManifestReader(args.root, storage_options=options)
    committed = manifests.committed()
    if not committed:
        raise ManifestError(manifests.nothing_committed())
    epoch = committed[-1] if args.epoch is None else args.epoch
    manifests.marker(epoch)  # a clear error for an uncommitted epoch
    if args.diff:
        for e in args.diff:
            manifests.marker(e)
    shard = None
    if args.shard:
        names = sorted({f["shard"] for e in committed for f in manifests.files(e)})
        shard = _match_shard(names, args.shard)
    reads = [(epoch, shard)]
    if shard is not None:
        reads += [(e, shard) for e in committed if e != epoch]
    if args.key is not None:
        reads += [(e, shard) for e in committed]
    if args.diff:
        reads += [(e, shard) for e in args.diff]
    bar = _bar(manifests, reads, progress=not args.no_progress)
    try:
        report = _report(args, manifests, committed, epoch, shard, bar)
    finally:
        if bar is not None:
            bar.close()
    return report


def _report(
    args: argparse.Namespace,
    manifests: ManifestReader,
    committed: list[int],
    epoch: int,
    shard: str | None,
    bar: Any,
) -> dict[str, Any]:
    report: dict[str, Any] = {"root": args.root, "committed": committed, "epoch": epoch}
    report["epochs"] = _counts(manifests, committed, None)
    detail = _Detail()
    for entry, table in _read_files(manifests, epoch, DETAIL_COLUMNS, shard, bar):
        detail.add(entry["shard"], table)
    report["detail"] = {"epoch": epoch, "shard": shard, **detail.summary()}
    if shard is None:
        shards = sorted(detail.shards, key=lambda r: (-r["pruned_fraction"], r["shard"]))
        report["shards"] = shards[: args.top]
    else:
        report["shard"] = shard
        history = []
        for counts in _counts(manifests, committed, shard):
            e = counts["epoch"]
            one = _Detail()
            if e == epoch:
                one = detail
            else:
                for entry, table in _read_files(manifests, e, DETAIL_COLUMNS, shard, bar):
                    one.add(entry["shard"], table)
            history.append({**counts, **one.summary()})
        report["shard_history"] = history
    if args.key is not None:
        report["key"] = args.key
        report["key_history"] = _key_history(manifests, committed, args.key, shard, bar)
        if not report["key_history"]:
            raise ManifestError(
                f"no sample with key {args.key!r} in the committed manifests of {args.root}"
                + (f" (shard {shard})" if shard else "")
            )
    if args.diff:
        a, b = args.diff
        report["diff"] = _diff(manifests, a, b, shard, bar)
    scores, pruned = detail.arrays()
    report["distribution"] = _histogram(scores, pruned)
    return report


def _key_history(
    manifests: ManifestReader, committed: list[int], key: str, shard: str | None, bar: Any
) -> list[dict[str, Any]]:
    """One key's rows across the committed epochs, read file by file (only ``shard``'s
    files when given): memory of one file, whatever the number of epochs."""
    history = []
    for e in committed:
        for entry, table in _read_files(manifests, e, KEY_COLUMNS, shard, bar):
            hit = table.filter(pc.equal(table.column("key"), key))
            for row in hit.to_pylist():
                history.append({"epoch": e, **row, "shard": entry["shard"]})
    return history


def _diff(manifests: ManifestReader, a: int, b: int, shard: str | None, bar: Any) -> dict[str, Any]:
    """What changed from epoch ``a`` to ``b``, joined shard by shard (memory: one shard's
    files of both epochs at a time)."""
    files_a = {f["shard"]: f for f in manifests.files(a, shard)}
    files_b = {f["shard"]: f for f in manifests.files(b, shard)}
    counts = dict.fromkeys(["samples_both", "pruned_a", "pruned_b", "newly", "returned", "both"], 0)
    deltas = []
    for name in sorted(files_a.keys() & files_b.keys()):
        ta, _, _ = manifests.read_file(a, files_a[name], DIFF_COLUMNS)
        tb, _, _ = manifests.read_file(b, files_b[name], DIFF_COLUMNS)
        for _ in range(2 if bar is not None else 0):
            bar.update(1)
        joined = ta.join(tb, "row", left_suffix="_a", right_suffix="_b", join_type="inner")
        pa_ = joined.column("pruned_a").to_numpy(zero_copy_only=False).astype(bool)
        pb = joined.column("pruned_b").to_numpy(zero_copy_only=False).astype(bool)
        deltas.append(joined.column("score_b").to_numpy() - joined.column("score_a").to_numpy())
        counts["samples_both"] += joined.num_rows
        counts["pruned_a"] += int(pa_.sum())
        counts["pruned_b"] += int(pb.sum())
        counts["newly"] += int((~pa_ & pb).sum())
        counts["returned"] += int((pa_ & ~pb).sum())
        counts["both"] += int((pa_ & pb).sum())
    delta = np.concatenate(deltas) if deltas else np.zeros(0)
    return {
        "a": a,
        "b": b,
        "samples_both": counts["samples_both"],
        "pruned_a": counts["pruned_a"],
        "pruned_b": counts["pruned_b"],
        "newly_pruned": counts["newly"],
        "returned": counts["returned"],
        "pruned_both": counts["both"],
        "score_change_mean": float(delta.mean()) if len(delta) else None,
        "score_change": _quantiles(delta),
        "shards_only_in_a": sorted(files_a.keys() - files_b.keys()),
        "shards_only_in_b": sorted(files_b.keys() - files_a.keys()),
    }


def _histogram(scores: np.ndarray, pruned: np.ndarray, bins: int = 30) -> dict[str, Any]:
    """Scores of the scored samples of the detailed epoch, kept vs pruned."""
    if not len(scores):
        return {"edges": [], "kept": [], "pruned": []}
    scores = scores.astype(np.float64)
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


def _pct(fraction: float | None) -> str | None:
    return None if fraction is None else f"{100 * fraction:.1f}%"


COUNT_HEADERS = ["samples", "read", "skipped", "returned", "pruned", "pruned%"]
DETAIL_HEADERS = ["scored", "score mean", "p10", "p50", "p90"]


def _count_row(c: dict[str, Any]) -> list[Any]:
    keys = ("samples", "read", "skipped", "returned", "pruned")
    return [*(c[k] for k in keys), _pct(c["pruned_fraction"])]


def _detail_row(d: dict[str, Any]) -> list[Any]:
    q = d["score"]
    return [d["scored"], d["score_mean"], q["p10"], q["p50"], q["p90"]]


def render(report: dict[str, Any]) -> str:
    out = [
        f"manifests: {report['root']}",
        f"committed epochs: {len(report['committed'])} (newest {report['committed'][-1]})",
        "",
        "epochs (read = read in the epoch, skipped = left out of it, returned = read after "
        "being left out of the epoch before, pruned = left out of the NEXT epoch)",
    ]
    out.append(
        _table(
            ["epoch", "shards", *COUNT_HEADERS],
            [[e["epoch"], e["shards"], *_count_row(e)] for e in report["epochs"]],
        )
    )
    d = report["detail"]
    where = f"epoch {d['epoch']}" + (f", shard {d['shard']}" if d["shard"] else "")
    out += ["", f"{where}: scores of the samples scored so far"]
    out.append(
        _table(
            ["samples", "pruned", "pruned%", *DETAIL_HEADERS],
            [[d["samples"], d["pruned"], _pct(d["pruned_fraction"]), *_detail_row(d)]],
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
                ["epoch", *COUNT_HEADERS, *DETAIL_HEADERS],
                [[h["epoch"], *_count_row(h), *_detail_row(h)] for h in report["shard_history"]],
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
        f"committed rows only, from Python: es_pipe.manifests_dataset({report['root']!r})",
        f"plain SQL: select epoch, avg(pruned::int) from '{report['root']}/**/*.parquet' "
        f"where epoch <= {report['committed'][-1]} group by 1 order by 1",
    ]
    return "\n".join(out)


def plot(report: dict[str, Any], path: str) -> None:
    """Pruned fraction per epoch and the score distribution (kept vs pruned)."""
    from es_pipe.plotting import pyplot

    plt = pyplot(f"--plot {path}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    history = report.get("shard_history") or report["epochs"]
    epochs = [e["epoch"] for e in history]
    left.bar(epochs, [100 * (e["pruned_fraction"] or 0.0) for e in history], color="tab:red")
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
