"""Sample identity: who a buffered sample is, and the checks that identities cannot collide.

A sample's identity is ``(shard, key)``: scores, pruning decisions and manifests follow it
across epochs. Two different samples with one identity would share one score silently
(webdataset's keys restart in every shard; a shard left out makes every shard ``""``), so
the stage checks, for every upstream:

* **inside a meta-batch** a duplicate identity is an error (:class:`ConfigError`) that
  names both occurrences: one meta-batch cannot hold one sample twice;
* **within an epoch** a sample seen again is counted (:class:`EpochRepeats`) and warned
  once, at the end of the epoch, with the count and the first example. A warning, not an
  error: some pipelines repeat samples on purpose (``wds.ResampledShards`` draws shards
  with replacement, ``equalize="pad"`` re-reads a short stream's own shards).

Where the shard comes from: ``__shard__``, else webdataset's ``__url__``, else ``""``.
Both checks are vectorised (numpy/pyarrow over the meta-batch); the only per-sample Python
is reading the identity fields out of the sample dicts, which the stage must do anyway.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter, methodcaller
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from es_pipe.batch import take_list
from es_pipe.columns import RowKeys
from es_pipe.errors import ConfigError
from es_pipe.sampler import Identity
from es_pipe.scores import ShardCodes

if TYPE_CHECKING:
    from es_pipe.columns import ColumnChunk

_MAX_ORDINAL = 2**31
_KEY = itemgetter("__key__")
_GETTERS = {
    name: (itemgetter(name), methodcaller("get", name)) for name in ("__shard__", "__index__")
}
_NO_KEY = (
    "every sample must be a dict with a stable '__key__' (and ideally '__shard__' and "
    "'__index__') so that scores follow samples across epochs; es_pipe's sources add them, "
    "webdataset adds '__key__' and '__url__', or add them in your map step"
)


def _batched(value: Any) -> int | None:
    """The batch length of an identity field that holds a whole batch, else ``None``."""
    if isinstance(value, list):
        return len(value)
    ndim = getattr(value, "ndim", None)
    if isinstance(ndim, int) and ndim >= 1 and hasattr(value, "__len__"):
        return len(value)
    return None


def _refuse_batched(sample: dict[str, Any]) -> None:
    for field in ("__key__", "__shard__", "__url__", "__index__"):
        n = _batched(sample.get(field))
        if n is not None:
            raise ConfigError(
                f"the samples arrive already batched: '{field}' holds {n} values "
                f"({type(sample[field]).__name__}), one per sample of a batch. The upstream "
                "batches (a DataLoader with batch_size=N, webdataset's .batched()); the stage "
                "must get single samples, since it builds the meta-batches itself: use "
                "DataLoader(..., batch_size=None) (or drop .batched()) and set the batch "
                "sizes on the sampler (meta_batch_size, batch_size)"
            )


def _field(samples: list[Any], name: str) -> list[Any]:
    """Every sample's ``name`` field, ``None`` where a sample has none (C-level getters:
    ``itemgetter`` first, the slower ``dict.get`` only where a sample lacks the field)."""
    strict, lenient = _GETTERS[name]
    try:
        return list(map(strict, samples))
    except KeyError:
        return list(map(lenient, samples))


def identify(samples: list[Any]) -> Identity:
    """The identities of buffered samples: the shard (``__shard__``, else webdataset's
    ``__url__``, else ``""``), ``__key__`` and, when every sample has one, ``__index__``
    (the ordinal in the shard)."""
    try:
        keys = list(map(_KEY, samples))  # map with C-level getters: no Python frame per sample
        named = _field(samples, "__shard__")
        ordinals = _field(samples, "__index__")
    except (KeyError, TypeError, IndexError, AttributeError):
        raise ConfigError(_NO_KEY) from None
    codes = _shard_codes(named)
    field: str | None = "__shard__"  # every sample's shard is its own non-empty __shard__
    if codes is None or "" in codes.names:
        field = None
        shards = [sample.get("__shard__") or sample.get("__url__", "") for sample in samples]
        codes = _shard_codes(shards)
    if None in keys or codes is None:
        for sample in samples:
            _refuse_batched(sample)
        raise ConfigError(
            "a sample has '__key__' None or a '__shard__' (or webdataset '__url__') that is "
            "not a str: give every sample a stable, non-None '__key__' and the shard's name "
            "as '__shard__'"
        )
    try:
        array = np.asarray(ordinals)
    except ValueError:  # ragged sequences
        array = np.asarray(ordinals, dtype=object)
    if array.dtype == object and None in ordinals:  # a sample without '__index__'
        if samples:
            _refuse_batched(samples[0])
        return ArrayIdentity(codes, keys, None, field)
    if array.ndim != 1:
        _refuse_batched(samples[0])
    if (
        array.ndim != 1
        or array.dtype.kind not in "iu"
        or (array.size and not 0 <= array.min() <= array.max() < _MAX_ORDINAL)
    ):
        raise ConfigError(
            "'__index__' must be the sample's position in its shard: an int in [0, 2**31), "
            f"got {ordinals[:3]}"
        )
    return ArrayIdentity(codes, keys, array.astype(np.int64, copy=False), field)


def _shard_codes(shards: list[Any]) -> ShardCodes | None:
    """The shard names encoded in one Arrow pass (names in order of first appearance, as
    ``ShardCodes.encode``); ``None`` when one is not a str."""
    if not shards:
        return ShardCodes([], np.zeros(0, np.int64))
    try:
        array = pa.array(shards)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    if array.type != pa.string() or array.null_count:
        return None
    encoded = array.dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return ShardCodes(encoded.dictionary.to_pylist(), codes)


def key_codes(keys: Sequence[Any]) -> np.ndarray:
    """Dense int codes of ``keys``, equal exactly where the keys are equal (one Arrow
    dictionary encoding; keys of mixed types compare as their ``repr``)."""
    try:
        encoded = pc.dictionary_encode(pa.array(keys))
    except (pa.ArrowException, TypeError, ValueError):  # mixed or unhashable types
        encoded = pc.dictionary_encode(pa.array([repr(key) for key in keys], pa.string()))
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _ids(who: Identity) -> np.ndarray:
    """One int64 per sample, equal exactly where the identities are equal: (shard code,
    ordinal) where the samples carry ordinals, else (shard code, key code)."""
    codes = who.shards.codes
    second = who.ordinals if who.ordinals is not None else key_codes(who.keys)
    return (codes.astype(np.int64) << 32) | np.asarray(second, np.int64)


def check_unique(who: Identity) -> None:
    """Raise :class:`ConfigError` naming both occurrences when one identity appears twice
    in a meta-batch."""
    n = len(who.shards)
    if n < 2:
        return
    if who.ordinals is None:
        try:  # fast path: keys unique in the meta-batch, whatever their shards
            if len(set(who.keys)) == n:
                return
        except TypeError:  # unhashable keys: compared as text below
            pass
    ids = _ids(who)
    ordered = np.sort(ids)
    if not (ordered[1:] == ordered[:-1]).any():
        return
    order = np.argsort(ids, kind="stable")  # the error path: find the two samples
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    first, second = sorted((int(order[same[0]]), int(order[same[0] + 1])))
    shard = who.shards[first]
    what = (
        f"ordinal ('__index__') {int(who.ordinals[first])}"
        if who.ordinals is not None
        else f"key {who.keys[first]!r}"
    )
    raise ConfigError(
        f"samples {first} and {second} of this meta-batch of {n} have the same identity: "
        f"shard {shard!r}, {what} (keys {who.keys[first]!r} and {who.keys[second]!r}); "
        f"{len(same)} duplicate(s) in all. Two samples with one identity would share one "
        "score. Name the shard of every sample ('__shard__'; webdataset's '__url__' is taken "
        "when '__shard__' is absent) and give keys unique within their shard; README: "
        "'Sample identity'"
    )


class EpochRepeats:
    """Counts the samples the stage sees again within one epoch (same shard and ordinal,
    or same shard and key where samples carry no ordinal).

    Memory: one byte per ordinal of each shard read this epoch (ordinals), or one set
    entry per sample (keys only, one set per shard); cleared at every epoch start.
    Vectorised per meta-batch: a loop over the shards present, none over samples."""

    def __init__(self) -> None:
        self.count = 0
        self.example: tuple[str, Any] | None = None
        self._bitmaps: dict[str, np.ndarray] = {}
        self._keys: dict[str, set[Any]] = {}

    def clear(self) -> None:
        self.count = 0
        self.example = None
        self._bitmaps = {}
        self._keys = {}

    def add(self, who: Identity) -> None:
        """Record one meta-batch's samples (unique among themselves)."""
        if not len(who.shards):
            return
        if who.ordinals is None:
            self._add_keys(who)
            return
        names, codes, ordinals = who.shards.names, who.shards.codes, who.ordinals
        for code, name in enumerate(names):
            mask = codes == code
            mine = ordinals[mask]
            seen = self._bitmaps.get(name)
            top = int(mine.max()) + 1
            if seen is None or len(seen) < top:
                grown = np.zeros(max(top, 2 * (0 if seen is None else len(seen)), 64), bool)
                if seen is not None:
                    grown[: len(seen)] = seen
                seen = self._bitmaps[name] = grown
            again = seen[mine]
            if again.any():
                self.count += int(again.sum())
                if self.example is None:
                    self.example = (name, who.keys[int(np.flatnonzero(mask)[again.argmax()])])
            seen[mine] = True

    def _add_keys(self, who: Identity) -> None:
        keys: Sequence[Any] = who.keys
        codes = who.shards.codes
        for code, name in enumerate(who.shards.names):
            mine = keys
            if len(who.shards.names) > 1:  # C-level gather of this shard's keys
                picked = np.flatnonzero(codes == code).tolist()
                mine = [keys[picked[0]]] if len(picked) == 1 else itemgetter(*picked)(keys)
            seen = self._keys.setdefault(name, set())
            try:
                fresh = seen.isdisjoint(mine)
            except TypeError:  # unhashable keys (the meta-batch check compared them as text)
                mine = [repr(key) for key in mine]
                fresh = seen.isdisjoint(mine)
            if not fresh and self.example is None:  # once per epoch: find one repeat
                self.example = (name, next(key for key in mine if key in seen))
            before = len(seen)
            seen.update(mine)
            self.count += len(mine) - (len(seen) - before)

    def message(self, epoch: int) -> str:
        shard, key = self.example if self.example is not None else ("?", "?")
        return (
            f"epoch {epoch}: {self.count} sample(s) came to the stage a second time within "
            f"the epoch (e.g. key {key!r} of shard {shard!r}): they share one score with "
            "their first occurrence. Expected with sampling with replacement "
            "(wds.ResampledShards); otherwise two samples have one identity: name the shard "
            "of every sample ('__shard__', or webdataset's '__url__') and give keys unique "
            "within their shard (README: 'Sample identity')"
        )


