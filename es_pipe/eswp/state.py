"""ESWP's part of the sampler's score table (``sampler.state_dict()``): what a checkpoint
inside an epoch needs to resume exactly. With manifests, the key book of the shards held
(``"keys"``, for this epoch's manifests); without, this epoch's pruning decisions
(``"pruning"``: no manifest holds them). Both with the shards read so far (``"read"``).
The entries sit beside ``"scores"`` in the table, as es_pipe has always written them, so
``es_pipe.merge_scores`` and older checkpoints keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from es_pipe.checks import is_positive_number
from es_pipe.errors import ConfigError
from es_pipe.eswp.rule import Decision, from_state
from es_pipe.scores import damaged, is_count

if TYPE_CHECKING:
    from es_pipe.eswp.plugin import ESWP


def entries(eswp: ESWP) -> dict[str, Any]:
    """ESWP's entries of the score table."""
    state: dict[str, Any] = {}
    book = eswp.book
    if eswp.manifests is not None:
        state["keys"] = book.keys.state(eswp.store)  # for this epoch's manifests
    else:  # this epoch's pruning: no manifest holds it
        state["pruning"] = {
            "epoch": book.epoch,
            "shards": {
                name: {"state": torch.from_numpy(d.state.copy()), "factor": d.factor}
                for name, d in book.decisions.items()
            },
        }
    state["read"] = book.read_state()  # the shards this epoch's end decides (writes)
    return state


class Entries:
    """ESWP's entries of a score table, checked (before anything changes)."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        keys, pruning, read = state.get("keys", {}), state.get("pruning"), state.get("read")
        _check_key_book(keys)
        if read is not None and (
            not isinstance(read, (list, tuple)) or not all(isinstance(n, str) for n in read)
        ):
            raise _damaged("its 'read' entry is not a list of shard names")
        self.keys: Mapping[str, Any] = keys
        self.read: list[str] | None = None if read is None else list(read)
        self.decisions = None if pruning is None else _pruning_decisions(pruning)
        self.epoch = None if pruning is None else int(pruning["epoch"])

    def load(self, eswp: ESWP, epoch: int) -> None:
        """Into ``eswp``, whose sampler is at ``epoch``."""
        eswp.rewind(epoch)
        eswp.book.keys.load_state(self.keys)
        eswp.load_read(self.read)
        if self.decisions is not None and self.epoch is not None:
            eswp.book.epoch = self.epoch
            eswp.book.decisions = self.decisions


def _damaged(what: str) -> ConfigError:
    return damaged(what, "the sampler's score table (sampler.state_dict())")


def _check_key_book(keys: Any) -> None:
    if not isinstance(keys, Mapping) or not all(
        isinstance(name, str)
        and isinstance(book, (list, tuple))
        and all(k is None or isinstance(k, str) for k in book)
        for name, book in keys.items()
    ):
        raise _damaged("its 'keys' entry is not a map from shard names to lists of keys")


def _pruning_decisions(pruning: Any) -> dict[str, Decision]:
    """The pruning decisions of a checkpoint without manifests, checked."""
    entries = pruning.get("shards") if isinstance(pruning, Mapping) else None
    if not isinstance(pruning, Mapping) or not is_count(pruning.get("epoch")):
        raise _damaged("its 'pruning' entry has no epoch")
    if not isinstance(entries, Mapping):
        raise _damaged("its 'pruning' entry has no decisions per shard")
    decisions = {}
    for name, entry in entries.items():
        state = entry.get("state") if isinstance(entry, Mapping) else None
        factor = entry.get("factor") if isinstance(entry, Mapping) else None
        if (
            not isinstance(state, Tensor)
            or state.dim() != 1
            or state.is_floating_point()
            or (state.numel() and not 0 <= int(state.min()) <= int(state.max()) <= 255)
        ):
            raise _damaged(f"the pruning state of shard {name!r} is not a 1-D uint8 tensor")
        if not is_positive_number(factor):
            raise _damaged(f"the pruning factor of shard {name!r} is {factor!r}")
        decisions[name] = from_state(state.numpy(), float(factor))
    return decisions
