"""Moving a run to another number of ranks: merge the checkpoints of all old ranks.

At an epoch boundary nothing is needed: every rank restores the scores and pruning
decisions of the shards it reads from the committed manifests, whoever wrote them, and
the sources deal the epoch's shards to the new ranks. Start the new job with the same
``manifests=`` folder and it continues after the newest committed epoch.

Mid-epoch, by the sources' rule: collect the checkpoints of *all* old ranks, merge them
here, and restore the merged ones on *every* new rank::

    old = [torch.load(f"ckpt/rank{r}.pt", weights_only=True) for r in range(old_world)]
    sampler.load_state_dict(es_pipe.merge_scores([o["scores"] for o in old]))
    loader.load_state_dict(es_pipe.merge_checkpoints([o["loader"] for o in old]))

The rest of the epoch delivers every sample exactly once (the shards not yet finished are
dealt to the new ranks; a partly read shard resumes at its cursor). The scores of the
epoch continue where they were: a shard read again writes its manifest from the rank that
reads it; a shard finished before the checkpoint from its owner,
:func:`es_pipe.eswp.shard_owner`. Until that epoch ends, each new rank holds the
merged score table of the interrupted epoch; from the next epoch on, only its own shards.

Not covered: sources inside DataLoader worker processes (``SourceDataset``), whose
states sit per worker inside the DataLoader's state; those runs change topology at an
epoch boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from es_pipe.errors import ConfigError
from es_pipe.sampler import SCORES_KIND, STATE_VERSION
from es_pipe.scores import COLUMNS
from es_pipe.sources.base import merge_states

__all__ = ["merge_checkpoints", "merge_scores"]


def merge_checkpoints(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the pipeline states of every rank of one run, taken at the same step.

    ``states``: one per old rank, in any order: ``loader.state_dict()`` of a
    ``tn.Loader`` over the stage, or the stage's own ``state_dict()``. Source states are
    merged by :func:`es_pipe.sources.merge_states`, the sampler states checked to agree and
    marked as merged; every other entry must be equal on all ranks.
    """
    if not states:
        raise ConfigError("merge_checkpoints needs the checkpoints of all old ranks, got none")
    merged: dict[str, Any] = _merge(list(states), "state")
    return merged


def merge_scores(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the score tables (``sampler.state_dict()``) of every rank of one run: each
    holds the shards it read, so the union is the run's table of the interrupted epoch."""
    tables = [state["scores"] for state in state_dicts]
    if not tables:
        raise ConfigError("merge_scores needs the score tables of all old ranks, got none")
    steps = {state.get("step") for state in state_dicts}
    if len(steps) > 1:
        raise ConfigError(
            f"these score tables are from different steps ({sorted(map(str, steps))}); {_same_step}"
        )
    owner: dict[str, int] = {}
    for rank, table in enumerate(tables):
        for name in [*table["shards"], *table["keys"]]:
            if owner.setdefault(name, rank) != rank:
                raise ConfigError(
                    f"shard {name!r} is held by checkpoints {owner[name]} and {rank}: a shard "
                    "is read by one rank per epoch, so these are not the checkpoints of one "
                    "run at one step. Merge the checkpoints saved together"
                )
    merged: dict[str, Any] = {
        "kind": SCORES_KIND,
        "version": STATE_VERSION,
        "scores": {
            "shards": [name for table in tables for name in table["shards"]],
            "lengths": [rows for table in tables for rows in table["lengths"]],
            "keys": {name: keys for table in tables for name, keys in table["keys"].items()},
            **{column: torch.cat([table[column] for table in tables]) for column in COLUMNS},
        },
    }
    if any("pruning" in state for state in state_dicts):
        raise ConfigError(
            "these checkpoints hold ESWP pruning decisions that no manifest has (prune= "
            "without manifests=): they cannot move to another topology. Give the run a "
            "manifests= folder, or resume it on the same single rank"
        )
    if None not in steps:
        merged["step"] = steps.pop()
    if any("keys" in state for state in state_dicts):  # key books: one per shard held
        merged["keys"] = {k: v for state in state_dicts for k, v in state.get("keys", {}).items()}
    return merged


def _merge(values: list[Any], path: str) -> Any:
    first = values[0]
    if isinstance(first, Mapping):
        if not all(isinstance(v, Mapping) and v.keys() == first.keys() for v in values):
            raise ConfigError(f"{path}: the checkpoints have different entries; {_same_step}")
        if {"digest", "cursors", "stream"} <= first.keys():
            return merge_states(values)
        if {"seed", "step", "steps_in_epoch"} <= first.keys():
            return _merge_sampler(values, path)
        return {key: _merge([v[key] for v in values], f"{path}.{key}") for key in first}
    if any(v != first for v in values):
        shown = ", ".join(repr(v) for v in values[:4])
        raise ConfigError(f"{path} differs across the checkpoints ({shown}); {_same_step}")
    return first


def _merge_sampler(values: list[Mapping[str, Any]], path: str) -> dict[str, Any]:
    world = values[0].get("world_size", 1)
    if len(values) != world:
        raise ConfigError(
            f"{path}: {len(values)} checkpoints of a run on {world} ranks; merge the "
            "checkpoints of every old rank"
        )
    for key in ("seed", "epoch", "step", "steps_in_epoch"):
        if any(v[key] != values[0][key] for v in values):
            shown = [v[key] for v in values[:8]]
            raise ConfigError(f"{path}.{key} differs across checkpoints ({shown}); {_same_step}")
    return {**values[0], "merged": True}


_same_step = (
    "merge checkpoints that every rank saved at the same step (with equalize='drop' or "
    "'pad' the ranks take the same number of steps per epoch)"
)
