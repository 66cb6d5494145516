"""The epoch commit: at the end of an epoch, decide the next epoch's pruning of every shard
this rank read, write their manifests, and commit the epoch (rank 0, after waiting for
every rank's files) or wait for that commit (the other ranks: the barrier, since the next
epoch reads what the commit publishes).

It runs when the sampler's epoch ends, inside the last ``next()`` of the stage's epoch
(where ``for meta in loader`` ends). What it did and how long it took, the wait for other
ranks included, is ``sampler.last_commit`` (an :class:`EpochCommit`), and is logged at
INFO through ``logging.getLogger("es_pipe")``.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from es_pipe.eswp import rule
from es_pipe.eswp.rule import Decision

if TYPE_CHECKING:
    from es_pipe.eswp.plugin import ESWP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochCommit:
    """What the end of an epoch did on this rank.

    Attributes:
        epoch: the epoch that ended.
        step: the sampler's step at its end (recorded in the commit marker).
        seconds: wall time of the whole epoch end: decisions, manifest writes, commit or
            wait.
        wait_seconds: of those, the commit (rank 0: waiting for every rank's manifests,
            then publishing the marker) or the wait for it (other ranks); 0 without
            manifests.
        files: manifests this rank wrote (one per shard it read).
        pruned: samples this rank's decisions prune in the next epoch.
        committed: whether the epoch was committed to manifests (``False`` without them).
    """

    epoch: int
    step: int
    seconds: float
    wait_seconds: float
    files: int
    pruned: int
    committed: bool


def close_epoch(eswp: ESWP, ended: int, *, active: bool, rank: int, step: int) -> EpochCommit:
    """Decide, write and commit the end of epoch ``ended`` (see the module)."""
    started = time.perf_counter()
    book, store, prune, manifests = eswp.book, eswp.store, eswp.prune, eswp.manifests
    nxt = ended + 1
    # inherited from another topology's checkpoint and not read here since: a fallback
    # copy by one rank, in case no rank read it after the restore (it was done)
    fallback = {
        name for name in book.inherited - book.touched if shard_owner(name, eswp.world_size) == rank
    }
    writing = book.touched | fallback
    for name in writing:  # held from a checkpoint: this epoch's decision, for streaks
        eswp.see(name)
    keys = book.keys.merge(store) if manifests is not None else {}
    hyper = {**eswp.hyper, "step": step}
    decisions: dict[str, Decision] = {}
    items: list[dict[str, Any]] = []
    for name in sorted(writing):
        view = store.shard(name)
        previous = book.decisions.get(name)
        if prune is not None and active:
            decisions[name] = rule.decide(
                prune,
                view[prune.score],
                view["visits"],
                None if previous is None else previous.state,
                rule.shard_seed(eswp.seed, nxt, name),
            )
        else:
            decisions[name] = rule.keep_all(len(view["score"]))
        if manifests is not None:
            items.append(
                {
                    "shard": name,
                    "columns": {**view, "state": decisions[name].state},
                    "keys": keys.get(name),
                    "factor": decisions[name].factor,
                    "fingerprint": eswp.fingerprint(name),
                    "hyper": hyper,
                    "fallback": name in fallback,
                }
            )
            if name not in fallback:  # a fallback may lose: restore it from the commit
                book.written[name] = ended
            eswp.stats["written"] += 1
    for name in fallback:
        decisions.pop(name)
    waited = 0.0
    if manifests is not None:
        manifests.write_shards(ended, items)
        manifests.finish(ended)
        wait_start = time.perf_counter()
        if rank == 0:
            manifests.commit(
                ended,
                expected_ranks=eswp.world_size,
                timeout=eswp.commit_timeout,
                hyper=hyper,
                run=eswp.run,
            )
        else:  # the barrier: the next epoch reads what this commit publishes
            manifests.wait_committed(ended, ranks=eswp.world_size, timeout=eswp.commit_timeout)
        waited = time.perf_counter() - wait_start
        # shards not read this epoch live in the manifests, not in this rank's memory
        for name in set(store.shards) - book.touched:
            store.drop(name)
            book.keys.forget(name)
        store.compact()
        eswp.new_listing()  # next epoch: compare with the newest commit again
    book.turn(nxt, decisions)
    pruned = sum(len(d.pruned) for d in book.decisions.values())
    done = EpochCommit(
        ended,
        step,
        time.perf_counter() - started,
        waited,
        len(items),
        pruned,
        manifests is not None,
    )
    if manifests is not None:
        log.info(
            "epoch %d %s %s (%d ranks, step %d): %d manifests written, %.3fs waited, %.3fs "
            "in all (sampler.last_commit)",
            ended,
            "committed under" if rank == 0 else "waited for rank 0's commit under",
            manifests.url,
            eswp.world_size,
            step,
            done.files,
            waited,
            done.seconds,
        )
    if prune is not None:
        log.info(
            "epoch %d ended: %d of the %d shards read prune %d samples in epoch %d",
            ended,
            len(book.decisions),
            len(decisions),
            pruned,
            nxt,
        )
    return done


def shard_owner(shard: str, world_size: int) -> int:
    """The rank that writes a shard nobody reads in an elastically resumed epoch."""
    return zlib.crc32(shard.encode()) % world_size
