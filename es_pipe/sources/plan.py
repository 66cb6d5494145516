"""The epoch plan: which shards a stream reads this epoch, which it finished, where it stopped.

The plan of stream ``s`` of ``S`` is a pure function of the shard list, the seed, the
epoch and, after a restore, the facts a checkpoint records: the shards every stream
finished (``done``) and the cursors of the shards they started. This module holds the plan,
its checkpoint state (:func:`plan_state` / :func:`read_state`) and the merge of the states
of all streams (:func:`merge_states`).

State
-----
A stream's state (what ``get_state()`` returns)::

    {"version": 1, "seed": 0, "epoch": 3, "shuffle": true, "digest": "1a2b3c4d",
     "n_shards": 64, "stream": [s, S], "done": [[0, 5], [9, 10]],
     "cursors": {"s3://b/train-007.tar": 120}, "yielded": 4242, "padded": 0}

``done`` holds listed-order indices (as ``[start, stop)`` ranges) of shards this stream
finished this epoch; ``cursors`` maps a started shard to the number of its samples (in
shard order, pruned ones not counted) already delivered. Nothing in it counts items
globally, so the same facts describe the progress on any topology.

Rule for who reads what after a restore:

* Same topology (the state's ``S`` equals the current number of streams): stream ``s``
  keeps its own shards ``order[s::S]`` minus ``done``; a started shard resumes at its cursor.
  The remaining stream is exactly the stream the run would have produced.
* Different topology: merge the states of *all* old streams with :func:`merge_states`
  (a single stream cannot know what the others read) and pass the merged state to every
  new stream. The shards not yet done, in epoch order, are dealt round-robin to the new
  streams (``remaining[s::S]``); a partly read shard resumes at its cursor on whichever
  stream it lands. Every sample of the epoch is still delivered exactly once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from es_pipe.errors import ConfigError
from es_pipe.sources.shards import ShardList, epoch_order

__all__ = ["STATE_VERSION", "EpochPlan", "Resume", "merge_states", "plan_state", "read_state"]

STATE_VERSION = 1
_SHARED_KEYS = ("version", "seed", "epoch", "shuffle", "digest", "n_shards")


@dataclass
class EpochPlan:
    """One stream's shards for one epoch, and its progress through them.

    ``order`` is the epoch's full shard order; ``dealt`` the order dealt to the streams
    (``order`` itself, or after a re-split the shards not yet done); ``own`` this
    stream's share of ``dealt`` (``dealt[s::S]``), ``todo`` the part of it not done.
    ``current`` is the shard being read (``None`` between shards and while padding).
    ``resplit`` says that ``dealt`` holds only the shards not done at a restore on
    another topology.
    """

    stream: tuple[int, int]
    order: np.ndarray
    dealt: np.ndarray
    own: list[int]
    todo: list[int]
    done: set[int] = field(default_factory=set)
    cursors: dict[int, int] = field(default_factory=dict)
    pos: int = 0
    current: int | None = None
    resplit: bool = False

    @classmethod
    def start(
        cls,
        n_shards: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        stream: tuple[int, int],
        done: set[int] | None = None,
        cursors: dict[int, int] | None = None,
        remaining_only: bool = False,
    ) -> EpochPlan:
        """The plan of ``stream`` in ``epoch``; ``done``/``cursors`` from a restored state,
        ``remaining_only`` to deal the shards not yet done anew (another topology)."""
        done = set(done or ())
        s, n_streams = stream
        order = epoch_order(n_shards, seed, epoch, shuffle)
        dealt = order
        if remaining_only:
            dealt = np.array([i for i in order if i not in done], dtype=np.int64)
        own = [int(i) for i in dealt[s::n_streams]]
        return cls(
            stream=stream,
            order=order,
            dealt=dealt,
            own=own,
            todo=[i for i in own if i not in done],
            done=done,
            cursors=dict(cursors or {}),
            resplit=remaining_only,
        )

    def shares(self) -> list[np.ndarray]:
        """Every stream's share of the dealt shards, ``dealt[t::S]`` for each stream ``t``."""
        n_streams = self.stream[1]
        return [self.dealt[t::n_streams] for t in range(n_streams)]

    def split_report(self, epoch: int, kept: list[int] | None) -> dict[str, Any]:
        """How the epoch's shards (and samples, with ``kept`` counts) split across
        streams, and the ``imbalance`` (``max / mean - 1``) of the split."""
        per_shards = [len(share) for share in self.shares()]
        report: dict[str, Any] = {
            "epoch": epoch,
            "stream": self.stream[0],
            "streams": self.stream[1],
            "shards_per_stream": per_shards,
        }
        per = per_shards
        if kept is not None:
            per = [int(sum(kept[i] for i in share)) for share in self.shares()]
            report["samples_per_stream"] = per
        mean = float(np.mean(per))
        report["imbalance"] = (max(per) / mean - 1.0) if mean > 0 else 0.0
        return report

    def warn_idle(self, epoch: int) -> None:
        """Warn that this stream has no shard to read (more streams than shards)."""
        s, n_streams = self.stream
        warnings.warn(
            f"stream {s} of {n_streams} (rank x worker) has no shard to read in epoch "
            f"{epoch}: {len(self.order)} shards for {n_streams} streams; use more "
            "shards than streams, or equalize='pad' so that every stream yields as many "
            "samples as the longest",
            stacklevel=5,
        )

    def next_shard(self) -> tuple[int, int] | None:
        """``(shard, start)`` of the next shard to read, which becomes :attr:`current`
        (``start``: its samples already delivered); ``None`` when the plan is read."""
        if self.pos >= len(self.todo):
            return None
        i = self.todo[self.pos]
        self.pos += 1
        self.current = i
        return i, self.cursors.get(i, 0)

    def skip_to_end(self) -> None:
        """Mark every planned shard as opened (a restore in the padding phase)."""
        self.pos = len(self.todo)

    def finish_current(self) -> None:
        """The current shard is read to its end (or skipped): done, no cursor left."""
        if self.current is not None:
            self.done.add(self.current)
            self.cursors.pop(self.current, None)
        self.current = None

    def live_cursors(self, current_count: int) -> dict[int, int]:
        """The cursors, with the current shard at ``current_count`` delivered samples."""
        cursors = dict(self.cursors)
        if self.current is not None and current_count:
            cursors[self.current] = current_count
        return cursors


