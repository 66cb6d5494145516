"""The ``es-pipe`` command: ``demo``, ``shard``, ``index``, ``inspect``.

An expected failure (any es_pipe error, storage that cannot be reached as configured, a
missing or unreadable file, bad arguments) prints one line naming the problem and its fix
on stderr and exits with status 2, never a traceback. A traceback means a bug in es_pipe.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from es_pipe import __version__, storage
from es_pipe.demo.command import add_demo_parser
from es_pipe.errors import EsPipeError
from es_pipe.inspect import add_inspect_parser
from es_pipe.shard_writer import _short

EPILOG = """\
examples:
  es-pipe demo                                   # shard the Python stdlib, pretrain a byte LM
                                                 # with uniform and ES side by side (minutes)
  es-pipe demo --quick                           # the same in under a minute
  es-pipe shard raw/ 'data/train-%06d.tar' --per-shard 10000
  es-pipe shard table.parquet 'data/train-%06d.parquet' --format parquet --row-group 1000
  es-pipe index 'data/train-*.tar' --out data/index.txt   # count shards written elsewhere
  es-pipe inspect runs/17/manifests --plot pruning.png
  es-pipe inspect s3://bucket/run/manifests --storage-option anon=true

An expected failure prints one line and exits with status 2.

Run `es-pipe COMMAND --help` for a command's options.
"""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1, refused with a message that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def add_shard_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shard",
        help="write a folder of files or a table into WebDataset or Parquet shards",
        description=(
            "Shard data so that es_pipe's sources can stream it. SOURCE is a folder of "
            "files (files sharing a basename form one sample, the webdataset convention), "
            "or a table: .parquet, .arrow/.feather (Arrow IPC) or .npz (equal-length "
            "arrays). An index file (shard URL and sample count per line) is written next "
            "to the shards; `equalize=` and ShardList.from_index read it."
        ),
        epilog=(
            "examples:\n"
            "  es-pipe shard photos/ 'data/train-%06d.tar' --per-shard 5000\n"
            "  es-pipe shard tokens.parquet 's3://bucket/train-%06d.parquet' --format parquet\n"
            "  es-pipe shard raw/ 's3://bucket/train-%06d.tar' \\\n"
            "      --storage-option client_kwargs.endpoint_url=http://localhost:9000\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="a folder of files, or a .parquet/.arrow/.feather/.npz")
    parser.add_argument("out", help="output URL pattern with one printf field, e.g. out-%%06d.tar")
    parser.add_argument(
        "--format",
        choices=("tar", "parquet"),
        default=None,
        help="shard format (default: from the pattern's extension)",
    )
    parser.add_argument(
        "--per-shard",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="samples per shard (default 10000)",
    )
    parser.add_argument(
        "--row-group",
        type=positive_int,
        default=None,
        metavar="N",
        help="Parquet row-group rows; smaller groups let pruning skip more bytes",
    )
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read files that symbolic links in the SOURCE folder point to outside it "
        "(default: such links are refused)",
    )
    storage.add_storage_argument(parser)
    parser.set_defaults(func=_shard)


def _shard(args: argparse.Namespace) -> int:
    import pyarrow as pa

    try:
        return _shard_files(args)
    except EsPipeError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:  # unreadable table, bad output URL
        raise EsPipeError(
            f"could not shard {_short(args.source)} into {_short(args.out)}: "
            f"{type(exc).__name__}: {_short(str(exc), 500)}"
        ) from exc


def _shard_files(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from es_pipe.shard_writer import check_out_pattern, samples_from_folder, write_shards

    check_out_pattern(args.out)  # before any work, and before formatting it
    source = Path(args.source)
    fmt = args.format or ("parquet" if args.out.endswith(".parquet") else "tar")
    if source.is_dir():
        samples = samples_from_folder(str(source), follow_symlinks=args.follow_symlinks)
        data = tqdm(samples, desc="samples", unit=" samples")
    elif source.suffix == ".parquet":
        data = pq.read_table(source)
    elif source.suffix in (".arrow", ".feather"):
        with pa.memory_map(str(source)) as stream:
            data = pa.ipc.open_file(stream).read_all()
    elif source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as arrays:
            data = {name: arrays[name] for name in arrays.files}
    elif not source.exists():
        raise EsPipeError(
            f"{_short(str(source))} does not exist: give a folder or a table file to shard"
        )
    else:
        raise EsPipeError(
            f"cannot shard {_short(str(source))}: give a folder of files or a .parquet, "
            ".arrow, .feather or .npz table"
        )
    options = storage.options_from_cli(getattr(args, "storage_option", None))
    urls = write_shards(
        data,
        args.out,
        fmt,
        args.per_shard,
        row_group_rows=args.row_group,
        storage_options=options,
    )
    if not urls:
        raise EsPipeError(f"{_short(str(source))} holds no samples: nothing was written")
    print(f"wrote {len(urls)} {fmt} shards: {urls[0]} .. {urls[-1]}")
    return 0


def add_index_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="count the samples of existing shards and write the index file equalize= reads",
        description=(
            "Count the samples of shards that es_pipe did not write (webdataset.TarWriter "
            "tars, Parquet or Arrow files written by anything), local or remote, in "
            "parallel, and write an index file (shard URL and sample count per line). "
            "Pass ShardList.from_index(OUT) as a source's URLs to use "
            "equalize='drop'|'pad' across ranks."
        ),
        epilog=(
            "examples:\n"
            "  es-pipe index 'data/train-{000000..000127}.tar' --out data/index.txt\n"
            "  es-pipe index 's3://bucket/train/*.parquet' --out s3://bucket/train/index.txt \\\n"
            "      --storage-option client_kwargs.endpoint_url=http://localhost:9000\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "shards", nargs="+", help="shard URLs, brace patterns or globs (quote them)"
    )
    parser.add_argument("--out", required=True, help="the index file to write (local or URL)")
    parser.add_argument(
        "--format",
        choices=("tar", "parquet", "arrow"),
        default=None,
        help="shard format (default: from each name)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=8,
        metavar="N",
        help="shards counted at once (threads, default 8)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    storage.add_storage_argument(parser)
    parser.set_defaults(func=_index)


def _index(args: argparse.Namespace) -> int:
    from es_pipe.indexing import index_shards

    listed = index_shards(
        args.shards,
        args.out,
        format=args.format,
        storage_options=storage.options_from_cli(args.storage_option),
        jobs=args.jobs,
        progress=not args.no_progress,
    )
    total = sum(listed.num_samples)
    print(f"indexed {len(listed)} shards, {total} samples: {args.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (and status 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="es-pipe",
        description=(
            "Evolved Sampling (ES/ESWP) for streaming PyTorch data pipelines: train on the "
            "samples worth a backward pass, prune the ones that are not worth reading."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"es-pipe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_parser(subparsers)
    add_shard_parser(subparsers)
    add_index_parser(subparsers)
    add_inspect_parser(subparsers)
    return parser


def _url_of(args: argparse.Namespace) -> str:
    """The URL a command works on, to name in a storage error."""
    for name in ("out", "root", "source"):
        value = getattr(args, name, None)
        if isinstance(value, str) and "://" in value:
            return value
    shards = getattr(args, "shards", None) or []
    for value in (*shards, getattr(args, "out", None), getattr(args, "root", None)):
        if isinstance(value, str):
            return value
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``es-pipe``; returns the exit status (0, or 2 for an expected failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: argparse's usage line and status 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    where = f"es-pipe {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except EsPipeError as error:
        print(f"{where}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except Exception as exc:
        # a storage misconfiguration, a missing or unreadable file: one line, no traceback
        found = storage.storage_error(exc, _url_of(args))
        if found is not None:
            print(f"{where}: error: {_one_line(str(found))}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            name = exc.filename if getattr(exc, "filename", None) else ""
            text = exc.strerror or str(exc)
            detail = f"{name}: {text}" if name else text
            print(
                f"{where}: error: {_one_line(detail)} ({type(exc).__name__}); check the "
                "path, that it exists and that you may read (or write) it",
                file=sys.stderr,
            )
            return 2
        raise  # a bug: the traceback is what a bug report needs


def _one_line(text: str, limit: int = 2000) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
