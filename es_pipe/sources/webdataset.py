"""WebDataset ``.tar`` shards as a torchdata node.

The tar parsing is es_pipe's own streaming header parser (:mod:`es_pipe.sources.tar`: it
reads what Python's ``tarfile`` reads, over ten times faster than webdataset's reader),
with webdataset's naming rules (``base_plus_ext``: files that share the part of their name
before the first dot form one sample; ``__*__`` metadata members are ignored; extensions
are lower-cased). Two things differ from webdataset on purpose: the member bytes of a
pruned or already-delivered sample are never copied (steps over them within a read, a
seek beyond it), and a shard that ends early, a member without a key or a key that
appears twice is an error rather than a silently shorter or merged sample.

Shards are opened on their fsspec filesystem (so any fsspec URL works; ``.tar.gz`` and the
other compressions fsspec infers from the name are decompressed) with reads retried after
transient errors (``retry=``), inside a ``with`` block: the file is closed when the shard
ends, fails, or the node is reset.

Nothing is decoded: every member arrives as its raw bytes. In particular no member is
ever unpickled or ``torch.load``-ed, whatever its extension (``.pyd``, ``.pickle``,
``.pth``, which webdataset's default decoders would execute); decode in your own map
step with safe decoders.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Generator, Iterator, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from fsspec.compression import compr
from fsspec.utils import infer_compression

from es_pipe.columns import ColumnChunk
from es_pipe.errors import ConfigError, ShardError
from es_pipe.sources.base import SourceOptions
from es_pipe.sources.columnar import ColumnarOption
from es_pipe.sources.shards import ShardList
from es_pipe.sources.tar import CHUNK, iter_tar_samples

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["WebDatasetSource"]


class WebDatasetSource(ColumnarOption):
    """Stream samples from WebDataset tar shards on any fsspec filesystem.

    Each sample is a dict: one entry per member file, named by its (lower-cased) extension,
    holding the raw bytes (nothing is decoded: decode in a later, parallel stage), plus
    ``"__key__"`` (webdataset key), ``"__shard__"`` (the shard URL as listed) and
    ``"__index__"`` (0-based position of the sample in its tar).

    Example::

        src = WebDatasetSource("s3://bucket/train-{000000..004095}.tar", shuffle=True, seed=0)
        node = torchdata.nodes.ParallelMapper(src, decode, num_workers=8)

    Args:
        urls: brace pattern, glob, list of URLs, or a :class:`ShardList`.
        shuffle_buffer: if > 0, shuffle samples within each shard through a buffer of that
            many samples, seeded from ``(seed, epoch, shard URL)``. A resumed shard replays
            the buffer from the start of the shard (re-reading its prefix) to restore the
            exact order.
        columnar: ``True``: yield :class:`~es_pipe.columns.ColumnChunk` items, one per
            chunk of the reader (up to 64 samples of one shard; a chunk whose samples
            differ in their extensions is cut into runs that agree): the identity as
            arrays (the shard once, the ordinals, the keys), the payload one list of raw
            bytes per extension. The ``SelectStage`` stage builds meta-batches from them
            without per-sample identity extraction or node calls; meta-batches, states and
            resume are the dict path's (``tests/test_columnar_tar.py``). Payloads are
            still bytes per sample: decode them in ``loss_fn`` / the training step.
            ``False``: one dict per sample. ``None`` (the default): dicts, unless a
            ``SelectStage`` with its default collate reads the source directly or through
            a ``tn.Prefetcher`` (where it cannot change what the stage emits); a
            ``tn.Mapper`` (your decoder) or a DataLoader in between keeps dicts.
        **kwargs: see :class:`~es_pipe.sources.options.SourceOptions` (``shuffle``,
            ``seed``, ``epoch``, ``rank``, ``world_size``, ``worker``, ``num_workers``,
            ``equalize``, ``on_error``, ``pruned``, ``num_samples``, ``retry``,
            ``storage_options``).
    """

    def __init__(
        self,
        urls: str | Sequence[str] | ShardList,
        *,
        shuffle_buffer: int = 0,
        columnar: bool | None = None,
        **options: Unpack[SourceOptions],
    ) -> None:
        super().__init__(urls, **options)
        self._set_columnar(columnar)
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int):
            raise ConfigError(f"shuffle_buffer={shuffle_buffer!r} must be an int")
        if shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shuffle_buffer = int(shuffle_buffer)

    def iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[Any]]:
        chunks = self._dict_chunks(url, start, pruned, rng_seed)
        if not self.columnar:
            yield from chunks
            return
        try:
            for chunk in chunks:
                yield tar_blocks(url, chunk)
        finally:  # the shard's file is closed when the node closes this generator
            chunks.close()

    def _dict_chunks(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Generator[list[dict], None, None]:
        """The dict path's chunks of one shard (shuffled through the buffer if asked)."""
        if self.shuffle_buffer <= 0:
            yield from self._samples(url, start, pruned)
            return
        flat = (x for chunk in self._samples(url, 0, pruned) for x in chunk)
        out: list[dict] = []
        try:
            for sample in _skip(self._shuffled(flat, rng_seed), start):
                out.append(sample)
                if len(out) >= CHUNK:
                    yield out
                    out = []
        except Exception:  # hand out what was drawn before the problem
            if out:
                yield out
            raise
        if out:
            yield out

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng_seed: list[int]) -> Iterator[dict]:
        rng = np.random.default_rng(rng_seed)
        size = self.shuffle_buffer
        buf: list[dict] = []
        for sample in samples:
            if len(buf) < size:
                buf.append(sample)
                continue
            j = int(rng.integers(size))
            buf[j], sample = sample, buf[j]
            yield sample
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _samples(self, url: str, start: int, pruned: np.ndarray) -> Iterator[list[dict[str, Any]]]:
        """Chunks of the samples of one tar in tar order, minus pruned ones and the first
        ``start`` kept (see :func:`es_pipe.sources.tar.iter_tar_samples`)."""
        with contextlib.ExitStack() as stack:
            try:
                f: BinaryIO = stack.enter_context(self.ctx.open_file(url))  # type: ignore[assignment]
            except FileNotFoundError as exc:
                raise ShardError(
                    f"shard {url!r} does not exist; fix the shard list or restore the file"
                ) from exc
            compression = infer_compression(url)
            if compression is not None:  # the decompressor does not close f: the stack does
                f = stack.enter_context(compr[compression](f, mode="rb"))
            yield from iter_tar_samples(
                f,
                url,
                start=start,
                pruned=set(pruned.tolist()),
                bad_sample=self.ctx.bad_sample,
                check_count=lambda n: self.ctx.check_count(
                    url, n, why=" (a renamed member splits or merges samples)"
                ),
            )


