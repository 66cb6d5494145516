"""The sampler's checkpoint: its position (``get_state``, small and JSON-friendly, inside
the loader's state) and its score table (``state_dict``, tensors, saved with the model).

Each half names its step, and they load only together: a position restored without its
table, or halves of two steps, is refused with a ``ConfigError`` that says what to save.
Both carry ``kind`` and ``version``; states without them (es_pipe up to 3d23362) are
read as version 1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from es_pipe.checks import is_int
from es_pipe.errors import ConfigError
from es_pipe.eswp import state as eswp_state
from es_pipe.scores import damaged

if TYPE_CHECKING:
    from es_pipe.sampler import Selector

log = logging.getLogger("es_pipe.sampler")

STATE_VERSION = 1
POSITION_KIND = "es_pipe.sampler.position"  # Selector.get_state(), inside the loader's state
SCORES_KIND = "es_pipe.sampler.scores"  # Selector.state_dict()
POSITION_FIELDS = ("seed", "step", "epoch", "steps_in_epoch", "steps_last_epoch")


class SamplerState:
    """Saves and restores one sampler's position and score table, and pairs the two."""

    def __init__(self, sampler: Selector) -> None:
        self.sampler = sampler
        # a restored position's step while its score table is not loaded, and a loaded
        # score table (with its step, None if it names none) while its position is not
        self.position_step: int | None = None
        self._scores_waiting = False
        self._scores_step: int | None = None

    def refuse_without_scores(self) -> None:
        """Before a selection: a restored position needs its score table."""
        if self.position_step is not None:
            raise ConfigError(
                f"the loader was restored to step {self.position_step}, but this sampler's "
                "score table was not: without it the run would go on from an empty table. "
                "Save sampler.state_dict() with loader.state_dict() and restore both "
                "(sampler.load_state_dict(saved) before or after loader.load_state_dict)"
            )

    def get_state(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "kind": POSITION_KIND,
            "version": STATE_VERSION,
            "seed": s.seed,
            "step": s.step,
            "epoch": s.epoch,
            "steps_in_epoch": s._steps_in_epoch,
            "steps_last_epoch": s._steps_last_epoch,
            "world_size": s.world_size,
        }

    def check_state(self, state: Any) -> None:
        check_header(state, POSITION_KIND, "position", "the loader's state_dict()")
        for name in POSITION_FIELDS:
            value = state.get(name)
            if not is_int(value, at_least=0):
                raise ConfigError(
                    f"the sampler position in this checkpoint has {name}={value!r}, not a "
                    "non-negative int: the checkpoint is damaged. Restore another checkpoint, "
                    "or start the epoch over from manifests= without a loader checkpoint"
                )
        world = state.get("world_size", 1)
        if not is_int(world, at_least=1):
            raise ConfigError(
                f"the sampler position in this checkpoint has world_size={world!r}, not a "
                "positive int: the checkpoint is damaged; restore another one"
            )
        if not isinstance(state.get("merged", False), bool):
            raise ConfigError(
                f"the sampler position's 'merged' is {state['merged']!r}, not True or False: "
                "the checkpoint is damaged; merge the old ranks' checkpoints again"
            )
        if state["seed"] != self.sampler.seed:
            raise ConfigError(
                f"checkpoint was taken with seed={state['seed']}, this sampler has "
                f"seed={self.sampler.seed}: construct the sampler with the checkpoint's seed"
            )
        saved_world = state.get("world_size", 1)
        if saved_world != self.sampler.world_size and not state.get("merged"):
            raise ConfigError(
                f"this checkpoint is one rank's of {saved_world}, and it is restored on "
                f"{self.sampler.world_size} ranks: merge the checkpoints of all {saved_world} "
                "old ranks with es_pipe.merge_checkpoints(...) (and their score tables with "
                "es_pipe.merge_scores(...)) and restore the merged ones on every new rank"
            )

    def load_state(self, state: dict[str, Any]) -> None:
        s = self.sampler
        s.start()  # a resume from manifests first, which the checkpoint then overrides
        self.check_state(state)
        self._pair_step(position=state["step"], scores=self._scores_step)  # before changes
        merged = bool(state.get("merged"))
        s.step, s.epoch = state["step"], state["epoch"]
        s._steps_in_epoch = state["steps_in_epoch"]
        s._steps_last_epoch = state["steps_last_epoch"]
        log.debug("sampler restored to epoch %d, step %d", s.epoch, s.step)
        if s.eswp is not None:  # also at the same epoch: see ESWP.rewind
            s.eswp.rewind(s.epoch, merged=merged)
        if not self._scores_waiting and state["step"] > 0:
            self.position_step = state["step"]  # select() refuses until the scores come
        self._scores_waiting, self._scores_step = False, None

    def _pair_step(self, *, position: int | None, scores: int | None) -> None:
        """Refuse the two halves of a checkpoint when they were saved at different steps."""
        if position is None or scores is None or position == scores:
            return
        raise ConfigError(
            f"the sampler's score table is from step {scores} but the loader position is "
            f"from step {position}: they are halves of two checkpoints. Restore the "
            "sampler.state_dict() and loader.state_dict() saved together (at the same step)"
        )

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        state: dict[str, Any] = {
            "kind": SCORES_KIND,
            "version": STATE_VERSION,
            "step": s.step,
            "scores": s.store.state_dict(),
        }
        if s.eswp is not None:
            state.update(eswp_state.entries(s.eswp))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.sampler
        s.start()
        check_header(state, SCORES_KIND, "score table", "sampler.state_dict()")
        if "scores" not in state:
            raise _damaged(f"it has no 'scores' entry (its entries: {[str(k) for k in state][:8]})")
        entries = eswp_state.Entries(state)  # checked before anything changes
        step = state.get("step")  # absent in states up to version 1 without it, and merged
        if step is not None and not is_int(step, at_least=0):
            raise _damaged(f"its 'step' is {step!r}, not a non-negative int")
        self._pair_step(position=self.position_step, scores=step)
        s.store.load_state_dict(state["scores"])  # checks the table, then loads it
        self._scores_waiting = self.position_step is None
        self._scores_step = step if self._scores_waiting else None
        self.position_step = None
        if s.eswp is not None:
            entries.load(s.eswp, s.epoch)


def check_header(state: Any, kind: str, what: str, source: str) -> None:
    """``kind`` and ``version`` of a sampler state; a state without them (es_pipe up to
    3d23362 wrote none) is read as version 1."""
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"the sampler {what} to restore is a {type(state).__name__}, not a dict: pass "
            f"what {source} returned"
        )
    if state.get("kind", kind) != kind:
        raise ConfigError(
            f"this is a {state.get('kind')!r} state, not the sampler {what} ({kind!r}): pass "
            f"what {source} returned"
        )
    version = state.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > 1
        raise ConfigError(
            f"the sampler {what} has version {version!r}; this es_pipe reads version "
            f"{STATE_VERSION} (and states without a version). "
            + (
                "It was written by a newer es_pipe: upgrade es_pipe to restore it"
                if newer
                else "The checkpoint is damaged: restore another one"
            )
        )


def _damaged(what: str) -> ConfigError:
    return damaged(what, "the sampler's score table (sampler.state_dict())")
