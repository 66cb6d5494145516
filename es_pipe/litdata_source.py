"""LitData (``litdata.optimize`` / ``litdata.StreamingDataset``) as an es_pipe upstream.

ES scores follow a sample by its identity ``(shard, key)``. A ``litdata.StreamingDataset``
yields bare items, with no identity, and its ``state_dict`` takes arguments only its own
``StreamingDataLoader`` passes (``num_samples_yielded, num_workers, batch_size``), so the
stage over a plain one fails at its first checkpointed position (``TypeError``) and, once
given keys by hand, must not key by a per-worker counter.

:class:`IdentifiedStreamingDataset` is a ``litdata.StreamingDataset`` (same arguments,
same chunks, shuffling, workers, caching and resume) whose items are the optimized dicts
plus:

* ``__shard__``: the chunk file the item is stored in, under the dataset's location
  (``input_dir``'s URL when remote, else its path): ``"/data/out/chunk-0-3.bin"``, or a
  Parquet file for a Parquet dataset;
* ``__index__``: the item's ordinal within that chunk;
* ``__key__``: ``__index__`` as text, or the value of ``key_field`` as text.

These do not depend on workers, shuffling, epochs or resumption: litdata writes each item
once, at one place in one chunk. Resume uses litdata's own state:

* in the trainer's process (``tn.Loader(es_pipe.SelectStage(ds, sampler))``),
  ``ds.state_dict()`` with no arguments records the items this process has taken, so
  the stage's ``state_dict`` / ``load_state_dict`` resume exactly;
* with DataLoader workers, :func:`litdata_loader` is litdata's ``StreamingDataLoader``
  handing over single items (``batch_size=1`` unwrapped: the stage batches), whose
  ``state_dict`` replays the workers' order.

Either state is a copy: litdata returns its loaded state object itself, updated in place,
which would change a checkpoint already taken.

litdata declares ``torchvision``, which pip would satisfy by replacing a CPU torch with a
CUDA build; install it with ``pip install --no-deps litdata`` plus its other runtime
requirements (the ``litdata`` extra of es_pipe). Only litdata's image and video serializers
import torchvision, lazily.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.sampler import ChunkedIndex
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "es_pipe.litdata_source needs litdata, installed without its torchvision "
        "requirement (which would replace a CPU torch): pip install 'es_pipe[litdata]' "
        "&& pip install --no-deps 'litdata==0.2.76' (as `make` does)"
    ) from exc

from es_pipe.errors import ConfigError

__all__ = ["IdentifiedStreamingDataset", "from_litdata", "litdata_loader", "single_sample"]

_IDENTITY = ("__key__", "__shard__", "__index__")


class IdentifiedStreamingDataset(StreamingDataset):
    """A ``litdata.StreamingDataset`` whose items carry ``__shard__`` (the chunk file),
    ``__index__`` (the ordinal in it) and ``__key__``, and whose ``state_dict()`` also works
    without arguments (iteration in this process). See the module docstring.

    Args:
        input_dir: as ``litdata.StreamingDataset``: the ``optimize`` output (local or a URL).
        key_field: a field of the items whose value names the item (unique within its
            chunk); default the ordinal in the chunk.
        **kwargs: passed on to ``litdata.StreamingDataset`` (``shuffle=``, ``seed=``,
            ``storage_options=``, ``transform=``...).
    """

    def __init__(self, input_dir: Any, *, key_field: str | None = None, **kwargs: Any) -> None:
        if key_field is not None and (not isinstance(key_field, str) or key_field in _IDENTITY):
            raise ConfigError(f"key_field={key_field!r} must be the name of a field of the items")
        super().__init__(input_dir, **kwargs)
        self.key_field = key_field
        self._root = (self.input_dir.url or self.input_dir.path or "").rstrip("/")
        self._shards: dict[int, tuple[str, int]] = {}  # chunk index -> (shard name, begin)
        self._taken = 0  # items taken in this epoch, iterating in this process
        self._ended = False  # the last iteration ran out (StopIteration)
        self._loaded = False  # a state was loaded and not iterated yet

    # -- identity ------------------------------------------------------------------------

    def _chunk(self, index: Any) -> tuple[str, int]:
        """The shard name of the chunk ``index`` reads from and the chunk's first global
        index (litdata's chunk config, cached per chunk)."""
        found = self._shards.get(index.chunk_index)
        if found is None:
            path, begin, _ = self.cache._reader.config[index]
            found = (f"{self._root}/{os.path.basename(path)}", int(begin))
            self._shards[index.chunk_index] = found
        return found

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int) and not isinstance(index, bool):
            if getattr(self, "cache", None) is None:  # as litdata's __getitem__ does
                from litdata.utilities.env import _WorkerEnv

                self.worker_env = _WorkerEnv.detect()
                self.cache = self._create_cache(worker_env=self.worker_env)
                self.shuffler = self._create_shuffler(self.cache)
            index = ChunkedIndex(*self.cache._get_chunk_index_from_index(index))
        item = super().__getitem__(index)
        if not isinstance(index, ChunkedIndex):  # slices, string keys: litdata's items
            return item
        if not isinstance(item, dict):
            raise ConfigError(
                f"a litdata item is a {type(item).__name__}, not a dict: es_pipe adds the "
                "identity fields to each item, so have optimize(fn=...) return a dict "
                "(e.g. {'image': ..., 'label': ...}), or pass transform= to make one"
            )
        clash = [name for name in _IDENTITY if name in item]
        if clash:
            raise ConfigError(
                f"the items already have fields {clash}: es_pipe adds them; rename those "
                "fields (or build the identity yourself over a plain StreamingDataset)"
            )
        shard, begin = self._chunk(index)
        ordinal = int(index.index) - begin
        if self.key_field is None:
            key = str(ordinal)
        else:
            if self.key_field not in item or item[self.key_field] is None:
                raise ConfigError(
                    f"{shard!r} item {ordinal}: key_field {self.key_field!r} is missing or "
                    f"None (its fields: {sorted(item)}); give a field with a value in every "
                    "item, or key_field=None (the ordinal in the chunk)"
                )
            key = str(item[self.key_field])
        item["__key__"] = key
        item["__shard__"] = shard
        item["__index__"] = ordinal
        return item

    # -- position ------------------------------------------------------------------------

    def __iter__(self) -> IdentifiedStreamingDataset:
        resumed = self._state_dict
        super().__iter__()
        # items this process has taken in the epoch: litdata's own global_index restarts at
        # the offset in the current chunk after a resume, so it cannot say
        self._taken = int(resumed.get("num_samples_yielded", 0)) if resumed else 0
        self._ended = self._loaded = False
        return self

    def __next__(self) -> Any:
        try:
            item = super().__next__()
        except StopIteration:
            self._ended = True
            raise
        self._taken += 1
        return item

    def state_dict(
        self,
        num_samples_yielded: int | None = None,
        num_workers: int | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        """litdata's state, a copy. Without arguments (iterated in this process, as under
        ``tn.Loader(es_pipe.SelectStage(ds, ...))``): the items this process has taken in
        this epoch; once the epoch has run out, the start of the next one."""
        if num_samples_yielded is None:
            if self._loaded and self._state_dict is not None:
                return dict(self._state_dict)
            num_samples_yielded = 0 if self._ended else self._taken
            num_workers, batch_size = 1, int(self.batch_size or 1)
        state = super().state_dict(num_samples_yielded, num_workers, batch_size)
        return dict(state)  # litdata hands out its loaded state itself, updated in place

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """litdata's, on a copy; the dataset takes the state's epoch at once. litdata sets
        it only when iteration starts (in the workers, for a ``StreamingDataLoader``), and
        its ``state_dict`` updates the loaded state in place with the dataset's own epoch:
        a checkpoint position taken between the two (the stage takes one before every
        meta-batch) would send the workers back to an earlier epoch's order."""
        super().load_state_dict(dict(state_dict) if state_dict else state_dict)
        self._loaded = bool(state_dict)
        if state_dict and "current_epoch" in state_dict:
            self.current_epoch = state_dict["current_epoch"]


def from_litdata(
    input_dir: Any, *, key_field: str | None = None, **kwargs: Any
) -> IdentifiedStreamingDataset:
    """``litdata.StreamingDataset(input_dir, **kwargs)`` whose items carry stable
    identities (chunk file, ordinal in it); see :class:`IdentifiedStreamingDataset`.

    Example::

        ds = from_litdata("out/", shuffle=True, seed=0)
        loader = tn.Loader(es_pipe.SelectStage(ds, sampler))
        # with workers: es_pipe.SelectStage(litdata_loader(ds, num_workers=4), sampler)
    """
    return IdentifiedStreamingDataset(input_dir, key_field=key_field, **kwargs)


def single_sample(items: list[Any]) -> Any:
    """A ``collate_fn`` for ``StreamingDataLoader(batch_size=1)``: the item itself, not a
    batch of one (the stage builds the meta-batches)."""
    if len(items) != 1:
        raise ConfigError(
            f"single_sample got {len(items)} items: use it with batch_size=1 (the stage "
            "batches); set the batch sizes on the sampler"
        )
    return items[0]


def litdata_loader(
    dataset: IdentifiedStreamingDataset, *, num_workers: int = 0, **kwargs: Any
) -> Any:
    """litdata's ``StreamingDataLoader`` over ``dataset`` handing over single items, for
    DataLoader workers with litdata's own resume (``state_dict`` / ``load_state_dict``
    replay the workers' order). ``kwargs`` go to ``StreamingDataLoader``
    (``prefetch_factor=``, ``persistent_workers=``...)."""
    if not isinstance(dataset, IdentifiedStreamingDataset):
        raise ConfigError(
            f"litdata_loader needs a dataset from from_litdata(...), got "
            f"{type(dataset).__name__}: a plain litdata StreamingDataset has no identities"
        )
    for name in ("batch_size", "collate_fn"):
        if name in kwargs:
            raise ConfigError(
                f"litdata_loader sets {name} itself (single items, batch_size=1): the stage "
                "batches; set the batch sizes on the sampler"
            )
    return StreamingDataLoader(
        dataset, batch_size=1, collate_fn=single_sample, num_workers=num_workers, **kwargs
    )
