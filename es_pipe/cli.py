"""Deprecated alias of :mod:`es_pipe.tools.cli` (the command line moved out of the core
into :mod:`es_pipe.tools`); kept for one release, for ``python -m es_pipe.cli`` and
``from es_pipe.cli import main``. Use the ``es-pipe`` script, ``python -m es_pipe.tools``
or :func:`es_pipe.tools.cli.main`."""

from __future__ import annotations

import warnings

from es_pipe.tools.cli import build_parser, main, positive_float, positive_int

__all__ = ["build_parser", "main", "positive_float", "positive_int"]

warnings.warn(
    "es_pipe.cli moved to es_pipe.tools.cli; es_pipe.cli goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
