"""Per-sample score state, keyed by sample identity ``(shard, ordinal)`` and grouped by shard.

Each shard owns one contiguous block of a flat arena of 16-byte rows, so looking up a
meta-batch of any mix of shards is a single vectorised gather, and recording it a single
scatter: a row holds score and last loss (float32), visits (uint32) and the last step it
was seen (int32), so a sample's state is one memory access (one cache line), whatever the
store's size.
Shards are immutable, so a sample's ordinal inside its shard (row number, tar position) is
a stable address; samples that arrive with a key but no ordinal get one on first sight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np
import torch
from torch import Tensor

from es_pipe.errors import ConfigError

COLUMNS: dict[str, np.dtype] = {
    "score": np.dtype(np.float32),
    "loss": np.dtype(np.float32),
    "visits": np.dtype(np.uint32),
    "step": np.dtype(np.int32),
}
ROW = np.dtype(list(COLUMNS.items()))  # one sample's state, 16 bytes, fields packed
BYTES_PER_SAMPLE = ROW.itemsize


@dataclass(frozen=True)
class ShardCodes:
    """Shard names of a batch of samples, encoded once: ``names[codes[i]]`` is sample i's."""

    names: list[str]
    codes: np.ndarray

    @classmethod
    def encode(cls, shards: Sequence[str]) -> ShardCodes:
        names: dict[str, int] = {}
        codes = [names.setdefault(shard, len(names)) for shard in shards]
        return cls(list(names), np.asarray(codes, dtype=np.int64))

    def take(self, picked: np.ndarray) -> ShardCodes:
        return ShardCodes(self.names, self.codes[picked])

    @cached_property
    def index(self) -> dict[str, int]:
        """``name -> code``, built on first use (``list.index`` per name would make a loop
        over a meta-batch's shards quadratic in their number)."""
        return {name: code for code, name in enumerate(self.names)}

    def mask(self, name: str) -> np.ndarray:
        """Which samples belong to shard ``name``."""
        code = self.index.get(name)
        if code is None:
            return np.zeros(len(self.codes), dtype=bool)
        return np.asarray(self.codes == code)

    @classmethod
    def concat(cls, parts: Sequence[ShardCodes]) -> ShardCodes:
        """One encoding of several batches' shards, in order."""
        index: dict[str, int] = {}
        codes = [
            np.asarray([index.setdefault(n, len(index)) for n in part.names], np.int64)[part.codes]
            for part in parts
        ]
        joined = np.concatenate(codes) if codes else np.zeros(0, np.int64)
        return cls(list(index), joined)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> str:
        return str(self.names[self.codes[i]])


MAX_ORDINAL = 2**31  # per-shard ordinals: positions in a shard