_IDENTITY = ("__key__", "__shard__", "__index__")
_KEY, _INDEX = itemgetter("__key__"), itemgetter("__index__")


def tar_blocks(url: str, samples: list[dict[str, Any]]) -> list[ColumnChunk]:
    """The samples of one chunk as column chunks: one per run of consecutive samples with
    the same fields in the same order (one for a well-formed shard), so that the stage's
    meta-batches batch fields exactly as ``default_collate`` batches the dicts (the first
    sample's fields, in its order). Every step is one C-level call over the chunk
    (``map``/``itemgetter``, ``np.fromiter``), not Python per sample."""
    if not samples:
        return []
    shapes = list(map(tuple, samples))
    if shapes.count(shapes[0]) == len(shapes):
        bounds = [0, len(samples)]
    else:  # extensions differ (rare): cut where they change
        bounds = [0, *(i for i in range(1, len(shapes)) if shapes[i] != shapes[i - 1])]
        bounds.append(len(samples))
    blocks = []
    for a, b in itertools.pairwise(bounds):
        run = samples[a:b] if b - a < len(samples) else samples
        names = [name for name in shapes[a] if name not in _IDENTITY]
        keys = np.empty(b - a, dtype=object)
        keys[:] = list(map(_KEY, run))
        blocks.append(
            ColumnChunk(
                url,
                np.fromiter(map(_INDEX, run), np.int64, b - a),
                {name: list(map(itemgetter(name), run)) for name in names},
                keys,
                identity_first=True,
            )
        )
    return blocks


def _skip(it: Iterator[dict], n: int) -> Iterator[dict]:
    for i, x in enumerate(it):
        if i >= n:
            yield x
