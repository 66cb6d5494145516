"""The ``pruned=`` adapter: which samples of a shard a source leaves out in an epoch.

A source is given ``None``, a mapping ``url -> sorted int64 ordinals`` or a callable
``(url, epoch) -> ordinals | None`` (a sampler's ``sampler.pruned`` hook, see
:mod:`es_pipe.prune_hook`). This module turns any of them into checked ordinal arrays for
the shard being read, and into per-shard kept counts for the split and ``equalize``. A
callable with a ``count(url, epoch) -> int`` method is asked only for counts of the shards
other streams read, never for their ordinals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from es_pipe.errors import ConfigError

__all__ = ["Pruned", "PrunedSpec"]

PrunedSpec = Mapping[str, np.ndarray] | Callable[[str, int], "np.ndarray | None"] | None


class Pruned:
    """A checked ``pruned=`` argument: ordinals per shard and epoch, and kept counts."""

    def __init__(self, spec: PrunedSpec) -> None:
        if spec is not None and not (callable(spec) or isinstance(spec, Mapping)):
            raise ConfigError("pruned must be None, a mapping url -> ordinals, or a callable")
        self.spec = spec

    def ordinals(self, url: str, epoch: int) -> np.ndarray:
        """The sorted, unique, non-negative int64 ordinals of ``url`` to leave out in
        ``epoch``. Raises :class:`ConfigError` for anything else the spec returns."""
        spec = self.spec
        if spec is None:
            return np.empty(0, dtype=np.int64)
        arr = spec(url, epoch) if callable(spec) else spec.get(url)
        if arr is None:
            return np.empty(0, dtype=np.int64)
        arr = np.asarray(arr)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ConfigError(f"pruned ordinals of {url!r} must be a 1-D integer array")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr[0] < 0 or np.any(np.diff(arr) <= 0)):
            raise ConfigError(
                f"pruned ordinals of {url!r} must be sorted, unique and non-negative "
                "(np.unique gives that)"
            )
        return arr

    def kept(self, urls: Sequence[str], sizes: Sequence[int], epoch: int) -> list[int]:
        """Samples of each shard left after pruning in ``epoch``, from the shards' sizes."""
        count = getattr(self.spec, "count", None)
        kept = []
        for url, n in zip(urls, sizes, strict=True):
            if count is not None:  # no need to load the pruning of shards others read
                kept.append(n - min(n, int(count(url, epoch))))
            else:
                kept.append(n - int(np.searchsorted(self.ordinals(url, epoch), n)))
        return kept