class ScoreStore:
    """Score, last loss, visit count and last step of every sample held, by shard.

    Shards are addressed through small integer ids: ``_sid`` maps a shard name to its id,
    and the arrays ``_off``/``_cap``/``_len`` hold each id's block offset, capacity and
    length (1 + highest ordinal seen), so that a meta-batch spanning thousands of shards is
    located with array operations (one C-level dict pass over its distinct shard names, no
    Python loop per shard). Ids of dropped shards are left dead until the next compaction.

    The arena ``_rows`` is one array of :data:`ROW` records, not one array per column: a
    meta-batch is read with one gather (:meth:`rows`) and written with one scatter
    (:meth:`scatter`), and a sample costs one cache line however large the store.

    Why over 250 lines: the shard addressing (locate, register, grow: about 100 lines)
    and the arena it addresses are one data structure; split, every gather and scatter
    would cross the two.
    """

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._rows = np.zeros(0, ROW)  # the arena: one 16-byte row per sample slot
        self._sid: dict[str, int] = {}  # shard -> id (insertion order: the shards' order)
        self._off = np.zeros(16, np.int64)  # id -> block offset in the arena
        self._cap = np.zeros(16, np.int64)  # id -> block capacity
        self._len = np.zeros(16, np.int64)  # id -> 1 + highest ordinal seen (0: dead id)
        self._ids = 0  # ids handed out
        self._keys: dict[str, dict[str, int]] = {}  # ordinal-less shards: key -> ordinal
        self._end = 0  # arena high-water mark

    # ------------------------------------------------------------------ addressing

    def locate(
        self,
        shards: Sequence[str] | ShardCodes,
        keys: Sequence[str] | None = None,
        ordinals: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Arena slots of the given samples, registering unseen ones (visits 0).

        Give ``ordinals`` (fast path, what es_pipe's sources provide) or ``keys``.
        """
        encoded = shards if isinstance(shards, ShardCodes) else ShardCodes.encode(shards)
        names, codes = encoded.names, encoded.codes
        if ordinals is None:
            if keys is None:
                raise ConfigError("locate() needs the samples' keys or their ordinals")
            ordinals = self._ordinals_from_keys(encoded, keys)
        ordinals = np.asarray(ordinals, dtype=np.int64)
        # one pass for both bounds: negative ordinals are huge as unsigned
        if ordinals.size and (ordinals.view(np.uint64) >= MAX_ORDINAL).any():
            if ordinals.min() < 0:
                raise ConfigError("sample ordinals ('__index__') must be >= 0")
            raise ConfigError(
                f"sample ordinal {int(ordinals.max())} is too large: '__index__' is the sample's "
                f"position in its shard (< {MAX_ORDINAL}), and scores are held densely per "
                "shard up to the highest ordinal; split the shard or number its samples 0..n-1"
            )
        sids = self._ids_of(names)
        lengths = self._len[sids]  # -1 (not held) reads the last id, never live: 0
        if (ordinals >= lengths[codes]).any():  # new samples: grow blocks, extend lengths
            highest = np.full(len(names), -1, dtype=np.int64)
            np.maximum.at(highest, codes, ordinals)
            grow = np.flatnonzero(highest >= lengths)
            for j in grow[sids[grow] < 0].tolist():  # shards never seen: once per shard
                sids[j] = self._register(names[j])
            rows = highest[grow] + 1
            ids = sids[grow]
            for sid, n in zip(  # blocks out of capacity: rare (capacity doubles)
                ids[rows > self._cap[ids]].tolist(), rows[rows > self._cap[ids]].tolist()
            ):
                self._grow_block(sid, n)
            self._len[ids] = np.maximum(self._len[ids], rows)
        return np.asarray(self._off[sids][codes] + ordinals)

    def _ids_of(self, names: Sequence[str]) -> np.ndarray:
        """Shard ids of ``names`` (-1 for shards not held): one C-level lookup of all the
        names (``itemgetter``) when all are held, the usual case after their first batch."""
        if len(names) > 1:
            try:
                return np.fromiter(itemgetter(*names)(self._sid), np.int64, len(names))
            except KeyError:  # a new shard among them
                pass
        return np.fromiter(map(self._sid.get, names, repeat(-1)), np.int64, len(names))

    def _ordinals_from_keys(self, shards: ShardCodes, keys: Sequence[str]) -> np.ndarray:
        tables = [self._keys.setdefault(name, {}) for name in shards.names]
        out = np.empty(len(keys), dtype=np.int64)
        for i, (code, key) in enumerate(zip(shards.codes.tolist(), keys)):
            table = tables[code]
            out[i] = table.setdefault(key, len(table))
        return out

    def _register(self, shard: str) -> int:
        """A new shard: an id, with an empty block at the end of the arena."""
        sid = self._ids
        if sid + 1 == len(self._off):  # the last id stays unused (see locate)
            for name in ("_off", "_cap", "_len"):
                old = getattr(self, name)
                grown = np.zeros(2 * len(old), np.int64)
                grown[: len(old)] = old
                setattr(self, name, grown)
        self._ids = sid + 1
        self._sid[shard] = sid
        self._off[sid], self._cap[sid], self._len[sid] = self._end, 0, 0
        return sid

    def _ensure(self, shard: str, rows: int) -> int:
        """Offset of ``shard``'s block, grown to hold ``rows`` samples."""
        sid = self._sid.get(shard)
        if sid is None:
            sid = self._register(shard)
        if rows > self._cap[sid]:
            self._grow_block(sid, rows)
        return int(self._off[sid])

    def _grow_block(self, sid: int, rows: int) -> None:
        offset, capacity = int(self._off[sid]), int(self._cap[sid])
        new_capacity = max(rows, 2 * capacity, 16)
        if offset + capacity == self._end:  # last block: grow in place
            self._grow_arena(offset + new_capacity)
        else:  # move the block to the end of the arena
            new_offset = self._end
            self._grow_arena(new_offset + new_capacity)
            arena = self._rows
            arena[new_offset : new_offset + capacity] = arena[offset : offset + capacity]
            arena[offset : offset + capacity] = np.zeros(1, ROW)
            offset = new_offset
        self._end = offset + new_capacity
        self._off[sid], self._cap[sid] = offset, new_capacity

    def _grow_arena(self, size: int) -> None:
        current = len(self._rows)
        if size <= current:
            return
        grown = np.zeros(max(size, 2 * current), ROW)
        grown[:current] = self._rows
        self._rows = grown

    def reserve(self, shard: str, rows: int) -> None:
        """Pre-size ``shard``'s block when its row count is known (no regrowth later)."""
        self._ensure(shard, rows)

    # ------------------------------------------------------------------ values

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """A copy of the :data:`ROW` records at ``slots``: one gather for all columns."""
        return np.asarray(self._rows[slots])

    def gather(
        self, slots: np.ndarray, columns: Sequence[str] = tuple(COLUMNS)
    ) -> dict[str, np.ndarray]:
        """Copies of ``columns`` (default: all) at ``slots`` (from one gather of rows)."""
        rows = self._rows[slots]
        return {name: rows[name] for name in columns}

    def scatter(
        self,
        slots: np.ndarray,
        score: np.ndarray,
        loss: np.ndarray,
        step: int,
        visits: np.ndarray | None = None,
    ) -> None:
        """Record new scores and losses of the samples at ``slots`` seen at ``step``.

        ``visits``: the visit counts at ``slots`` read before (by :meth:`rows`), which
        saves reading them again. One scatter of whole rows; a sample present twice in
        ``slots`` takes its last score and loss and one visit per occurrence. Duplicates
        are found without a sort: each slot's visits field first receives its position,
        and a position that does not read back is a duplicate (the rows are in cache)."""
        slots = np.asarray(slots, np.int64)
        n = len(slots)
        column = self._rows["visits"]
        if visits is None:
            visits = column[slots]
        new = np.empty(n, ROW)
        new["score"], new["loss"], new["step"] = score, loss, step
        marks = np.arange(n, dtype=np.uint32)
        column[slots] = marks
        repeated = bool((column[slots] != marks).any())
        new["visits"] = visits if repeated else visits + np.uint32(1)
        self._rows[slots] = new
        if repeated:  # a sample twice in one meta-batch: one visit per occurrence
            np.add.at(column, slots, np.uint32(1))

    def shard(self, name: str) -> dict[str, np.ndarray]:
        """Read-only views of one shard's columns, indexed by ordinal."""
        sid = self._sid[name]
        offset = int(self._off[sid])
        block = self._rows[offset : offset + int(self._len[sid])]
        views = {column: block[column] for column in COLUMNS}
        for view in views.values():
            view.flags.writeable = False
        return views

    def keys_of(self, name: str) -> list[str] | None:
        """Keys in ordinal order of a shard whose samples came without ordinals."""
        table = self._keys.get(name)
        return None if table is None else list(table)

    def load_shard(self, name: str, columns: dict[str, np.ndarray]) -> None:
        """Replace one shard's state (e.g. from a committed manifest)."""
        rows = len(columns["score"])
        offset = self._ensure(name, rows)
        block = self._rows[offset : offset + rows]
        for column, dtype in COLUMNS.items():
            block[column] = np.asarray(columns[column], dtype)
        sid = self._sid[name]
        self._len[sid] = max(int(self._len[sid]), rows)

    def drop(self, name: str) -> None:
        """Forget a shard this rank no longer reads (its block is reused after compaction)."""
        sid = self._sid.pop(name, None)
        if sid is not None:  # a dead id: no length, no capacity (compaction drops it)
            self._len[sid] = self._cap[sid] = 0
        self._keys.pop(name, None)
        if self.held * 2 < self._end:
            self.compact()

    def compact(self) -> None:
        """Repack the held shards end to end, in their order, with no spare capacity (16
        bytes per sample held): one gather of the held rows. The arena grows by doubling;
        the sampler compacts at every epoch end. Nothing to do when already packed."""
        if len(self._rows) == self.held and self._ids == len(self._sid):
            return  # no spare capacity and no dead ids: the blocks tile the arena
        names = list(self._sid)
        sids = np.fromiter(self._sid.values(), np.int64, len(names))
        lengths = self._len[sids]
        starts = np.cumsum(lengths) - lengths
        total = int(lengths.sum())
        index = np.repeat(self._off[sids] - starts, lengths) + np.arange(total)
        n = max(16, len(names) + 1)  # the last id stays unused
        off, cap, held = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
        off[: len(names)], cap[: len(names)], held[: len(names)] = starts, lengths, lengths
        self._rows = self._rows[index]
        self._sid = {name: sid for sid, name in enumerate(names)}  # ids renumbered densely
        self._off, self._cap, self._len, self._ids = off, cap, held, len(names)
        self._end = total

    # ------------------------------------------------------------------ inspection

    @property
    def shards(self) -> list[str]:
        return list(self._sid)

    @property
    def held(self) -> int:
        """Samples held (sum of the shards' lengths; dead ids have none)."""
        return int(self._len[: self._ids].sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the arena (its rows, spare capacity included)."""
        return int(self._rows.nbytes)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Every held shard's columns as tensors: safe for ``torch.load(weights_only=True)``."""
        shards = self.shards
        sids = np.fromiter(self._sid.values(), np.int64, len(shards))
        lengths = self._len[sids]
        starts = np.cumsum(lengths) - lengths
        index = np.repeat(self._off[sids] - starts, lengths) + np.arange(int(lengths.sum()))
        rows = self._rows[index]  # the held rows, shard after shard

        def cat(column: str) -> torch.Tensor:
            joined = rows[column]
            return torch.from_numpy(
                joined.astype(np.int64) if joined.dtype.kind in "iu" else joined.copy()
            )

        return {
            "shards": shards,
            "lengths": lengths.tolist(),
            "keys": {name: list(table) for name, table in self._keys.items()},
            **{column: cat(column) for column in COLUMNS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly what ``state_dict`` returned, replacing everything held. A
        damaged table raises ``ConfigError`` and changes nothing."""
        check_table(state)
        self._clear()
        cursor = 0
        for name, rows in zip(state["shards"], state["lengths"]):
            self.load_shard(
                name,
                {c: state[c][cursor : cursor + rows].numpy() for c in COLUMNS},
            )
            cursor += rows
        self._keys = {
            name: {k: i for i, k in enumerate(keys)} for name, keys in state["keys"].items()
        }


def damaged(
    what: str, where: str = "the score table (sampler.state_dict()['scores'])"
) -> ConfigError:
    """The error for a score table (or the sampler state holding it) that cannot load."""
    return ConfigError(
        f"{where} is damaged: {what}. Restore another checkpoint, or resume from the "
        "committed manifests (manifests=) without loading a score table"
    )


def check_table(table: Any) -> None:
    """Raise ``ConfigError`` unless ``table`` is a score table ``ScoreStore.load_state_dict``
    can load: shard names and lengths, a key book, and finite columns of matching size."""
    if not isinstance(table, Mapping):
        raise damaged(f"it is a {type(table).__name__}, not a dict")
    missing = [k for k in ("shards", "lengths", "keys", *COLUMNS) if k not in table]
    if missing:
        raise damaged(f"it lacks the entries {missing}")
    shards, lengths, keys = table["shards"], table["lengths"], table["keys"]
    if not isinstance(shards, (list, tuple)) or not all(isinstance(n, str) for n in shards):
        raise damaged("'shards' is not a list of shard names")
    if len(set(shards)) != len(shards):
        raise damaged("a shard is listed twice")
    if (
        not isinstance(lengths, (list, tuple))
        or len(lengths) != len(shards)
        or not all(is_count(n) for n in lengths)
    ):
        raise damaged("'lengths' is not one non-negative int per shard")
    if not isinstance(keys, Mapping) or not all(
        isinstance(name, str)
        and isinstance(book, (list, tuple))
        and all(isinstance(k, str) for k in book)
        and len(set(book)) == len(book)
        for name, book in keys.items()
    ):
        raise damaged("'keys' is not a map from shard names to lists of unique keys")
    rows = sum(lengths)
    for column, (low, high, floating) in _RANGES.items():
        values = table[column]
        if not isinstance(values, Tensor) or values.dim() != 1 or values.numel() != rows:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise damaged(f"column {column!r} is {shape}, not a 1-D tensor of {rows} values")
        if values.is_floating_point() != floating or values.is_complex():
            raise damaged(f"column {column!r} has dtype {values.dtype}")
        if floating:
            bad = int((~torch.isfinite(values) | (values.abs() > high)).sum())
            if bad:
                raise damaged(f"{bad} values of {column!r} are NaN, infinite or too large")
        elif rows and not (low <= int(values.min()) and int(values.max()) < high):
            raise damaged(
                f"column {column!r} holds values outside [{low}, {high}) "
                f"(from {int(values.min())} to {int(values.max())})"
            )


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_F32 = float(torch.finfo(torch.float32).max)
_RANGES = {  # column -> (low, high, floating); the store keeps float32, uint32, int32
    "score": (-_F32, _F32, True),
    "loss": (-_F32, _F32, True),
    "visits": (0, 2**32, False),
    "step": (0, 2**31, False),
}
