"""matplotlib, an optional extra: one import that names the extra when it is missing.

Plots are the only use es_pipe makes of matplotlib (``es-pipe demo``, ``es-pipe inspect
--plot``); it is installed by ``pip install 'es_pipe[plot]'``, not with the library.
"""

from __future__ import annotations

from typing import Any

from es_pipe.errors import ConfigError

INSTALL = "pip install 'es_pipe[plot]'"


def pyplot(what: str = "plotting") -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a :class:`ConfigError` that
    says ``what`` needs matplotlib and how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "matplotlib":
            raise
        raise ConfigError(
            f"{what} needs matplotlib, which is not installed: {INSTALL} (or pip install "
            "matplotlib), or leave the plot out"
        ) from None
    return plt
