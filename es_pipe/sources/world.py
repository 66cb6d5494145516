"""Who reads: the rank and the DataLoader worker of a source, and the stream they make.

A source is read by ``S = world_size * num_workers`` *streams*; the stream of rank ``r``'s
worker ``w`` is ``s = r * num_workers + w``. The rank is known when the source is built
(explicit arguments, else ``torch.distributed``, else the ``RANK``/``WORLD_SIZE``
environment, else a single process); the worker only at ``reset`` time, inside the
DataLoader worker process that reads (``torch.utils.data.get_worker_info()``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from es_pipe.checks import is_int
from es_pipe.errors import ConfigError

__all__ = ["World", "resolve_rank", "resolve_worker"]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: explicit arguments, else torch.distributed, else env, else (0, 1)."""
    if rank is None and world_size is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
    if rank is None and world_size is None and "WORLD_SIZE" in os.environ:
        try:
            rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        except ValueError as exc:
            raise ConfigError(f"RANK/WORLD_SIZE in the environment: {exc}") from None
    if rank is None and world_size is None:
        rank, world_size = 0, 1
    return _checked_pair("rank", rank, "world_size", world_size)


def resolve_worker(worker: int | None, num_workers: int | None) -> tuple[int, int]:
    """``(worker, num_workers)``: explicit arguments, else DataLoader worker info, else (0, 1)."""
    if worker is None and num_workers is None:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return _checked_pair("worker", worker, "num_workers", num_workers)


def _checked_pair(name: str, index: Any, count_name: str, count: Any) -> tuple[int, int]:
    """``(index, count)`` as ints with ``0 <= index < count``, else a ConfigError."""
    if index is None or count is None:
        raise ConfigError(f"give both {name}= and {count_name}=, or neither")
    for label, value in ((name, index), (count_name, count)):
        if not is_int(value, numpy=True):
            raise ConfigError(f"{label}={value!r} must be an int")
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"need 0 <= {name} < {count_name}, got {name}={index}, {count_name}={count}"
        )
    return int(index), int(count)


@dataclass(frozen=True)
class World:
    """A source's place among the readers: its rank (resolved when the source is built)
    and its worker arguments (resolved by :meth:`stream`, at every ``reset``, in the
    process that reads)."""

    rank: int
    world_size: int
    worker: int | None = None
    num_workers: int | None = None

    @classmethod
    def of(
        cls,
        rank: int | None,
        world_size: int | None,
        worker: int | None = None,
        num_workers: int | None = None,
    ) -> World:
        """Resolve the rank now (see :func:`resolve_rank`); keep the worker arguments."""
        return cls(*resolve_rank(rank, world_size), worker, num_workers)

    def stream(self) -> tuple[int, int]:
        """``(s, S)``: this process's stream id and the number of streams (ranks x workers)."""
        worker, num_workers = resolve_worker(self.worker, self.num_workers)
        return self.rank * num_workers + worker, self.world_size * num_workers
