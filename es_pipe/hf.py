"""Hugging Face ``datasets`` streaming with stable sample identities: :func:`from_hf`.

ES scores follow a sample by its identity ``(shard, key)``. A streaming
``datasets.IterableDataset`` gives neither: its examples carry no file name, and an index
from ``map(with_indices=True)`` counts what one worker (or one epoch) has seen, so it
repeats across DataLoader workers and changes with ``shuffle()``. Scores of different
samples then pile onto one key.

:func:`from_hf` builds the streaming dataset so that every example carries its identity:

* ``__shard__``: the data file it comes from (the URL as listed; one HF shard per file);
* ``__index__``: its row number in that file;
* ``__key__``: the value of ``key_column`` as text, or the row number as text.

These do not depend on workers, epochs, ``shuffle()`` (which reorders files and mixes rows
through a buffer) or resumption. Each file is read by ``datasets`` itself
(``load_dataset(path, data_files=[file], streaming=True)``), so decoding, features and
``storage_options`` are HF's. Resume works through HF's own ``state_dict()`` /
``load_state_dict()`` (``datasets >= 2.18``): HF records the file and the number of
examples delivered from it, and on resume skips those (re-reading them, not yielding
them), so the identities after a resume are those of an uninterrupted run.

Example::

    ds = es_pipe.from_hf("parquet", data_files="data/train-*.parquet")
    ds = ds.shuffle(seed=0, buffer_size=1000)  # optional: identities stay the same
    # the stage, over ds or a DataLoader(ds, batch_size=None, ...)
    loader = tn.Loader(es_pipe.SelectStage(ds, sampler))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from es_pipe import storage
from es_pipe.errors import ConfigError
from es_pipe.sources.shards import ShardList

__all__ = ["from_hf"]

_IDENTITY = ("__key__", "__shard__", "__index__")
_BATCH = 1024  # rows HF formats at a time


def _rows(
    files: list[str],
    path: str,
    split: str,
    key_column: str | None,
    storage_options: dict[str, Any] | None,
    load_kwargs: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """The generator HF shards over ``files``: each file's rows, identities added."""
    import datasets

    for file in files:
        part = datasets.load_dataset(
            path,
            data_files=[file],
            split=split,
            streaming=True,
            storage_options=storage_options,
            **load_kwargs,
        )
        row = 0
        # .iter(): the file is read whole here; the outer dataset (one shard per file) is
        # what DataLoader workers and split_dataset_by_node divide, never this one
        for batch in part.iter(batch_size=_BATCH):
            names = list(batch)
            n = len(batch[names[0]]) if names else 0
            if key_column is not None:
                keys = batch[key_column]
                if any(k is None for k in keys):
                    raise ConfigError(
                        f"{file!r}: key_column {key_column!r} is null in a row; give a "
                        "column with a value in every row, or key_column=None (the row number)"
                    )
                keys = [str(k) for k in keys]
            else:
                keys = [str(i) for i in range(row, row + n)]
            columns = [batch[name] for name in names]
            for i in range(n):
                example = {name: col[i] for name, col in zip(names, columns)}
                example["__key__"] = keys[i]
                example["__shard__"] = file
                example["__index__"] = row + i
                yield example
            row += n


def from_hf(
    path: str = "parquet",
    data_files: str | Sequence[str] | None = None,
    *,
    split: str = "train",
    key_column: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    **load_kwargs: Any,
) -> Any:
    """A streaming ``datasets.IterableDataset`` whose examples carry stable identities.

    Args:
        path: the ``datasets`` builder, as in ``load_dataset(path, ...)``: ``"parquet"``,
            ``"json"``, ``"csv"``, ``"arrow"``, ``"text"``...
        data_files: a URL, glob or brace pattern, or a list of those (local or any fsspec
            URL); expanded and sorted by es_pipe, each file one HF shard.
        split: the split name HF gives the files (``"train"``).
        key_column: a column whose value names the sample (unique within its file);
            default the row number in the file.
        storage_options: fsspec filesystem arguments (credentials, endpoint) for listing
            the files and for HF reading them.
        **load_kwargs: passed on to ``datasets.load_dataset`` (``columns=``,
            ``features=``...).

    Returns:
        ``datasets.IterableDataset`` with the files' columns plus ``__key__`` (str),
        ``__shard__`` (str: the file) and ``__index__`` (int: the row in the file).
        ``shuffle``, ``map``, ``filter``, ``state_dict``, DataLoader workers and
        ``split_dataset_by_node`` work as on any streaming dataset.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            "from_hf needs Hugging Face datasets: pip install 'datasets>=2.18'"
        ) from exc
    if data_files is None:
        raise ConfigError(
            "from_hf needs data_files= (a glob, pattern or list of files), as "
            "load_dataset('parquet', data_files=...) does"
        )
    if not isinstance(path, str) or not path:
        raise ConfigError(f"path={path!r} must name a datasets builder, e.g. 'parquet'")
    if key_column is not None and (not isinstance(key_column, str) or key_column in _IDENTITY):
        raise ConfigError(f"key_column={key_column!r} must be the name of a data column")
    opts = storage.check_options(storage_options)
    files = list(ShardList.from_spec(data_files, storage_options=opts).urls)
    first = datasets.load_dataset(
        path,
        data_files=[files[0]],
        split=split,
        streaming=True,
        storage_options=opts,
        **load_kwargs,
    )
    features = first.features
    if features is not None:
        clash = [name for name in _IDENTITY if name in features]
        if clash:
            raise ConfigError(
                f"the data already has columns {clash}: es_pipe adds them; rename those "
                "columns (or build the identity yourself)"
            )
        features = datasets.Features(
            {
                **features,
                "__key__": datasets.Value("string"),
                "__shard__": datasets.Value("string"),
                "__index__": datasets.Value("int64"),
            }
        )
    if key_column is not None and features is not None and key_column not in features:
        raise ConfigError(
            f"key_column={key_column!r} is not a column of {files[0]!r}; its columns: "
            f"{sorted(first.features)}"
        )
    return datasets.IterableDataset.from_generator(
        _rows,
        features=features,
        gen_kwargs={
            "files": files,  # a list: HF makes one shard per file
            "path": path,
            "split": split,
            "key_column": key_column,
            "storage_options": opts,
            "load_kwargs": dict(load_kwargs),
        },
    )