def plan_state(
    plan: EpochPlan,
    shards: ShardList,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    current_count: int,
    yielded: int,
    padded: int,
) -> dict[str, Any]:
    """The JSON-friendly state of a stream (see the module docstring)."""
    s, n_streams = plan.stream
    cursors = plan.live_cursors(current_count)
    return {
        "version": STATE_VERSION,
        "seed": seed,
        "epoch": epoch,
        "shuffle": shuffle,
        "digest": shards.digest,
        "n_shards": len(shards),
        "stream": [s, n_streams],
        "done": ranges_of(plan.done),
        "cursors": {shards.urls[i]: int(k) for i, k in sorted(cursors.items())},
        "yielded": int(yielded),
        "padded": int(padded),
    }


@dataclass(frozen=True)
class Resume:
    """What a checked state says to resume: the random choices, the epoch, the progress.

    ``remaining_only`` is true after a topology change: the shards not yet done are dealt
    anew and the delivered counts (``yielded``, ``padded``) restart at 0.
    """

    seed: int
    shuffle: bool
    epoch: int
    done: set[int]
    cursors: dict[int, int]
    yielded: int
    padded: int
    remaining_only: bool


def read_state(state: Any, shards: ShardList, stream: tuple[int, int]) -> Resume:
    """Check a state (or a merged one) against the shard list and the stream restoring
    it, and say what to resume. Raises :class:`ConfigError` naming the fix; reads only."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ConfigError(
            f"not a shard-source state of version {STATE_VERSION}: {str(state)[:200]}; pass "
            "what the source's state_dict() (or merge_states) returned"
        )
    if state["digest"] != shards.digest or state["n_shards"] != len(shards):
        raise ConfigError(
            "this state was saved for a different shard list "
            f"({state['n_shards']} shards, digest {state['digest']}; now {len(shards)} "
            f"shards, digest {shards.digest}); restore with the same shard list"
        )
    old_s, old_n = state["stream"]
    s, n_streams = stream
    if old_s is not None and (old_s, old_n) != (s, n_streams):
        raise ConfigError(
            f"this state was saved by stream {old_s} of {old_n} but is restored on stream "
            f"{s} of {n_streams}; to resume on another topology merge the states of all "
            "old streams with es_pipe.sources.merge_states(states) and restore the merged "
            "state on every new stream"
        )
    index = {u: i for i, u in enumerate(shards.urls)}
    done = indices_of(state["done"])
    cursors = {index[u]: int(k) for u, k in state["cursors"].items()}
    yielded, padded = state["yielded"], state["padded"]
    same = old_n == n_streams
    if same and isinstance(yielded, dict):  # a merged state restored on the old topology
        yielded, padded = yielded.get(str(s), 0), padded.get(str(s), 0)
    return Resume(
        seed=int(state["seed"]),
        shuffle=bool(state["shuffle"]),
        epoch=int(state["epoch"]),
        done=done,
        cursors=cursors,
        yielded=int(yielded) if same else 0,
        padded=int(padded) if same else 0,
        remaining_only=not same,
    )


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the states of all streams of one run into a topology-free state.

    Pass the result to ``reset()`` / ``load_state_dict()`` of every stream of the new
    topology (any number of ranks x workers). Raises :class:`ConfigError` when the states
    disagree (seed, epoch, shard list) or when some stream's state is missing.
    """
    if not states:
        raise ConfigError("merge_states needs the states of all streams, got none")
    first = states[0]
    for st in states:
        if any(st[k] != first[k] for k in _SHARED_KEYS):
            raise ConfigError(
                "states disagree on seed/epoch/shard list; merge states saved at the same "
                f"checkpoint: {[{k: st[k] for k in _SHARED_KEYS} for st in states][:4]}"
            )
    n_streams = first["stream"][1]
    ids = sorted(st["stream"][0] for st in states)
    if any(st["stream"][1] != n_streams for st in states) or ids != list(range(n_streams)):
        raise ConfigError(
            f"merge_states needs exactly one state per stream 0..{n_streams - 1}, got streams "
            f"{ids}; collect the state of every rank and worker"
        )
    done: set[int] = set()
    cursors: dict[str, int] = {}
    for st in states:
        done |= indices_of(st["done"])
        cursors.update(st["cursors"])
    return {
        **{k: first[k] for k in _SHARED_KEYS},
        "stream": [None, n_streams],
        "done": ranges_of(done),
        "cursors": dict(sorted(cursors.items())),
        "yielded": {str(st["stream"][0]): st["yielded"] for st in states},
        "padded": {str(st["stream"][0]): st["padded"] for st in states},
    }


def ranges_of(indices: Iterable[int]) -> list[list[int]]:
    """Compress a set of ints into sorted ``[start, stop)`` ranges (for small states)."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def indices_of(ranges: Iterable[Sequence[int]]) -> set[int]:
    """Inverse of :func:`ranges_of`."""
    return {i for a, b in ranges for i in range(int(a), int(b))}
