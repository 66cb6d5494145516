"""Deprecated location of the ESWP pruning rule: it lives in :mod:`es_pipe.eswp.rule`.

Kept for one release so that ``from es_pipe.pruning import Pruning`` goes on working.
"""

from typing import Any

from es_pipe.eswp.rule import (
    STREAK,
    UPWEIGHT,
    Decision,
    Pruning,
    decide,
    from_state,
    keep_all,
    shard_seed,
)

__all__ = [
    "STREAK",
    "UPWEIGHT",
    "Decision",
    "Pruning",
    "decide",
    "from_state",
    "keep_all",
    "shard_seed",
]


def __getattr__(name: str) -> Any:
    """The deprecated name of one release, ``InfoBatch`` (:mod:`es_pipe.renamed`)."""
    if name != "InfoBatch":  # the deprecated names
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from es_pipe.renamed import old_name

    return old_name(__name__, name)
