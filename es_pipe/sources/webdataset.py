"""WebDataset ``.tar`` shards as a torchdata node.

The tar parsing is Python's ``tarfile`` in stream mode (what webdataset's
``tar_file_iterator`` uses), with webdataset's naming rules (``base_plus_ext``: files that
share the part of their name before the first dot form one sample; ``__*__`` metadata
members are ignored; extensions are lower-cased). Two things differ from webdataset on
purpose: the member bytes of a pruned or already-delivered sample are never extracted
(tarfile steps over them), and a shard that ends early, a member without a key or a key
that appears twice is an error rather than a silently shorter or merged sample.

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
import re
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from fsspec.compression import compr
from fsspec.utils import infer_compression
from webdataset.tariterators import base_plus_ext

from es_pipe.errors import ConfigError, ShardError
from es_pipe.sources.base import ShardedSource, SourceOptions
from es_pipe.sources.shards import ShardList

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["WebDatasetSource"]

_META = re.compile(r"__[^/]*__($|/)")
_BLOCK = 512


class _TailReader:
    """A read-only file wrapper that remembers the last bytes it returned.

    tarfile in stream mode treats a missing or garbled end-of-archive block as a normal
    end; keeping the tail lets the reader check the block where iteration stopped.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.pos = 0
        self._chunks: deque[tuple[int, bytes]] = deque(maxlen=4)

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        if b:
            self._chunks.append((self.pos, b))
            self.pos += len(b)
        return b

    def block_at(self, offset: int) -> bytes | None:
        """The bytes at ``[offset, offset + 512)`` that were read, None if no longer held."""
        if not self._chunks or self._chunks[0][0] > offset:
            return None
        data = b"".join(c for _, c in self._chunks)
        rel = offset - self._chunks[0][0]
        return data[rel : rel + _BLOCK]


class WebDatasetSource(ShardedSource):
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
        **kwargs: see :class:`~es_pipe.sources.base.ShardedSource` (``shuffle``, ``seed``,
            ``epoch``, ``rank``, ``world_size``, ``worker``, ``num_workers``, ``equalize``,
            ``on_error``, ``pruned``, ``num_samples``, ``retry``, ``storage_options``).
    """

    def __init__(
        self,
        urls: str | Sequence[str] | ShardList,
        *,
        shuffle_buffer: int = 0,
        **options: Unpack[SourceOptions],
    ) -> None:
        super().__init__(urls, **options)
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int):
            raise ConfigError(f"shuffle_buffer={shuffle_buffer!r} must be an int")
        if shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shuffle_buffer = int(shuffle_buffer)

    def _iter_shard(
        self, url: str, start: int, pruned: np.ndarray, rng_seed: list[int]
    ) -> Iterator[list[dict]]:
        if self.shuffle_buffer > 0:
            samples = _skip(self._shuffled(self._samples(url, 0, pruned), rng_seed), start)
        else:
            samples = self._samples(url, start, pruned)
        for sample in samples:
            yield [sample]

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

    def _samples(self, url: str, start: int, pruned: np.ndarray) -> Iterator[dict[str, Any]]:
        """Samples of one tar in tar order, minus pruned ones and the first ``start`` kept."""
        pruned_set = set(pruned.tolist())
        with contextlib.ExitStack() as stack:
            try:
                f: BinaryIO = stack.enter_context(self._open_file(url))  # type: ignore[arg-type]
            except FileNotFoundError as exc:
                raise ShardError(
                    f"shard {url!r} does not exist; fix the shard list or restore the file"
                ) from exc
            compression = infer_compression(url)
            if compression is not None:  # the decompressor does not close f: the stack does
                f = stack.enter_context(compr[compression](f, mode="rb"))
            tail = _TailReader(f)
            try:
                tf = tarfile.open(fileobj=tail, mode="r|")  # noqa: SIM115 (f is closed by `with`)
            except tarfile.ReadError as exc:
                raise ShardError(
                    f"shard {url!r} is not a readable tar ({exc}); re-create or re-download it"
                ) from exc
            ordinal = -1
            kept = 0
            key: str | None = None
            cur: dict[str, Any] | None = None
            seen: set[str] = set()
            try:
                for info in tf:
                    tf.members = []  # stream mode: do not accumulate TarInfo objects
                    name = info.name
                    if not info.isreg() or _META.match(name):
                        continue
                    prefix, suffix = base_plus_ext(name)
                    if prefix is None:
                        self._bad_sample(
                            f"shard {url!r}: member {name!r} has no key (webdataset names "
                            "are KEY.EXTENSION); rename or remove that member"
                        )
                        continue
                    if prefix != key:
                        if cur is not None:
                            yield cur
                        ordinal += 1
                        key, cur = prefix, None
                        if prefix in seen:
                            self._bad_sample(
                                f"shard {url!r}: key {prefix!r} appears twice (sample "
                                f"{ordinal}); keys must be unique and a sample's files "
                                "adjacent; rewrite the shard"
                            )
                            continue
                        seen.add(prefix)
                        if ordinal in pruned_set:
                            continue
                        kept += 1
                        if kept <= start:
                            continue
                        cur = {"__key__": prefix, "__shard__": url, "__index__": ordinal}
                    if cur is None:
                        continue  # pruned, delivered before a resume, or bad: not extracted
                    suffix = suffix.lower()
                    if suffix in cur:
                        self._bad_sample(
                            f"shard {url!r}: key {prefix!r} has two {suffix!r} files; "
                            "rewrite the shard with one file per extension"
                        )
                        cur = None
                        continue
                    member = tf.extractfile(info)
                    assert member is not None
                    cur[suffix] = member.read()
            except tarfile.ReadError as exc:
                raise ShardError(
                    f"shard {url!r} is truncated or corrupt near sample {ordinal} (key "
                    f"{key!r}): {exc}; re-create or re-download the shard"
                ) from exc
            end = tail.block_at(tf.offset)
            if end is None or len(end) < _BLOCK or end.count(0) != _BLOCK:
                raise ShardError(
                    f"shard {url!r} ends without a valid end-of-archive block after sample "
                    f"{ordinal} (key {key!r}): the file is truncated or corrupt; the last "
                    "sample was not delivered; re-create or re-download the shard"
                )
            # tar headers have a weak checksum: the count is checked before the last sample
            self._check_count(url, ordinal + 1, why=" (a renamed member splits or merges samples)")
            if cur is not None:
                yield cur


def _skip(it: Iterator[dict], n: int) -> Iterator[dict]:
    for i, x in enumerate(it):
        if i >= n:
            yield x
