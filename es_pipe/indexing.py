"""Count the samples of existing shards and write the index file that ``equalize=`` reads.

``equalize="drop"|"pad"`` and the even split across ranks need every shard's sample count
before the epoch starts. Shards that :func:`~es_pipe.shard_writer.write_shards` (or
``es-pipe shard``) wrote come with an index file; shards written by anything else
(``webdataset.TarWriter``, ``pyarrow.parquet.write_table``, a Spark job) do not. This
module counts them, in parallel threads, and writes the same index file format
(:meth:`~es_pipe.sources.ShardList.from_index` reads it): one ``url count`` per line, URLs
relative to the index file's folder where the shard lies under it.

How a shard is counted, by format (from the name, or ``format=``):

* ``tar`` (``.tar``, ``.tar.gz`` and the other compressions fsspec infers from the
  name): the tar headers are read in stream mode and member bytes are stepped over,
  never extracted. A sample is a run of adjacent members sharing a key (webdataset's rule,
  exactly as
  :class:`~es_pipe.sources.WebDatasetSource` counts it); a truncated tar is a
  :class:`~es_pipe.ShardError`, never a short count.
* ``parquet``: the row count in the footer (no data page is read).
* ``arrow`` (``.arrow``, ``.feather``, ``.ipc``): the rows of an Arrow IPC file (record
  batch metadata) or stream.

From the command line: ``es-pipe index 'data/train-*.tar' --out data/index.txt``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, BinaryIO, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

from es_pipe import storage
from es_pipe.errors import ConfigError, EsPipeError, ShardError
from es_pipe.retry import Retry, RetryingFile
from es_pipe.sources.shards import ShardList
from es_pipe.sources.tar import iter_tar_samples

__all__ = ["count_samples", "format_of", "index_shards", "index_text"]

Format = Literal["tar", "parquet", "arrow"]
_ARROW_SUFFIXES = (".arrow", ".feather", ".ipc", ".arrows")


def format_of(url: str) -> Format:
    """The shard format its name says (``.tar[.gz]``, ``.parquet``, ``.arrow``/``.feather``);
    a :class:`ConfigError` naming ``--format`` when the name says none."""
    name = url.rsplit("/", 1)[-1].lower()
    if infer_compression(name) is not None and "." in name:
        name = name.rsplit(".", 1)[0]  # train-0.tar.gz -> train-0.tar
    if name.endswith(".tar"):
        return "tar"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(_ARROW_SUFFIXES):
        return "arrow"
    raise ConfigError(
        f"cannot tell the shard format of {url!r} from its name; pass format='tar', "
        "'parquet' or 'arrow' (es-pipe index --format ...)"
    )


@contextlib.contextmanager
def _open(url: str, storage_options: Mapping[str, Any] | None, retry: Retry) -> Iterator[Any]:
    fs, path = storage.url_to_fs(url, storage_options)
    missing = f"shard {url!r} does not exist; check the shard list"
    with storage.named_errors(url, missing=missing):
        try:
            if isinstance(fs, LocalFileSystem):
                f: Any = open(path, "rb")  # noqa: SIM115 (closed by the with below)
            else:
                f = RetryingFile(fs, path, url=url, retry=retry)
        except IsADirectoryError as exc:
            raise ShardError(
                f"{url!r} is a folder, not a shard; give its shard files (a glob such as "
                f"'{url.rstrip('/')}/*.tar')"
            ) from exc
    with f:
        yield f


def _count_tar(url: str, f: BinaryIO) -> int:
    """Samples in a tar, counted by the tar reader itself from the headers alone (every
    payload is skipped, never read into memory): a truncated or corrupt tar raises
    ``ShardError``, never a short count."""
    counted: list[int] = []
    with contextlib.ExitStack() as stack:
        compression = infer_compression(url)
        if compression is not None:
            f = stack.enter_context(compr[compression](f, mode="rb"))
        for _ in iter_tar_samples(
            f,
            url,
            start=sys.maxsize,  # hand out no sample: count them
            pruned=set(),
            bad_sample=_refuse,  # a shard the reader would refuse gets no count
            check_count=counted.append,
        ):
            pass
    return counted[-1] if counted else 0


def _refuse(message: str) -> None:
    raise ShardError(message + " (before it can be indexed)")


def _count_arrow(url: str, f: Any) -> int:
    head = f.read(6)
    f.seek(0)
    try:
        if head == b"ARROW1":
            reader = pa.ipc.open_file(f)
            if hasattr(reader, "count_rows"):  # pyarrow >= 17: batch metadata only
                return int(reader.count_rows())
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        return sum(batch.num_rows for batch in pa.ipc.open_stream(f))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(
            f"shard {url!r} is not a readable Arrow IPC file or stream ({exc}); re-create it"
        ) from exc


def count_samples(
    url: str,
    *,
    format: Format | None = None,
    storage_options: Mapping[str, Any] | None = None,
    retry: Retry | int | None = None,
) -> int:
    """The number of samples of one shard (see the module docstring for how).

    Raises :class:`~es_pipe.ShardError` for a missing, truncated or unreadable shard and
    :class:`~es_pipe.StorageError` for storage that cannot be reached as configured.
    """
    fmt = format or format_of(url)
    if fmt not in ("tar", "parquet", "arrow"):
        raise ConfigError(f"format={fmt!r} must be 'tar', 'parquet' or 'arrow'")
    opts = storage.check_options(storage_options)
    try:
        with _open(url, opts, Retry.of(retry)) as f:
            if fmt == "tar":
                return _count_tar(url, f)
            if fmt == "arrow":
                return _count_arrow(url, f)
            try:
                return int(pq.ParquetFile(f).metadata.num_rows)
            except (pa.ArrowInvalid, OSError) as exc:
                storage.raise_storage_error(exc, url)
                raise ShardError(
                    f"shard {url!r} is not a readable Parquet file ({exc}); re-create it"
                ) from exc
    except EsPipeError:
        raise
    except Exception as exc:
        storage.raise_storage_error(exc, url)
        raise


def _local(url: str) -> bool:
    return storage.protocol_of(url) in ("", "file", "local")


def index_text(urls: Sequence[str], counts: Sequence[int], index_url: str) -> str:
    """The index file's text: ``name count`` per line, ``name`` relative to the index
    file's folder where the shard lies under it (what ``ShardList.from_index`` resolves),
    else its absolute path or full URL."""
    lines = []
    if _local(index_url):
        base = os.path.dirname(os.path.abspath(index_url.split("://", 1)[-1]))
    else:
        base = index_url.rsplit("/", 1)[0]
    for url, n in zip(urls, counts, strict=True):
        if any(c.isspace() for c in url) or "#" in url:
            raise ConfigError(
                f"shard URL {url!r} holds a space or '#', which an index file cannot hold; "
                "rename the shard"
            )
        name = url
        if _local(url) and _local(index_url):
            path = os.path.abspath(url.split("://", 1)[-1])
            name = path[len(base) + 1 :] if path.startswith(base + os.sep) else path
        elif url.startswith(base + "/"):
            name = url[len(base) + 1 :]
        lines.append(f"{name} {int(n)}\n")
    return "".join(lines)


def index_shards(
    shards: str | Sequence[str] | ShardList,
    out: str | None = None,
    *,
    format: Format | None = None,
    storage_options: Mapping[str, Any] | None = None,
    jobs: int = 8,
    progress: bool = False,
    retry: Retry | int | None = None,
) -> ShardList:
    """Count the samples of every shard (``jobs`` threads at once) and, if ``out`` is
    given, write the index file there.

    Args:
        shards: brace patterns, globs, URLs, a list of those, or a :class:`ShardList`.
        out: the index file to write (any fsspec URL), e.g. ``"data/index.txt"``; pass it
            to ``ShardList.from_index`` (or as the source's ``urls``) to get ``equalize=``.
        format: ``"tar"``, ``"parquet"`` or ``"arrow"``; default from each shard's name.
        storage_options: fsspec filesystem arguments for the shards and the index file.
        jobs: shards counted at once (threads: the work is I/O).
        progress: show a tqdm progress bar (on stderr) with the shards counted.

    Returns:
        The :class:`ShardList` with every count filled in. Nothing is written when a shard
        cannot be counted: the first such error is raised.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} must be an int >= 1")
    opts = storage.check_options(storage_options)
    listed = ShardList.from_spec(shards, storage_options=opts, retry=retry)
    fmts = [format or format_of(u) for u in listed.urls]  # every name checked before reading
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(listed), desc="shards counted", unit=" shards")
    counts = [0] * len(listed)
    pool = ThreadPoolExecutor(max_workers=min(jobs, len(listed)))
    try:
        futures = {
            pool.submit(count_samples, u, format=f, storage_options=opts, retry=retry): i
            for i, (u, f) in enumerate(zip(listed.urls, fmts))
        }
        for future in as_completed(futures):  # the first failure stops the rest
            counts[futures[future]] = future.result()
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    result = ShardList(listed.urls, tuple(counts), opts)
    if out is not None:
        text = index_text(result.urls, counts, out).encode("utf-8")
        _write(out, text, opts)
    return result


def _write(url: str, data: bytes, options: Mapping[str, Any] | None) -> None:
    """Write the index file whole: a local one through a temporary file and a rename (a
    crash never leaves half an index), a remote one in one PUT."""
    fs, path = storage.url_to_fs(url, options)
    try:
        if isinstance(fs, LocalFileSystem):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise ConfigError(
                    f"the folder of the index file {url!r} does not exist; create it first"
                )
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)
    except EsPipeError:
        raise
    except Exception as exc:
        storage.raise_storage_error(exc, url)
        raise
