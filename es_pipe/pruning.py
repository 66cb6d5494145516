"""Deprecated location of the ESWP pruning rule: it lives in :mod:`es_pipe.eswp.rule`.

Kept for one release so that ``from es_pipe.pruning import Pruning`` goes on working.
"""

from es_pipe.eswp.rule import (
    STREAK,
    UPWEIGHT,
    Decision,
    InfoBatch,
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
    "InfoBatch",
    "Pruning",
    "decide",
    "from_state",
    "keep_all",
    "shard_seed",
]
