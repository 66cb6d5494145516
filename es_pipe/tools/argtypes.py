"""argparse pieces shared by the ``es-pipe`` commands (and the demo's): types that refuse
a bad value with a message that says what is wanted, and the one way a command's parser
is made."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

N = TypeVar("N", int, float)


def add_command(
    subparsers: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    """Register the sub-command ``name`` (``es-pipe NAME``), whose ``run(args)`` the CLI
    calls (``args.func``). Its description and epilog (the examples) print as written."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an int >= 1, refused with a message that says so."""
    value = _parsed(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = _parsed(text, float, "a number")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def _parsed(text: str, kind: Callable[[str], N], noun: str) -> N:
    """``kind(text)``, or the argparse error that ``text`` is not ``noun``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
