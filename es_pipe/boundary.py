"""What happens at epoch boundaries: pruning decisions (ESWP) and shard manifests.

The sampler owns one :class:`EpochBoundary` when it is given ``prune=`` or
``manifests=``. It

* restores a shard's scores and pruning decision from the newest committed manifest the
  first time the shard shows up (a ``pruned`` hook call by a source, or a meta-batch),
  checking the shard's fingerprint and its samples' keys;
* answers the sources' hook: which ordinals of a shard to skip in an epoch;
* at the end of an epoch, decides the next epoch's pruning for every shard read, writes
  their manifests and commits the epoch (rank 0);
* gives the 1/keep loss weights of the kept low-score samples.

The math is in :mod:`es_pipe.pruning`, the files in :mod:`es_pipe.manifest`.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from es_pipe import pruning
from es_pipe.errors import ConfigError, ManifestError
from es_pipe.manifests import Manifests, fingerprint, fingerprints_match
from es_pipe.pruning import Decision, Pruning
from es_pipe.scores import ScoreStore, ShardCodes

OnMismatch = Literal["raise", "fresh"]
log = logging.getLogger(__name__)


class EpochBoundary:
    """Per-shard pruning state, key book and manifest I/O of one sampler (one rank)."""

    def __init__(
        self,
        store: ScoreStore,
        *,
        prune: Pruning | None,
        manifests: Manifests | None,
        seed: int,
        hyper: Mapping[str, Any],
        total_epochs: float | None,
        world_size: int,
        on_mismatch: OnMismatch = "raise",
        commit_timeout: float = 300.0,
        fingerprint_fn: Callable[[str], dict[str, Any] | None] = fingerprint,
    ) -> None:
        if on_mismatch not in ("raise", "fresh"):
            raise ConfigError(f"on_mismatch={on_mismatch!r}: use 'raise' or 'fresh'")
        if prune is not None and not isinstance(prune, Pruning):
            raise ConfigError(
                f"prune={prune!r}: give es_pipe.Pruning(ratio=0.3, anneal=0.125) or "
                "es_pipe.InfoBatch()"
            )
        if prune is not None and prune.needs_total_epochs() and total_epochs is None:
            raise prune.total_epochs_missing()
        self.store = store
        self.prune = prune
        self.manifests = manifests
        self.seed = seed
        self.hyper = dict(hyper)
        self.total_epochs = total_epochs
        self.world_size = world_size
        self.on_mismatch = on_mismatch
        self.commit_timeout = commit_timeout
        self.fingerprint_fn = fingerprint_fn
        self._fingerprints: dict[str, dict[str, Any] | None] = {}
        # the epoch the decisions apply to (the one being read), also as a tensor that
        # share_epoch() moves to shared memory for DataLoader workers' hooks (prune_hook)
        self.epoch_cell = torch.zeros(1, dtype=torch.int64)
        self.epoch = 0
        self.decisions: dict[str, Decision] = {}
        self.keys: dict[str, pa.Array] = {}  # key by ordinal, from the last write/restore
        self._chunks: list[tuple[ShardCodes, np.ndarray, pa.Array]] = []
        self._touched: set[str] = set()
        self._checked: set[str] = set()  # shards compared with the manifests this epoch
        self._committed: list[int] | None = None  # committed epochs, listed once per epoch
        self._verify: set[str] = set()  # restored shards whose keys are checked
        self._origin: dict[str, str] = {}  # shard -> manifest file it was restored from
        self._written: dict[str, int] = {}  # shard -> last epoch this rank wrote it
        self._inherited: set[str] = set()  # held from a merged checkpoint, see rewind
        self._read: set[str] | None = None  # shards read this epoch, from a checkpoint
        self.stats = {"restored": 0, "written": 0, "fresh": 0}
        self.run: dict[str, Any] | None = None  # run identity recorded in each commit
        # resumed from the manifests: until a shard seen is found in them, count the
        # unknown ones; too many means the data moved or is another run's (see _restore)
        self.expect_known = False
        self._unknown: list[str] = []

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)
        self.epoch_cell[0] = self._epoch

    def share_epoch(self) -> None:
        """Put the epoch in shared memory (in place), before DataLoader workers start: their
        copies of the ``pruned=`` hook then see every later epoch."""
        if not self.epoch_cell.is_shared():
            self.epoch_cell.share_memory_()

    # ------------------------------------------------------------------ restore

    def _restore(self, shard: str) -> None:
        """Load ``shard`` from the newest committed manifest that has it, if newer than what
        this rank holds."""
        self._checked.add(shard)
        if self.manifests is None:
            return
        epoch = self.manifests.find(shard, before=self.epoch, epochs=self._committed_epochs())
        if self.expect_known:
            anywhere = self.manifests.find(shard, epochs=self._committed_epochs())
            self._expect_known(shard, epoch is not None or anywhere is not None)
        if epoch is None or self._written.get(shard, -1) >= epoch:
            return
        # held from a checkpoint (state_dict): its scores are authoritative, but this
        # epoch's pruning decision lives only in the manifest of the epoch before
        held = shard in self.store.shards and shard not in self._written
        if held and epoch + 1 != self.epoch:
            return
        manifest = self.manifests.read_shard(shard, epoch)
        stored = manifest.meta.get("fingerprint")
        current = self._fingerprint(shard)
        if not fingerprints_match(stored, current):
            message = (
                f"manifest {manifest.path} was written for shard {shard!r} with fingerprint "
                f"{stored}, but the shard now has {current}: the shard changed since, and "
                "its scores would belong to other samples"
            )
            if self.on_mismatch == "raise":
                raise ManifestError(
                    message + ". Restore the original shard, start with a fresh manifests= "
                    "folder, or pass on_mismatch='fresh' to start this shard from scratch"
                )
            warnings.warn(
                message + "; starting this shard fresh (on_mismatch='fresh')", stacklevel=3
            )
            self.stats["fresh"] += 1
            if shard in self.store.shards:
                self.store.drop(shard)
            self.decisions.pop(shard, None)
            self.keys.pop(shard, None)
            return
        columns = manifest.columns
        if not held:
            self.store.load_shard(shard, columns)
            self.keys[shard] = manifest.keys
            self._verify.add(shard)
            self._origin[shard] = manifest.path
            self.stats["restored"] += 1
            log.debug("restored the scores of shard %s from %s", shard, manifest.path)
        if epoch + 1 == self.epoch:
            state = columns["streak"].astype(np.uint8)
            state[columns["weight"] != 1.0] |= pruning.UPWEIGHT
            self.decisions[shard] = pruning.from_state(state, manifest.meta.get("factor", 1.0))
        else:
            self.decisions.pop(shard, None)

    def _expect_known(self, shard: str, known: bool) -> None:
        """After resuming from the manifests, the first shards seen must be in them: a run
        whose first ``min(4, shards committed)`` shards are all unknown reads other data
        (moved to new URLs, or another run's folder), and would restore nothing while
        continuing at the committed epoch and step."""
        manifests = self.manifests
        if known or manifests is None:
            self.expect_known = False
            return
        self._unknown.append(shard)
        epochs = self._committed_epochs()
        committed = len(manifests.marker(epochs[-1])["files"]) if epochs else 0
        if len(self._unknown) < max(1, min(4, committed)):
            return
        example = next(iter(manifests.shards(epochs[-1])), None) if epochs else None
        raise ManifestError(
            f"resumed at epoch {self.epoch} from {manifests.url}, but none of the first "
            f"{len(self._unknown)} shards read ({', '.join(self._unknown[:2])}, ...) is in its "
            f"committed manifests (which name shards like {example!r}): the data moved, or "
            "the folder is another run's. If the data moved, map the old URLs: "
            "manifests=es_pipe.Manifests(url, relocate={'old_prefix': 'new_prefix'}); "
            "otherwise start over with resume=False or a new manifests= folder, or pass "
            "resume='force' to continue anyway"
        )

    def _committed_epochs(self) -> list[int]:
        """The committed epochs, listed once per epoch, not once per shard."""
        if self._committed is None:
            self._committed = (
                [] if self.manifests is None else self.manifests.committed(refresh=False)
            )
        return self._committed

    def _fingerprint(self, shard: str) -> dict[str, Any] | None:
        """The shard's fingerprint, looked up once per run: shards are immutable, and an
        object store charges a request per lookup."""
        if shard not in self._fingerprints:
            self._fingerprints[shard] = self.fingerprint_fn(shard)
        return self._fingerprints[shard]

    def _see(self, shard: str) -> None:
        if shard not in self._checked:
            self._restore(shard)

    # ------------------------------------------------------------------ hooks

    def pruned(self, shard: str, epoch: int | None = None) -> np.ndarray | None:
        """Sorted int64 ordinals of ``shard`` to skip in ``epoch`` (default: the current)."""
        if epoch is None or epoch == self.epoch:
            self._see(shard)
            decision = self.decisions.get(shard)
            return None if decision is None or not len(decision.pruned) else decision.pruned
        if self.manifests is None or epoch < 1 or epoch - 1 not in self._committed_epochs():
            return None
        entry = self.manifests.shards(epoch - 1).get(shard)
        if entry is None:
            return None
        manifest = self.manifests.read_shard(shard, epoch - 1)
        ordinals = np.flatnonzero(manifest.columns["pruned"]).astype(np.int64)
        return ordinals if len(ordinals) else None

    def pruned_count(self, shard: str, epoch: int) -> int:
        """How many samples of ``shard`` ``epoch`` skips, the same answer on every rank and
        without loading the shard's scores: from the commit marker of ``epoch - 1`` (which
        every rank waited for), else from the decisions this rank holds."""
        if self.prune is None:
            return 0
        if self.manifests is None or epoch < 1 or epoch - 1 not in self._committed_epochs():
            decision = self.decisions.get(shard) if epoch == self.epoch else None
            return 0 if decision is None else len(decision.pruned)
        entry = self.manifests.shards(epoch - 1).get(shard)
        if entry is None:
            return 0
        if "pruned" in entry:
            return int(entry["pruned"])
        ordinals = self.pruned(shard, epoch)  # a marker from before counts were recorded
        return 0 if ordinals is None else len(ordinals)

    def admit(self, shards: ShardCodes, keys: Sequence[str], ordinals: np.ndarray | None) -> None:
        """A meta-batch arrives: restore its new shards, check and record its keys."""
        names = set(shards.names)
        for name in names - self._checked:
            self._restore(name)
        self._touched.update(names)
        if self.manifests is None:
            return
        if ordinals is None:
            raise ConfigError(
                "manifests= needs each sample's ordinal in its shard ('__index__'); es_pipe's "
                "sources add it, or add it in your map step"
            )
        key_array = key_text(keys)
        if self._verify & names:
            self._check_keys(shards, key_array, ordinals)
        self._chunks.append((shards, np.asarray(ordinals, np.int64), key_array))

    def _check_keys(self, shards: ShardCodes, keys: pa.Array, ordinals: np.ndarray) -> None:
        for name in self._verify.intersection(shards.names):
            mask = shards.mask(name)
            base = self.keys.get(name)
            if base is None:
                continue
            ords = ordinals[mask]
            inside = ords < len(base)
            expected = base.take(pa.array(ords[inside]))
            got = keys.filter(pa.array(mask)).filter(pa.array(inside))
            known = expected.is_valid()
            same = pc.equal(expected, got).fill_null(True)
            bad = np.flatnonzero(
                ~same.to_numpy(zero_copy_only=False) & known.to_numpy(zero_copy_only=False)
            )
            if len(bad):
                i = int(bad[0])
                raise ManifestError(
                    f"manifest {self._origin.get(name, '?')} says sample {int(ords[inside][i])} "
                    f"of shard {name!r} has key {expected[i].as_py()!r}, but the shard yields "
                    f"{got[i].as_py()!r} there: the manifest does not belong to this shard. "
                    "Start with a fresh manifests= folder, or restore the original shard"
                )

    def drop_pruned(self, shards: ShardCodes, ordinals: np.ndarray) -> np.ndarray:
        """Mask of the samples to keep (those this epoch does not prune)."""
        keep = np.ones(len(shards), dtype=bool)
        if self.prune is None:
            return keep
        for name in shards.names:
            self._see(name)
            decision = self.decisions.get(name)
            if decision is not None and len(decision.pruned):
                mask = shards.mask(name)
                keep[mask] = ~decision.is_pruned(ordinals[mask])
        return keep

    def weights(self, shards: ShardCodes, ordinals: np.ndarray | None) -> np.ndarray | None:
        """1/keep loss weights of the given samples (``None``: all 1)."""
        if self.prune is None or not self.prune.rescale or ordinals is None:
            return None
        names = [n for n in shards.names if n in self.decisions]
        if not any(self.decisions[n].factor != 1.0 for n in names):
            return None
        out = np.ones(len(shards), dtype=np.float32)
        for name in names:
            mask = shards.mask(name)
            out[mask] = self.decisions[name].weights(ordinals[mask])
        return out

    # ------------------------------------------------------------------ epoch end

    def close_epoch(self, ended: int, *, active: bool, rank: int, step: int) -> None:
        """Decide the next epoch's pruning for every shard read in ``ended``, write their
        manifests, commit (rank 0)."""
        nxt = ended + 1
        # inherited from another topology's checkpoint and not read here since: a fallback
        # copy by one rank, in case no rank read it after the restore (it was done)
        fallback = {
            name
            for name in self._inherited - self._touched
            if shard_owner(name, self.world_size) == rank
        }
        writing = self._touched | fallback
        for name in writing:  # held from a checkpoint: this epoch's decision, for streaks
            self._see(name)
        keys = self._merge_keys() if self.manifests is not None else {}
        decisions: dict[str, Decision] = {}
        items: list[dict[str, Any]] = []
        for name in sorted(writing):
            view = self.store.shard(name)
            rows = len(view["score"])
            previous = self.decisions.get(name)
            if self.prune is not None and active:
                decisions[name] = pruning.decide(
                    self.prune,
                    view[self.prune.score],
                    view["visits"],
                    None if previous is None else previous.state,
                    pruning.shard_seed(self.seed, nxt, name),
                )
            else:
                decisions[name] = pruning.keep_all(rows)
            if self.manifests is not None:
                items.append(
                    {
                        "shard": name,
                        "columns": {**view, "state": decisions[name].state},
                        "keys": keys.get(name),
                        "factor": decisions[name].factor,
                        "fingerprint": self._fingerprint(name),
                        "hyper": {**self.hyper, "step": step},
                        "fallback": name in fallback,
                    }
                )
                if name not in fallback:  # a fallback may lose: restore it from the commit
                    self._written[name] = ended
                self.stats["written"] += 1
        for name in fallback:
            decisions.pop(name)
        if self.manifests is not None:
            self.manifests.write_shards(ended, items)
            self.manifests.finish(ended)
            if rank == 0:
                self.manifests.commit(
                    ended,
                    expected_ranks=self.world_size,
                    timeout=self.commit_timeout,
                    hyper={**self.hyper, "step": step},
                    run=self.run,
                )
                log.info(
                    "epoch %d committed under %s (%d ranks, step %d)",
                    ended,
                    self.manifests.url,
                    self.world_size,
                    step,
                )
            else:  # the barrier: the next epoch reads what this commit publishes
                self.manifests.wait_committed(
                    ended, ranks=self.world_size, timeout=self.commit_timeout
                )
            # shards not read this epoch live in the manifests, not in this rank's memory
            for name in set(self.store.shards) - self._touched:
                self.store.drop(name)
                self.keys.pop(name, None)
            self.store.compact()
            self._checked = set()  # next epoch: compare with the newest commit again
            self._committed = None
        self.decisions = {n: d for n, d in decisions.items() if len(d.pruned) or d.factor != 1}
        if self.prune is not None:
            log.info(
                "epoch %d ended: %d of the %d shards read prune %d samples in epoch %d",
                ended,
                len(self.decisions),
                len(decisions),
                sum(len(d.pruned) for d in self.decisions.values()),
                nxt,
            )
        self._touched = set()
        self._inherited = set()
        self._read = None
        self._chunks = []
        self._verify = set()
        self.epoch = nxt

    def rewind(self, epoch: int, *, merged: bool = False) -> None:
        """The sampler was restored to ``epoch`` (a checkpoint): forget the decisions held
        and restore every shard again from the manifests committed before ``epoch``.

        The shards the checkpoint's score table says this rank read in the epoch up to the
        checkpoint (``load_read``) count as read this epoch by this rank; it also holds
        shards it read in the epoch before, which another rank may read in this one. A
        table without that list (es_pipe before issue 11) counts every shard it holds.
        If the checkpoint was ``merged`` from all ranks of a topology (elastic resume),
        the rank that reads a shard again writes its manifest, and a shard nobody reads
        again (it was done) is written by its :func:`shard_owner`.

        Also at the same epoch: a fresh process that resumed from the manifests is at the
        checkpoint's epoch already, but holds nothing of it yet. Without manifests, the
        decisions held are the only ones there are: kept at the same epoch."""
        if self.manifests is not None or int(epoch) != self.epoch:
            self.decisions = {}
        self.epoch = int(epoch)
        self._checked = set()
        self._committed = None
        self._verify = set()
        self._chunks = []
        held = set(self.store.shards)
        read = held if self._read is None else held & self._read
        self._touched, self._inherited = (set(), held) if merged else (read, set())
        self._written = {}

    def read_state(self) -> list[str]:
        """The shards this rank read in the current epoch so far, for a checkpoint."""
        return sorted(self._touched)

    def load_read(self, names: Sequence[str] | None) -> None:
        """The shards read in the checkpoint's epoch up to it (``None``: unknown, every
        shard held counts); applied now and by the ``rewind`` of the position restore."""
        self._read = None if names is None else set(names)
        held = set(self.store.shards)
        if self._inherited:  # a merged position was restored already
            return
        self._touched = held if self._read is None else held & self._read

    def key_state(self) -> dict[str, list[str | None]]:
        """The key book of the shards held (keys by ordinal, ``None`` where unknown), for a
        checkpoint: a run resumed inside an epoch still writes the keys of the samples read
        before the checkpoint into that epoch's manifests."""
        keys = self._merge_keys()
        return {name: keys[name].to_pylist() for name in self.store.shards if name in keys}

    def load_key_state(self, state: Mapping[str, list[str | None]]) -> None:
        self.keys.update({name: pa.array(keys, pa.string()) for name, keys in state.items()})

    def _merge_keys(self) -> dict[str, pa.Array]:
        """Each touched shard's keys by ordinal: this epoch's, else the last known."""
        if not self._chunks:
            return dict(self.keys)
        shards = ShardCodes.concat([chunk[0] for chunk in self._chunks])
        ordinals = np.concatenate([chunk[1] for chunk in self._chunks])
        keys = pa.concat_arrays([chunk[2] for chunk in self._chunks])
        codes = shards.codes
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(shards.names) + 1))
        for code, name in enumerate(shards.names):
            rows = len(self.store.shard(name)["score"])
            picked = order[bounds[code] : bounds[code + 1]]
            base = self.keys.get(name)
            if base is None:
                base = pa.nulls(0, pa.string())
            base = base.slice(0, min(len(base), rows))
            combined = pa.concat_arrays(
                [base, keys.take(pa.array(picked)), pa.nulls(1, pa.string())]
            )
            index = np.full(rows, len(combined) - 1, dtype=np.int64)
            index[: len(base)] = np.arange(len(base))
            index[ordinals[picked]] = len(base) + np.arange(len(picked))
            self.keys[name] = combined.take(pa.array(index))
        return dict(self.keys)


def key_text(keys: Sequence[Any]) -> pa.Array:
    """Sample keys as the text stored in manifests. Strings are kept; other keys follow
    one rule, so that the same sample always gets the same text: ``str()`` of ints (and
    of tuples and anything else), bytes decoded as UTF-8, and bytes that are not UTF-8
    (also tar member names decoded with ``surrogateescape``) written as ``\\xNN``
    escapes. The fast path is one Arrow conversion; only keys that are not plain UTF-8
    strings take the per-key path."""
    try:
        return pa.array(keys, pa.string())
    except (pa.ArrowException, UnicodeError, TypeError, ValueError):
        return pa.array([_one_key(key) for key in keys], pa.string())


def _one_key(key: Any) -> str | None:
    if key is None:
        return None
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
            raw = key.encode("utf-8", "surrogatepass")
    elif isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
    else:
        return str(key)
    return raw.decode("utf-8", "backslashreplace")


def shard_owner(shard: str, world_size: int) -> int:
    """The rank that writes a shard nobody reads in an elastically resumed epoch."""
    return zlib.crc32(shard.encode()) % world_size
