"""The stage's intake: the items of the next meta-batch from upstream, single samples or
column chunks, with ESWP's pruned rows left out, and the source's position before them.

:class:`~es_pipe.stage.SelectStage` keeps the node contract (``reset``/``next``/
``get_state``, the epoch clock); this module is what it reads from its source with.
"""

from __future__ import annotations

import logging
import warnings
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import torchdata.nodes as tn

from es_pipe.batch import take_list
from es_pipe.columns import ColumnChunk
from es_pipe.errors import ConfigError
from es_pipe.eswp import ESWP
from es_pipe.identity import ArrayIdentity, identify
from es_pipe.sampler import Identity
from es_pipe.scores import ShardCodes

log = logging.getLogger("es_pipe.stage")  # the stage's log: users filter by its name
MIXED = (
    "the upstream yields both column chunks (a source with columnar=True) and single "
    "samples: give the stage one kind, e.g. build every source with the same columnar="
)


class Taken(NamedTuple):
    """One meta-batch's intake: ``samples`` (the dict path) or ``pieces`` (slices of
    column chunks, no copy), their identity (``None`` when nothing was left), whether the
    pieces' ranges already show it unique, and the row count."""

    samples: list[Any]
    pieces: list[ColumnChunk]
    who: Identity | None
    unique: bool
    rows: int


