"""``es-pipe shard``: write a folder of files or a table into WebDataset or Parquet shards
(with :func:`es_pipe.shard_writer.write_shards`), and their index file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from es_pipe import storage
from es_pipe.errors import EsPipeError
from es_pipe.shard_writer import _short
from es_pipe.tools.argtypes import add_command, positive_int


def add_shard_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "shard",
        _shard,
        help="write a folder of files or a table into WebDataset or Parquet shards",
        description=(
            "Shard data so that es_pipe's sources can stream it. SOURCE is a folder of "
            "files (files sharing a basename form one sample, the webdataset convention), "
            "or a table: .parquet, .arrow/.feather (Arrow IPC) or .npz (equal-length "
            "arrays). An index file (shard URL and sample count per line) is written next "
            "to the shards; `equalize=` and ShardList.from_index read it."
        ),
        epilog=(
            "examples:\n"
            "  es-pipe shard photos/ 'data/train-%06d.tar' --per-shard 5000\n"
            "  es-pipe shard tokens.parquet 's3://bucket/train-%06d.parquet' --format parquet\n"
            "  es-pipe shard raw/ 's3://bucket/train-%06d.tar' \\\n"
            "      --storage-option client_kwargs.endpoint_url=http://localhost:9000\n"
        ),
    )
    parser.add_argument("source", help="a folder of files, or a .parquet/.arrow/.feather/.npz")
    parser.add_argument("out", help="output URL pattern with one printf field, e.g. out-%%06d.tar")
    parser.add_argument(
        "--format",
        choices=("tar", "parquet"),
        default=None,
        help="shard format (default: from the pattern's extension)",
    )
    parser.add_argument(
        "--per-shard",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="samples per shard (default 10000)",
    )
    parser.add_argument(
        "--row-group",
        type=positive_int,
        default=None,
        metavar="N",
        help="Parquet row-group rows (default 1024); a row group whose rows are all pruned "
        "is never read, so smaller groups let pruning skip more bytes",
    )
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read files that symbolic links in the SOURCE folder point to outside it "
        "(default: such links are refused)",
    )
    storage.add_storage_argument(parser)


def _shard(args: argparse.Namespace) -> int:
    import pyarrow as pa

    try:
        return _shard_files(args)
    except EsPipeError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:  # unreadable table, bad output URL
        raise EsPipeError(
            f"could not shard {_short(args.source)} into {_short(args.out)}: "
            f"{type(exc).__name__}: {_short(str(exc), 500)}"
        ) from exc


def _shard_files(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from es_pipe.shard_writer import check_out_pattern, samples_from_folder, write_shards

    check_out_pattern(args.out)  # before any work, and before formatting it
    source = Path(args.source)
    fmt: Literal["tar", "parquet"] = args.format or (
        "parquet" if args.out.endswith(".parquet") else "tar"
    )
    if source.is_dir():
        samples = samples_from_folder(str(source), follow_symlinks=args.follow_symlinks)
        data = tqdm(samples, desc="samples", unit=" samples")
    elif source.suffix == ".parquet":
        data = pq.read_table(source)
    elif source.suffix in (".arrow", ".feather"):
        with pa.memory_map(str(source)) as stream:
            data = pa.ipc.open_file(stream).read_all()
    elif source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as arrays:
            data = {name: arrays[name] for name in arrays.files}
    elif not source.exists():
        raise EsPipeError(
            f"{_short(str(source))} does not exist: give a folder or a table file to shard"
        )
    else:
        raise EsPipeError(
            f"cannot shard {_short(str(source))}: give a folder of files or a .parquet, "
            ".arrow, .feather or .npz table"
        )
    options = storage.options_from_cli(getattr(args, "storage_option", None))
    urls = write_shards(
        data,
        args.out,
        fmt,
        args.per_shard,
        row_group_rows=args.row_group,
        storage_options=options,
    )
    if not urls:
        raise EsPipeError(f"{_short(str(source))} holds no samples: nothing was written")
    print(f"wrote {len(urls)} {fmt} shards: {urls[0]} .. {urls[-1]}")
    return 0
