"""The ``es-pipe`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

EPILOG = """examples:
  es-pipe demo                 # shard the Python stdlib, pretrain a byte LM with uniform
                               # sampling and with ES side by side: a few minutes on 2 cores
  es-pipe demo --quick         # the same in under a minute
  es-pipe demo --help          # scale it up: --epochs, --samples, --methods, --seed

The output folder (./es-pipe-out/demo by default) holds the shards, a results table as
Markdown and CSV, and a PNG of the held-out loss curves."""


def build_parser() -> argparse.ArgumentParser:
    from es_pipe import __version__
    from es_pipe.demo import add_demo_parser

    parser = argparse.ArgumentParser(
        prog="es-pipe",
        description="Evolved Sampling (ES/ESWP) for streaming PyTorch data pipelines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"es-pipe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_parser(subparsers)
    # Other subcommands (inspect, shard, bench) register here: add_<name>_parser(subparsers).
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