class Intake:
    """Reads a node's items for the stage: single samples (pulled in bulk where the stage
    wrapped an iterable in ``tn.IterableWrapper``) or column chunks (a source with
    ``columnar=True``; the first item decides), the chunks held and cut at meta-batch
    edges. Samples the sampler prunes this epoch that the source handed over anyway are
    left out and counted in ``pruned``.

    State contract, the intake's part of the stage's checkpoint:

    * :meth:`position` gives the source's ``state_dict()`` just before the items not yet
      used (the stage's ``"source"``) and, inside a held chunk, the rows of it already
      used (its ``"skip"``, written only then);
    * ``exhausted`` (the source ran out; the epoch ends at the stage's next call) is the
      stage's ``"exhausted"``, set back by the stage after :meth:`restore`;
    * :meth:`restore` resets the source to a saved ``"source"`` and pulls its ``"skip"``
      rows again, on either path, so the dict and columnar paths resume each other's
      checkpoints.
    """

    def __init__(self, source: tn.BaseNode) -> None:
        self.source = source
        # an iterable wrapped in torchdata's own IterableWrapper is pulled from in bulk
        self._wrapped = source if type(source) is tn.IterableWrapper else None
        self.exhausted = False  # the source ran out
        self.pruned = 0  # pruned samples the source handed over anyway (this run)
        self._pruned_before = 0  # ``pruned`` when the epoch started
        self._warned = False  # the lost-I/O warning is given once per stage
        # the columnar path: the chunk being cut into meta-batches, the rows of it already
        # used, and the source's state just before it was pulled
        self.columnar = False
        self.held: ColumnChunk | None = None
        self.held_at = 0
        self.held_state: Any = None
        self.before: Any = None  # the source's state before the next pull, where known

    def start(self) -> None:
        """Read the source's epoch from its beginning (the stage set its epoch)."""
        self.source.reset(None)
        self.drop_held()
        self.exhausted = False
        self._pruned_before = self.pruned

    def restore(self, source_state: Any, skip: int) -> None:
        """Reset the source to ``source_state`` and skip the ``skip`` rows after it."""
        self.source.reset(source_state)
        self._skip_rows(source_state, skip)

    def position(self) -> tuple[Any, int | None]:
        """The source's state before the items not yet used, and the rows of the held
        chunk already used (``None`` outside a chunk)."""
        if self.held is not None:
            return self.held_state, self.held_at
        return self.source.state_dict(), None

    def take(self, n: int, eswp: ESWP | None, before: Any) -> Taken:
        """Up to ``n`` unpruned samples (or rows) for one meta-batch; fewer when the source
        runs out. ``before`` is the source's state now (from :meth:`position`), which a
        first column chunk is held with; ``eswp`` is the sampler's (or ``None``)."""
        self.before = before if self.held is None else None
        samples: list[Any] = []
        parts: list[Identity] = []
        while len(samples) < n and not self.exhausted and not self.columnar:
            fresh = self._pull(n - len(samples))
            if fresh:
                fresh, part = self._unpruned(fresh, identify(fresh), eswp)
                samples += fresh
                parts.append(part)
        pieces: list[ColumnChunk] = []
        unique = False
        if self.columnar:
            pieces = self._pull_columns(n, eswp)
            parts = [ArrayIdentity.of_chunks(pieces)] if pieces else []
            unique = ArrayIdentity.unique_by_ranges(pieces)
        rows = sum(len(piece) for piece in pieces) if self.columnar else len(samples)
        who = ArrayIdentity.concat(parts) if parts else None
        return Taken(samples, pieces, who, unique, rows)

    def _pull(self, n: int) -> list[Any]:
        """Up to ``n`` samples from the source; fewer when it runs out. A column chunk
        as the first item switches to the columnar path (it is held)."""
        pulled: list[Any] = []
        for _ in range(n):
            try:
                item = next(self.source)
            except StopIteration:
                self.exhausted = True
                break
            if isinstance(item, ColumnChunk):
                if pulled or self.before is None:
                    raise ConfigError(MIXED)
                self.columnar = True
                self._hold(item, 0, self.before)
                break
            pulled.append(item)
            if len(pulled) == 1 and n > 1 and _bulk(self._wrapped):
                pulled += self._pull_wrapped(n - 1)
                break
        self.before = None
        return pulled

    def _pull_wrapped(self, n: int) -> list[Any]:
        """Up to ``n`` more samples from the iterable the stage wrapped itself (a list, a
        generator, a DataLoader), in one C-level pass rather than one node call per
        sample; the wrapper's count of items yielded, its whole state, is kept as it
        would be."""
        wrapper = self._wrapped
        assert wrapper is not None
        # next() on the iterator itself: islice would call iter() on it first, and an
        # iterable that is its own iterator may restart there (litdata's StreamingDataset)
        pulled = list(map(next, repeat(wrapper._it, n)))
        wrapper._num_yielded += len(pulled)
        if len(pulled) < n:
            self.exhausted = True
        if ColumnChunk in set(map(type, pulled)):
            raise ConfigError(MIXED)
        return pulled

    def _hold(self, chunk: ColumnChunk, at: int, before: Any) -> None:
        self.held, self.held_at, self.held_state = chunk, at, before

    def drop_held(self) -> None:
        """Forget the held chunk and the path taken (the next item decides again)."""
        self.held, self.held_at, self.held_state, self.before = None, 0, None, None
        self.columnar = False

    def _next_chunk(self) -> ColumnChunk | None:
        """Pull the next non-empty chunk and hold it (with the source's state before it);
        ``None`` when the source runs out."""
        while True:
            before = self.before if self.before is not None else self.source.state_dict()
            self.before = None
            try:
                item = next(self.source)
            except StopIteration:
                self.exhausted = True
                return None
            if not isinstance(item, ColumnChunk):
                raise ConfigError(MIXED)
            if len(item):
                self._hold(item, 0, before)
                return item

    def _pull_columns(self, n: int, eswp: ESWP | None) -> list[ColumnChunk]:
        """Up to ``n`` unpruned rows, as slices of the source's chunks (no copy); the
        rest of the last chunk is held for the next meta-batch."""
        pieces: list[ColumnChunk] = []
        count = 0
        while count < n:
            held = self.held if self.held is not None else self._next_chunk()
            if held is None:
                break
            at = self.held_at
            stop = min(len(held), at + n - count)
            piece = held if at == 0 and stop == len(held) else held.slice(at, stop)
            if stop == len(held):
                self.held, self.held_at, self.held_state = None, 0, None
            else:
                self.held_at = stop
            piece = self._unpruned_chunk(piece, eswp)
            if len(piece):
                pieces.append(piece)
                count += len(piece)
        return pieces

    def _skip_rows(self, before: Any, skip: int) -> None:
        """Restore inside a chunk: pull chunks again and skip the ``skip`` rows of them
        that earlier meta-batches used (the source yields the same rows from its state).
        A source on the dict path (``columnar=False``, or a checkpoint of the columnar
        path restored where the dict path runs) yields those rows as its next ``skip``
        samples: they are pulled and dropped, so either path resumes the other's
        checkpoint."""
        self.drop_held()
        first = True
        while skip:
            state = before if first else (self.source.state_dict() if self.columnar else None)
            try:
                item = next(self.source)
            except StopIteration:
                raise ConfigError(
                    f"the checkpoint says {skip} more rows of a chunk were used, but the "
                    "source has no more: the loader state does not belong to these shards; "
                    "restore the loader.state_dict() saved with this sampler state"
                ) from None
            if isinstance(item, ColumnChunk):
                if not first and not self.columnar:
                    raise ConfigError(MIXED)
                self.columnar = True
                if len(item) > skip:
                    self._hold(item, skip, state)
                    return
                skip -= len(item)
            else:
                if self.columnar:
                    raise ConfigError(MIXED)
                skip -= 1
            first = False

    def warn_pruned(self, epoch: int, hookable: bool) -> None:
        """Once per stage, at an epoch's end: the source read samples that ESWP pruned (the
        stage dropped them: training is right, the I/O saving is lost). A warning where an
        es_pipe source could have skipped them (``hookable``; it had no hook, or persistent
        workers without manifests); a log line for other upstreams, which have no hook."""
        dropped = self.pruned - self._pruned_before
        if not dropped or self._warned:
            return
        self._warned = True
        if not hookable:  # a list, a webdataset pipeline: no hook to skip with
            log.info(
                "epoch %d: the stage dropped %d samples that ESWP pruned (an upstream "
                "without the pruned= hook reads them; es_pipe's sources skip them unread)",
                epoch,
                dropped,
            )
            return
        warnings.warn(
            f"epoch {epoch}: the source read and decoded {dropped} samples that "
            "ESWP pruned, and the stage dropped them (training is right, the reading they "
            "cost is lost). Give the source the hook, Source(..., pruned=sampler.pruned); "
            "behind DataLoader workers with persistent_workers=True, also give the sampler "
            "manifests= (the workers read each epoch's decisions from them) or use "
            "non-persistent workers. Warned once; stage.pruned_by_stage counts them all",
            stacklevel=4,
        )

    def _unpruned_chunk(self, piece: ColumnChunk, eswp: ESWP | None) -> ColumnChunk:
        """The columnar twin of :meth:`_unpruned`: one mask over the chunk's ordinals."""
        if eswp is None or eswp.prune is None:
            return piece
        codes = ShardCodes([piece.shard], np.zeros(len(piece), np.int64))
        keep = eswp.drop_pruned(codes, piece.ordinals)
        if keep.all():
            return piece
        self.pruned += int((~keep).sum())
        return piece.filter(keep)

    def _unpruned(
        self, samples: list[Any], who: Identity, eswp: ESWP | None
    ) -> tuple[list[Any], Identity]:
        """Leave out samples the sampler prunes this epoch that the source did not skip
        (a source without the ``pruned=sampler.pruned`` hook); counted in ``pruned``."""
        if eswp is None or eswp.prune is None or who.ordinals is None:
            return samples, who
        keep = eswp.drop_pruned(who.shards, who.ordinals)
        if keep.all():
            return samples, who
        self.pruned += int((~keep).sum())
        kept = np.flatnonzero(keep)
        return take_list(samples, kept), who.take(kept)


def _bulk(node: tn.IterableWrapper | None) -> bool:
    """True where the intake may pull items of ``node`` in bulk: torchdata's
    ``IterableWrapper`` with the iterator and the count (``_it``, ``_num_yielded``) that its
    own ``next()`` advances, both started (after its first item)."""
    return (
        node is not None
        and getattr(node, "_it", None) is not None
        and type(getattr(node, "_num_yielded", None)) is int
    )
