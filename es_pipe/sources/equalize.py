"""``equalize=``: every stream of an epoch yields the same number of samples.

Under DDP every rank must take the same number of steps, or the ranks that finish first
wait forever for the others' gradients. ``"drop"`` cuts every stream to the shortest one
(the surplus of the longer ones is not read this epoch); ``"pad"`` lets every stream run
to the longest one: a shorter stream re-reads its own shards from the start, in a cycle.
Both need the kept sample count of every shard (:class:`~es_pipe.sources.reader.ShardSizes`
after pruning).

The padding cycle is a pure function of the plan and the number of samples padded, so a
restore in the middle of it replays the cycle without reading (:meth:`Equalizer.replay`).
"""

from __future__ import annotations

import warnings
from typing import Literal

from es_pipe.errors import ConfigError
from es_pipe.sources.plan import EpochPlan

__all__ = ["Equalize", "Equalizer"]

Equalize = Literal["drop", "pad"] | None


class Equalizer:
    """The per-epoch limit of a stream under ``equalize``, and its padding cycle.

    :attr:`padded` is the number of padded samples the epoch started from (non-zero after
    a restore in the padding phase); while padding, the node counts further padded
    samples itself (its count in the current shard starts from :attr:`padded`), and
    :meth:`padded_now` tells which of the two is current.
    """

    def __init__(self, mode: Equalize) -> None:
        if mode not in (None, "drop", "pad"):
            raise ConfigError(f"equalize must be None, 'drop' or 'pad', got {mode!r}")
        self.mode = mode
        self.start_epoch(0)

    def start_epoch(self, padded: int) -> None:
        """Forget the last epoch's padding; this one starts at ``padded`` samples padded."""
        self.padded = padded
        self.in_pad = False
        self.url: str | None = None  # the shard being padded with
        self._cycle = 0
        self._mark = -1

    def padded_now(self, current_count: int) -> int:
        """Samples padded so far, given the node's count in the current shard."""
        return current_count if self.in_pad else self.padded

    def needs_counts(self, kept: list[int] | None) -> list[int]:
        """``kept`` (every shard's samples after pruning), or a :class:`ConfigError`
        naming how to count the shards when some count is unknown (None)."""
        if kept is None:
            raise ConfigError(
                f"equalize={self.mode!r} needs the sample count of every shard: "
                "count them with `es-pipe index SHARDS... --out index.txt` (shards "
                "written by webdataset or pyarrow included) and pass "
                "urls=ShardList.from_index('index.txt'); write_shards and "
                "es-pipe shard write one; or pass num_samples={url: count}, or use "
                "equalize=None"
            )
        return kept

    def limit(self, plan: EpochPlan, kept: list[int], epoch: int) -> tuple[int, int]:
        """``(limit, dropped)``: the number of samples this stream yields in the epoch
        (counted from the epoch's start; after a re-split, from the restore), and the
        surplus it leaves unread under ``"drop"``.

        ``kept`` holds every shard's samples after pruning. After a re-split the samples
        of started shards already delivered (their cursors) are not in the limit.
        """
        s = plan.stream[0]
        skip = plan.cursors if plan.resplit else {}
        per = [sum(kept[i] - skip.get(int(i), 0) for i in share) for share in plan.shares()]
        if self.mode == "drop":
            if not plan.resplit:
                self._refuse_empty_drop(plan, per, kept, epoch)
            return min(per), per[s] - min(per)
        return max(per), 0

    @staticmethod
    def _refuse_empty_drop(plan: EpochPlan, per: list[int], kept: list[int], epoch: int) -> None:
        """``equalize='drop'`` cuts every stream to the shortest one: when that one is
        empty while others are not, every stream would yield nothing, every epoch."""
        if min(per) > 0 or max(per) == 0:
            return
        n_streams = len(per)
        t = per.index(0)
        mine = plan.shares()[t]
        if len(mine) == 0:
            why = (
                f"{len(plan.order)} shards for {n_streams} streams (ranks x workers): "
                f"stream {t} has no shard to read"
            )
        else:
            why = (
                f"the {len(mine)} shard(s) of stream {t} of {n_streams} (ranks x workers) "
                f"hold no sample this epoch (sample counts {[kept[i] for i in mine][:8]}, "
                "after pruning)"
            )
        raise ConfigError(
            f"equalize='drop' would yield 0 samples on every rank in epoch {epoch}, "
            f"although the epoch holds {sum(per)}: {why}. Use fewer ranks or DataLoader "
            "workers, more (smaller) shards than streams, or equalize='pad' (short streams "
            "re-read their own samples) or equalize=None"
        )

    @staticmethod
    def _pad_shards(plan: EpochPlan) -> list[int]:
        """The shards a stream pads with: its own, or one of the epoch's if it has none."""
        if plan.own:
            return plan.own
        return [int(plan.order[plan.stream[0] % len(plan.order)])]

    def next_pad(self, plan: EpochPlan, yielded: int, current_count: int) -> tuple[int, int] | None:
        """``(shard, count)``: the next shard of the padding cycle and the node's count to
        go on from; ``None`` (with a warning) when a whole cycle yielded nothing."""
        pads = self._pad_shards(plan)
        k = self._cycle
        if k % len(pads) == 0:
            if k > 0 and self._mark == yielded:
                warnings.warn("equalize='pad': nothing left to pad with (all pruned)", stacklevel=4)
                return None
            self._mark = yielded
        self._cycle += 1
        if not self.in_pad:
            self.in_pad, current_count = True, self.padded
        return pads[k % len(pads)], current_count

    def replay(self, plan: EpochPlan, kept: list[int]) -> int:
        """Move the cycle to where :attr:`padded` samples of padding end, without reading
        (cheap: whole shards are counted, not read); the number of samples of the next
        padding shard already delivered."""
        pads = self._pad_shards(plan)
        rest = self.padded
        k = 0
        while rest > 0 and any(kept[i] for i in pads):
            n = kept[pads[k % len(pads)]]
            if rest < n:
                break
            rest -= n
            k += 1
        self._cycle = k
        self._mark = -1
        return rest
