"""The options every source takes, and what they mean.

Every reader (:class:`~es_pipe.sources.WebDatasetSource`,
:class:`~es_pipe.sources.ParquetSource`, :class:`~es_pipe.sources.ArrowSource`) takes
its shard list, its own format options, and these keyword options, which
:class:`~es_pipe.sources.base.ShardedSource` checks and hands to its parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from es_pipe.checks import is_int
from es_pipe.errors import ConfigError
from es_pipe.retry import Retry
from es_pipe.sources.pruned import PrunedSpec
from es_pipe.sources.shards import ShardList

__all__ = ["SourceOptions", "with_counts"]


class SourceOptions(TypedDict, total=False):
    """The keyword options of every source.

    Keys:
        shuffle: shuffle the shard order every epoch, from ``(seed, epoch)``.
        seed: integer seed of every random choice the source makes.
        epoch: the epoch of the first ``reset()``; later ``reset(None)`` calls advance it
            (only when the epoch was actually iterated, so an extra ``reset()`` is harmless).
            Under an ``SelectStage`` stage leave it out: the stage sets the epoch from
            ``sampler.epoch`` (``source.set_epoch``) before every epoch.
        rank, world_size: explicit rank split; default from ``torch.distributed`` if
            initialised, else the ``RANK``/``WORLD_SIZE`` environment, else ``(0, 1)``.
        worker, num_workers: explicit worker split; default from
            ``torch.utils.data.get_worker_info()`` at ``reset`` time, else ``(0, 1)``.
        equalize: ``None`` (every sample once, streams may differ in length), ``"drop"``
            (every stream yields the length of the shortest stream; the surplus of the longer
            ones is not read this epoch) or ``"pad"`` (every stream yields the length of the
            longest; shorter streams re-read their own shards from the start). Both need the
            sample count of every shard (index file with counts, ``num_samples=`` or, for
            Parquet, the footers); a count that the shard contradicts when it is read is a
            :class:`ShardError`. ``"drop"`` refuses (:class:`ConfigError`) an epoch whose
            shortest stream is empty while others are not (more streams than shards): it
            would yield nothing on every rank.
        on_error: ``"raise"`` raises :class:`ShardError`; ``"skip"`` warns, skips the bad
            sample or the rest of the bad shard, counts it in ``source.stats`` and warns a
            summary at the end of the epoch.
        pruned: ``None``, a mapping ``url -> sorted int64 ordinals`` or a callable
            ``(url, epoch) -> ordinals | None``: samples to leave out this epoch, dropped
            before their bytes are decoded (and, where the format allows, before they are
            read). A callable with a ``count(url, epoch) -> int`` method (a sampler's
            ``sampler.pruned``) is asked only for counts of the shards other streams read.
        num_samples: optional mapping ``url -> number of samples`` (used by ``equalize``).
        retry: how reads of shards from fsspec filesystems are retried after transient
            errors (a reset connection, a timeout): an :class:`es_pipe.Retry`, an int
            number of attempts (``1``: no retry), or ``None`` for ``Retry()`` (3 attempts,
            0.2 s then 0.4 s of backoff, with jitter). A failed read is retried in place:
            the file is reopened at the byte where the read began, so no sample is lost or
            delivered twice. Retries are counted in ``stats["retries"]``; a shard that
            keeps failing raises :class:`ShardError` (naming the shard and the attempts)
            or, with ``on_error="skip"``, is skipped. Missing files, permission errors,
            a full disk and corrupt data are never retried. Local Parquet and Arrow files
            are read natively (memory-mapped), without retries.
        storage_options: fsspec filesystem arguments for the shards' storage, e.g. for S3
            ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}`` (see
            :mod:`es_pipe.storage`); default: those of a :class:`ShardList` passed as
            ``urls``, else the backend's own configuration (``AWS_*`` variables...).
            Missing or invalid credentials, access denied, a bucket that does not exist and
            an unreachable endpoint raise :class:`~es_pipe.StorageError` naming the fix,
            also under ``on_error="skip"``: they are configuration, not bad shards.
    """

    shuffle: bool
    seed: int
    epoch: int
    rank: int | None
    world_size: int | None
    worker: int | None
    num_workers: int | None
    equalize: Literal["drop", "pad"] | None
    on_error: Literal["raise", "skip"]
    pruned: PrunedSpec
    num_samples: Mapping[str, int] | None
    retry: Retry | int | None
    storage_options: Mapping[str, Any] | None


def with_counts(shards: ShardList, num_samples: Mapping[str, int] | None) -> ShardList:
    """``shards`` with the sample counts of ``num_samples=`` (checked), if given."""
    if num_samples is None:
        return shards
    counts = tuple(
        num_samples.get(u, -1) if isinstance(num_samples, Mapping) else None for u in shards.urls
    )
    if not all(is_int(c, numpy=True) for c in counts):
        raise ConfigError(
            "num_samples must be a mapping shard URL -> int sample count, got "
            f"{str(num_samples)[:200]}"
        )
    return ShardList(shards.urls, tuple(int(c) for c in counts), shards.storage_options)
