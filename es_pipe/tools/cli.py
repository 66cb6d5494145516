"""The ``es-pipe`` command: ``demo``, ``shard``, ``index``, ``inspect`` (each a module of
:mod:`es_pipe.tools`; the demo registers its parser from :mod:`es_pipe.demo`).

An expected failure (any es_pipe error, storage that cannot be reached as configured, a
missing or unreadable file, bad arguments) prints one line naming the problem and its fix
on stderr and exits with status 2, never a traceback. A traceback means a bug in es_pipe.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from es_pipe import __version__, storage
from es_pipe.demo.command import add_demo_parser
from es_pipe.errors import EsPipeError
from es_pipe.tools.argtypes import positive_float, positive_int
from es_pipe.tools.index import add_index_parser
from es_pipe.tools.inspect_manifests import add_inspect_parser
from es_pipe.tools.shard import add_shard_parser

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


__all__ = ["build_parser", "main", "positive_float", "positive_int"]


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
