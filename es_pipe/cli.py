"""The ``es-pipe`` command. Sub-commands: ``inspect`` (more to come: demo, shard, bench)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from es_pipe.inspect import add_inspect_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="es-pipe",
        description="Evolved Sampling (ES/ESWP) for streaming PyTorch data pipelines.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_inspect_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
