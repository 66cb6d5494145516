"""``es-pipe index``: count the samples of shards es_pipe did not write (with
:func:`es_pipe.indexing.index_shards`) into the index file ``equalize=`` reads."""

from __future__ import annotations

import argparse

from es_pipe import storage
from es_pipe.tools.argtypes import add_command, positive_int


def add_index_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "index",
        _index,
        help="count the samples of existing shards and write the index file equalize= reads",
        description=(
            "Count the samples of shards that es_pipe did not write (webdataset.TarWriter "
            "tars, Parquet or Arrow files written by anything), local or remote, in "
            "parallel, and write an index file (shard URL and sample count per line). "
            "Pass ShardList.from_index(OUT) as a source's URLs to use "
            "equalize='drop'|'pad' across ranks."
        ),
        epilog=(
            "examples:\n"
            "  es-pipe index 'data/train-{000000..000127}.tar' --out data/index.txt\n"
            "  es-pipe index 's3://bucket/train/*.parquet' --out s3://bucket/train/index.txt \\\n"
            "      --storage-option client_kwargs.endpoint_url=http://localhost:9000\n"
        ),
    )
    parser.add_argument(
        "shards", nargs="+", help="shard URLs, brace patterns or globs (quote them)"
    )
    parser.add_argument("--out", required=True, help="the index file to write (local or URL)")
    parser.add_argument(
        "--format",
        choices=("tar", "parquet", "arrow"),
        default=None,
        help="shard format (default: from each name)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=8,
        metavar="N",
        help="shards counted at once (threads, default 8)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    storage.add_storage_argument(parser)


def _index(args: argparse.Namespace) -> int:
    from es_pipe.indexing import index_shards

    listed = index_shards(
        args.shards,
        args.out,
        format=args.format,
        storage_options=storage.options_from_cli(args.storage_option),
        jobs=args.jobs,
        progress=not args.no_progress,
    )
    total = sum(listed.num_samples)
    print(f"indexed {len(listed)} shards, {total} samples: {args.out}")
    return 0