@dataclass(frozen=True)
class ArrayIdentity(Identity):
    """An :class:`Identity` whose keys are an object array of str (the columnar path):
    ``take`` and ``concat`` are array operations, with no per-sample Python.

    ``shard_field`` is ``"__shard__"`` where every sample's shard is its own non-empty
    ``__shard__`` field (the dict path then gives the collated ``__shard__`` from the
    shard codes, not by collating the field again), else ``None``."""

    shard_field: str | None = None

    def take(self, picked: np.ndarray) -> Identity:
        ordinals = None if self.ordinals is None else self.ordinals[picked]
        keys = self.keys
        chosen = (
            keys[picked] if isinstance(keys, (np.ndarray, RowKeys)) else take_list(keys, picked)
        )
        return ArrayIdentity(self.shards.take(picked), chosen, ordinals, self.shard_field)

    def shard_names(self) -> list[str]:
        """Every sample's shard name, in order (one numpy ``take`` of the names)."""
        names = np.empty(len(self.shards.names), dtype=object)
        names[:] = self.shards.names
        return names[self.shards.codes].tolist()

    @classmethod
    def concat(cls, parts: Sequence[Identity]) -> Identity:
        if len(parts) == 1:
            return parts[0]
        ordinals = [part.ordinals for part in parts if part.ordinals is not None]
        keys: list[Any] = []
        for part in parts:
            keys += list(part.keys)
        fields = {getattr(part, "shard_field", None) for part in parts}
        return cls(
            ShardCodes.concat([part.shards for part in parts]),
            keys,
            np.concatenate(ordinals) if len(ordinals) == len(parts) else None,
            fields.pop() if len(fields) == 1 else None,
        )

    @classmethod
    def of_chunks(cls, chunks: Sequence[ColumnChunk]) -> ArrayIdentity:
        """The identity of the rows of ``chunks``, in order: one shard code per chunk
        (repeated over its rows), the ordinals and the keys concatenated."""
        index: dict[str, int] = {}
        codes = np.fromiter(
            (index.setdefault(chunk.shard, len(index)) for chunk in chunks), np.int64, len(chunks)
        )
        sizes = np.fromiter((len(chunk) for chunk in chunks), np.int64, len(chunks))
        ordinals = (
            np.concatenate([chunk.ordinals for chunk in chunks]).astype(np.int64, copy=False)
            if chunks
            else np.zeros(0, np.int64)
        )
        keys: Any  # a sequence of str: row numbers made when read, or an object array
        if chunks and all(chunk.keys is None for chunk in chunks):
            keys = RowKeys(ordinals)  # row numbers: made only where read
        else:
            keys = np.concatenate([chunk.key_array() for chunk in chunks] or [np.zeros(0, object)])
        return cls(ShardCodes(list(index), np.repeat(codes, sizes)), keys, ordinals)

    @staticmethod
    def unique_by_ranges(chunks: Sequence[ColumnChunk]) -> bool:
        """True where the chunks' rows are shown unique without a sort: each chunk's
        ordinals strictly increase (rows read in order), and chunks of one shard cover
        ranges of ordinals that do not overlap. False means: not shown, check the full way
        (:func:`check_unique`); shuffled rows always take it."""
        spans: dict[str, list[tuple[int, int]]] = {}
        for chunk in chunks:
            o = chunk.ordinals
            if len(o) > 1 and not (o[1:] > o[:-1]).all():
                return False
            if len(o):
                spans.setdefault(chunk.shard, []).append((int(o[0]), int(o[-1])))
        for ranges in spans.values():
            ranges.sort()
            if any(a[1] >= b[0] for a, b in itertools.pairwise(ranges)):
                return False
        return True
