"""Shard lists: which shards an epoch reads, in which order, and who reads each one.

A shard list is expanded once, in a fixed *listed order*, from a brace pattern
(``train-{000..099}.tar``), a glob (``gs://b/train/*.parquet``), an explicit list, or an
index file (one ``url [num_samples]`` per line). Every URL is an fsspec URL, so local
paths, ``memory://``, ``s3://``, ``gs://`` and ``http(s)://`` all work. A string that
names an existing file is that file, whatever characters its name holds (a pattern only
when no such file exists); :meth:`ShardList.literal` takes URLs exactly as written.

The *epoch order* is a pure function of ``(seed, epoch)``: a permutation drawn from a numpy
``Generator`` seeded with integers, never from ``hash()`` (which is salted per
interpreter). Every rank and worker computes the same order without talking to the others,
and a stream ``s`` of ``S`` streams (``S = world_size * num_workers``) reads the shards
``order[s::S]``. Every shard is read by exactly one stream, so every sample of the epoch is
read exactly once.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from braceexpand import UnbalancedBracesError, braceexpand  # type: ignore[attr-defined]  # not in its stubs

from es_pipe import storage
from es_pipe.errors import ConfigError, ShardError
from es_pipe.retry import Retry
from es_pipe.sources.world import resolve_rank as resolve_rank  # its old home
from es_pipe.sources.world import resolve_worker as resolve_worker

__all__ = [
    "ShardList",
    "epoch_order",
    "fingerprint",
    "url_seed",
]

_GLOB_CHARS = ("*", "?", "[")
_PATTERN_CHARS = (*_GLOB_CHARS, "{", "}")


@dataclass(frozen=True)
class ShardList:
    """An immutable list of shard URLs in listed order, with optional sample counts.

    ``num_samples[i]`` is the number of samples of ``urls[i]`` when known (from an index
    file, or filled in by a reader that can count cheaply), else ``-1``.

    ``storage_options``: fsspec filesystem arguments for the shards (credentials, an
    endpoint: see :mod:`es_pipe.storage`); a source given this list reads with them. They
    are not part of the list's identity (:attr:`digest`) and never enter a checkpoint.
    """

    urls: tuple[str, ...]
    num_samples: tuple[int, ...] = field(default=())
    storage_options: Mapping[str, Any] | None = field(
        default=None, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage_options", storage.check_options(self.storage_options))
        storage.remember(self.urls, self.storage_options)
        if not self.urls:
            raise ConfigError(
                "the shard list is empty: check the pattern, glob or index file "
                "(a glob that matches nothing gives an empty list)"
            )
        if len(set(self.urls)) != len(self.urls):
            dup = sorted({u for u in self.urls if self.urls.count(u) > 1})[:3]
            raise ConfigError(f"the shard list names a shard more than once: {dup}; list each once")
        if not self.num_samples:
            object.__setattr__(self, "num_samples", (-1,) * len(self.urls))
        if len(self.num_samples) != len(self.urls):
            raise ConfigError("num_samples must give one count per shard URL")

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def digest(self) -> str:
        """A short fingerprint of the listed order (crc32 hex), stored in checkpoints."""
        return f"{zlib.crc32(chr(10).join(self.urls).encode()):08x}"

    @classmethod
    def from_spec(
        cls,
        spec: str | Sequence[str] | ShardList,
        *,
        storage_options: Mapping[str, Any] | None = None,
        retry: Retry | int | None = None,
    ) -> ShardList:
        """Expand a brace pattern, glob, single URL or list of those into a ShardList.

        Brace patterns are expanded textually (no listing; a missing shard is reported when
        it is read). Globs are listed on their fsspec filesystem and sorted.

        A string (or a brace expansion of it) that names an existing file is taken
        literally: ``"/d/tr[1].parquet"`` is the file ``tr[1].parquet`` when that file
        exists, even if ``tr1.parquet`` exists too; only when no such file exists is it a
        glob (or a brace pattern). Strings without any of ``{ } * ? [`` are taken as
        written, without a lookup. To take every URL exactly as written, with no lookup,
        expansion or globbing at all (a missing shard is then reported when it is read),
        pass :meth:`ShardList.literal` instead of strings.

        ``storage_options`` are the fsspec filesystem arguments used to list globs and look
        files up, and kept on the list for the sources (a :class:`ShardList` passed in keeps
        its own unless ``storage_options`` is given). ``retry`` is the policy of those
        look-ups (:class:`es_pipe.Retry`; ``None``: ``Retry()``).
        """
        opts = storage.check_options(storage_options)
        if isinstance(spec, ShardList):
            if opts is None:
                return spec
            return cls(spec.urls, spec.num_samples, opts)
        if isinstance(spec, (str, os.PathLike)):
            spec = [os.fspath(spec)]
        if isinstance(spec, (bytes, Mapping)) or not isinstance(spec, Iterable):
            raise ConfigError(
                f"shards must be a URL, brace pattern, glob or a list of them, got "
                f"{type(spec).__name__}"
            )
        urls: list[str] = []
        for item in spec:
            if not isinstance(item, str):
                raise ConfigError(f"shard URLs must be strings, got {type(item).__name__}")
            if any(c in item for c in _PATTERN_CHARS) and _is_file(item, opts, retry):
                urls.append(item)  # a file with braces or glob characters in its name
                continue
            try:
                expanded = list(braceexpand(item))
            except UnbalancedBracesError as exc:
                raise ConfigError(f"shard pattern {item!r}: {exc}; fix the braces") from None
            for url in expanded:
                if any(c in url for c in _GLOB_CHARS) and (
                    url == item or not _is_file(url, opts, retry)
                ):
                    urls.extend(_glob(url, opts, retry))
                else:
                    urls.append(url)
        return cls(tuple(urls), storage_options=opts)

    @classmethod
    def literal(
        cls,
        urls: Iterable[str],
        num_samples: Iterable[int] | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ShardList:
        """A shard list of URLs exactly as written: no brace expansion, no globbing, no
        lookup (``ShardList.literal(["/d/tr[1].parquet"])`` always means that file).
        ``num_samples``, if given, holds one sample count per URL."""
        if isinstance(urls, (str, bytes)) or not isinstance(urls, Iterable):
            raise ConfigError("ShardList.literal takes a list of URLs, not a single string")
        listed = tuple(urls)
        if not all(isinstance(u, str) for u in listed):
            raise ConfigError("shard URLs must be strings")
        counts = () if num_samples is None else tuple(int(n) for n in num_samples)
        return cls(listed, counts, storage_options)

    @classmethod
    def from_index(
        cls,
        index_url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        retry: Retry | int | None = None,
    ) -> ShardList:
        """Read an index file: one ``url [num_samples]`` per line, ``#`` starts a comment.

        Relative URLs are taken relative to the index file's directory (the layout that
        :func:`es_pipe.shard_writer.write_shards` writes). ``storage_options`` are used to
        read the index and kept for the shards it lists; ``retry`` is the policy of that
        read (:class:`es_pipe.Retry`; ``None``: ``Retry()``).
        """
        opts = storage.check_options(storage_options)
        missing = f"index file {index_url!r} does not exist; check the URL"
        with storage.named_errors(index_url, missing=missing):
            fs, path = storage.url_to_fs(index_url, opts)
            text = Retry.of(retry).call(fs.cat_file, path, what=f"read {index_url}")
            try:
                lines = text.decode("utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise ShardError(
                    f"index file {index_url!r} is not UTF-8 text ({exc}); give the index file "
                    "that write_shards (or es-pipe shard) wrote"
                ) from exc
        base = index_url.rsplit("/", 1)[0] if "/" in index_url else "."
        urls, counts = [], []
        for lineno, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                raise ShardError(
                    f"index file {index_url!r} line {lineno}: expected 'url [num_samples]', "
                    f"got {line!r}; fix that line"
                )
            url = parts[0]
            if "://" not in url and not url.startswith("/"):
                url = f"{base}/{url}"
            urls.append(url)
            counts.append(int(parts[1]) if len(parts) == 2 else -1)
        return cls(tuple(urls), tuple(counts), opts)


def _is_file(
    url: str, storage_options: Mapping[str, Any] | None = None, retry: Retry | int | None = None
) -> bool:
    """Whether ``url`` names an existing file, taken literally (no pattern)."""
    fs, path = storage.url_to_fs(url, storage_options)
    try:  # not fs.isfile: it answers False for every error, missing credentials included
        info = Retry.of(retry).call(fs.info, path, what=f"info {url}")
    except (FileNotFoundError, NotADirectoryError) as exc:
        storage.raise_storage_error(exc, url)
        return False
    except Exception as exc:  # a storage misconfiguration is named; anything else: no file
        storage.raise_storage_error(exc, url)
        return False
    return info.get("type") == "file"


def _glob(
    pattern: str, storage_options: Mapping[str, Any] | None = None, retry: Retry | int | None = None
) -> list[str]:
    """List a glob, spelling each match the way the pattern spells its fixed prefix
    (``memory://d/x-*`` lists ``memory://d/x-0``, a relative pattern stays relative)."""
    fs, path = storage.url_to_fs(pattern, storage_options)
    with storage.named_errors(pattern):
        found = sorted(Retry.of(retry).call(fs.glob, path, what=f"glob {pattern}"))
    cut = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
    head = pattern[:cut].rsplit("/", 1)[0] + "/" if "/" in pattern[:cut] else ""
    stripped = fs._strip_protocol(head).rstrip("/") + "/" if head else ""
    out = []
    for p in found:
        if head and p.startswith(stripped):
            out.append(head + p[len(stripped) :])
        elif "://" in pattern:
            out.append(fs.unstrip_protocol(p))
        else:
            out.append(p)
    return out


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The listed-order indices of ``n`` shards in the order epoch ``epoch`` reads them."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), 0x5A4D])
    return rng.permutation(n).astype(np.int64)


def url_seed(seed: int, epoch: int, url: str) -> list[int]:
    """Integer seed material for per-shard randomness (within-shard shuffles)."""
    return [int(seed), int(epoch), zlib.crc32(url.encode()), 0x5348]


def fingerprint(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    retry: Retry | int | None = None,
    missing: str = "raise",
) -> dict[str, Any] | None:
    """The identity of a shard's bytes: ``{"url", "size", "etag", "mtime"}``; the one
    fingerprint of es_pipe (sources and manifests alike).

    ``etag`` comes from object stores (None on local disks); ``mtime`` is a float of
    seconds or an ISO string, whatever the filesystem reports (None if nothing). Manifests
    store it and refuse a shard whose fingerprint changed. The lookup is retried under
    ``retry`` (:class:`es_pipe.Retry`; ``None``: ``Retry()``). A storage that refuses (no
    credentials, no bucket) is always a ``StorageError``.

    ``missing`` is the policy for a URL that names no file: ``"raise"`` (a
    :class:`ShardError`: a listed shard must exist) or ``"none"`` (``None``: the name of
    an in-memory source, a directory or an unreachable path has no fingerprint to record
    or check; what manifests use).
    """
    if missing not in ("raise", "none"):
        raise ConfigError(f"missing={missing!r}: give 'raise' or 'none'")
    try:
        fs, path = storage.url_to_fs(url, storage_options)
        info = Retry.of(retry).call(fs.info, path, what=f"info {url}")
    except FileNotFoundError as exc:
        storage.raise_storage_error(exc, url)
        if missing == "none":
            return None
        raise ShardError(f"shard {url!r} does not exist; check the shard list") from exc
    except (ValueError, ImportError, OSError) as exc:
        storage.raise_storage_error(exc, url)
        if missing == "none":
            return None
        raise
    except Exception as exc:
        storage.raise_storage_error(exc, url)
        raise
    if missing == "none" and info.get("type") != "file":
        return None
    return fingerprint_of(url, info)


def fingerprint_of(url: str, info: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint from an ``fs.info`` answer already at hand."""
    etag = info.get("ETag", info.get("etag"))
    mtime: Any = None
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            mtime = info[key]
            break
    if isinstance(mtime, datetime):
        mtime = mtime.isoformat()
    return {
        "url": url,
        "size": int(info.get("size") or 0),
        "etag": str(etag).strip('"') if etag is not None else None,
        "mtime": mtime,
    }
