"""Fuzz pass over shard bytes: valid tar, Parquet and Arrow IPC shards written by es_pipe,
then mutated (bit flips, truncation, chunks overwritten, bytes inserted or deleted, header
and footer corruption) and read back under ``on_error="raise"`` and ``on_error="skip"``.

Every read must end in one of:

* the correct result for the bytes on disk, or
* an es_pipe error (``ShardError``) naming the shard ("raise"), or
* under "skip": a correct subset of the samples, with every sample left out counted in
  ``source.stats`` (``skipped_samples`` / ``skipped_shards``).

Never a crash inside a dependency (tarfile.ReadError, ArrowInvalid, an aborted process), a
hang (pytest-timeout), or fewer or different samples without an error.

What a format cannot detect is stated, and checked as exactly as the format allows:

* tar has no checksum over member bytes, and its header checksum is a plain byte sum (two
  compensating bit flips rename a member). The oracle is exact anyway: a read that succeeds
  must return what ``tarfile`` itself reads from the mutated bytes. With the sample count
  known (the index file write_shards writes; here ``num_samples=``), a renamed member
  that splits or merges samples is a ShardError.
* Arrow IPC has no checksums at all: bytes changed, inserted or deleted inside a
  record-batch message (its body, or its metadata, which holds the buffers' offsets into
  the body) may change values (never the keys, ordinals or the number of rows of
  a read that succeeds); under "skip" such a batch may be delivered before a later one
  fails. Changes anywhere else (schema, message headers, footer) must give an error or
  the original rows.
* Parquet shards written by es_pipe carry page CRCs, which ParquetSource verifies: any
  change must give an error or the original rows.
"""

from __future__ import annotations

import io
import itertools
import tarfile
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest
from _sweep import SCALES, es_error_or_ok, sweep
from hypothesis import strategies as st
from webdataset.tariterators import base_plus_ext

from es_pipe.errors import ShardError
from es_pipe.shard_writer import write_shards
from es_pipe.sources import ArrowSource, ParquetSource, WebDatasetSource

SOURCES = {"tar": WebDatasetSource, "parquet": ParquetSource, "arrow": ArrowSource}


# --------------------------------------------------------------------------- originals


def _tar_shard(base) -> bytes:
    samples = [
        {"__key__": f"k{i:03d}", "txt": f"sample {i} " * (i % 4 + 1), "cls": i, "npy": np.arange(i)}
        for i in range(10)
    ]
    (url,) = write_shards(samples, f"{base}/t-%03d.tar", "tar", 100, index=False)
    with open(url, "rb") as f:
        return f.read()


def _table() -> pa.Table:
    n = 40
    return pa.table(
        {
            "id": [f"row{i:03d}" for i in range(n)],
            "x": np.arange(n, dtype=np.int64) * 7,
            "f": np.linspace(0.0, 1.0, n),
            "tokens": [list(range(i % 6)) for i in range(n)],
            "blob": [bytes([i]) * (i % 5) for i in range(n)],
        }
    )


def _parquet_shard(base) -> bytes:
    (url,) = write_shards(
        _table(), f"{base}/p-%03d.parquet", "parquet", 100, row_group_rows=8, index=False
    )
    with open(url, "rb") as f:
        return f.read()


def _arrow_shard() -> bytes:
    table = _table()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=8):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _tar_members(data: bytes) -> list[tuple[str, str, int, int]]:
    """(key, ext, data offset, size) of every member, in tar order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        out = []
        for info in tf.getmembers():
            key, ext = base_plus_ext(info.name)
            out.append((key, ext, info.offset_data, info.size))
        return out


def _arrow_bodies(data: bytes, whole: bool = False) -> list[tuple[int, int]]:
    """[start, end) of every record batch body of an Arrow IPC file, or with ``whole`` of
    every record batch message (metadata and body: the bytes a format without checksums
    may let through changed; the metadata holds the buffers' offsets into the body)."""
    reader = pa.BufferReader(data)
    reader.seek(8)  # "ARROW1\0\0"
    bodies = []
    n_batches = pa.ipc.open_file(data).num_record_batches
    for i in range(1 + n_batches):  # the schema message, then the batches
        start = reader.tell()
        message = pa.ipc.read_message(reader)
        end = reader.tell()
        size = message.body.size if message.body is not None else 0
        if i and whole:
            bodies.append((start, end))
        elif size:
            bodies.append((end - size, end))
    return bodies


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    base = tmp_path_factory.mktemp("originals")
    tar, parquet, arrow = _tar_shard(base), _parquet_shard(base), _arrow_shard()
    members = _tar_members(tar)
    footer = int.from_bytes(parquet[-8:-4], "little") + 8
    return {
        "tar": {
            "bytes": tar,
            "members": members,
            # headers: every member's 512-byte header, and the end-of-archive blocks
            "headers": [(off - 512, off) for _, _, off, _ in members]
            + [(members[-1][2] + members[-1][3], len(tar))],
        },
        "parquet": {
            "bytes": parquet,
            "headers": [(0, 4), (len(parquet) - footer, len(parquet))],
        },
        "arrow": {
            "bytes": arrow,
            "bodies": _arrow_bodies(arrow, whole=True),
            "headers": [(0, 64), (len(arrow) - 256, len(arrow))],
        },
    }


# --------------------------------------------------------------------------- mutations


@st.composite
def mutations(draw, size: int, headers: list[tuple[int, int]]):
    """One corruption of a file of ``size`` bytes: ``(kind, params)``."""
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "header", "insert", "delete"]))
    pos = st.integers(0, size - 1)
    if kind == "flip":
        flips = draw(st.lists(st.tuples(pos, st.integers(0, 7)), min_size=1, max_size=4))
        return kind, tuple(flips)
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "overwrite":
        return kind, (draw(pos), draw(st.binary(min_size=1, max_size=256)))
    if kind == "header":
        lo, hi = draw(st.sampled_from(headers))
        at = draw(st.integers(lo, max(lo, min(hi, size) - 1)))
        return kind, (at, draw(st.binary(min_size=1, max_size=8)))
    if kind == "insert":
        return kind, (draw(pos), draw(st.binary(min_size=1, max_size=64)))
    return kind, (draw(pos), draw(st.integers(1, 64)))


def mutate(data: bytes, mutation) -> tuple[bytes, set[int] | None]:
    """The mutated bytes, and the positions changed in place (None: the layout shifted)."""
    kind, params = mutation
    b = bytearray(data)
    if kind == "flip":
        for at, bit in params:
            b[at] ^= 1 << bit
        return bytes(b), {at for at, _ in params}
    if kind == "truncate":
        return bytes(b[:params]), None
    if kind in ("overwrite", "header"):
        at, chunk = params
        chunk = chunk[: len(b) - at]
        changed = {at + i for i, c in enumerate(chunk) if b[at + i] != c}
        b[at : at + len(chunk)] = chunk
        return bytes(b), changed
    if kind == "insert":
        at, chunk = params
        return bytes(b[:at] + chunk + b[at:]), None
    at, n = params
    return bytes(b[:at] + b[at + n :]), None


# --------------------------------------------------------------------------- oracles

_files = itertools.count()


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _norm(samples: list[dict]) -> list[dict]:
    return [{k: _plain(v) for k, v in s.items() if k != "__shard__"} for s in samples]


def _read(fmt: str, url: str, on_error: str, **options):
    src = SOURCES[fmt]([url], on_error=on_error, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = list(src)
    return _norm(samples), src.last_epoch_stats or src.stats


def _tar_truth(data: bytes) -> tuple[list[dict], bool] | None:
    """What the tar bytes say, read by tarfile itself (random access, checksums checked):
    the samples a correct reader delivers, and whether they are all well formed (a key per
    member, unique keys, one file per extension). None: tarfile cannot read the bytes."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = [m for m in tf.getmembers() if m.isreg()]
            files = [(m.name, tf.extractfile(m).read()) for m in members]
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return None
    out: list[dict] = []
    ok, seen, key = True, set(), None
    for name, payload in files:
        prefix, ext = base_plus_ext(name)
        if prefix is None:
            ok = False
            continue
        if prefix != key:
            key = prefix
            ok &= prefix not in seen
            seen.add(prefix)
            out.append({"__key__": prefix, "__index__": len(out)})
        ok &= ext.lower() not in out[-1]
        out[-1][ext.lower()] = payload
    return out, ok


def _check(fmt: str, orig: dict, expected: list[dict], base, mutation) -> str:
    data, changed = mutate(orig["bytes"], mutation)
    url = f"{base}/m{next(_files)}.{fmt}"
    with open(url, "wb") as f:
        f.write(data)
    ids = [(s["__key__"], s["__index__"]) for s in expected]
    options = {}

    # What the bytes on disk may legitimately yield without an error.
    payload_only = False
    if fmt == "tar":
        options = {"num_samples": {url: len(expected)}}  # as from the index file
        truth = _tar_truth(data)
        allowed = [truth[0]] if truth is not None and truth[1] else []
        # under "skip", what is delivered before a problem must match what the bytes say
        # (tarfile's reading, or for bytes tarfile refuses, the original up to the damage)
        reference = truth[0] if truth is not None else expected
    else:
        allowed = [expected]
        reference = expected
        # Arrow IPC: values may change only where record-batch messages changed (or were
        # shifted by bytes inserted or deleted inside them)
        if changed is not None:
            where = changed
        else:
            where = set() if mutation[0] == "truncate" else {mutation[1][0]}
        payload_only = fmt == "arrow" and any(a <= p < b for a, b in orig["bodies"] for p in where)

    def correct(samples: list[dict]) -> bool:
        if payload_only:
            return [(s["__key__"], s["__index__"]) for s in samples] == ids
        return samples in allowed

    label = "ok"
    # on_error="raise": the correct result or a ShardError, never fewer/different samples.
    result, error = es_error_or_ok(lambda: _read(fmt, url, "raise", **options), (ShardError,))
    if error is not None:
        assert url in str(error), f"the error does not name the shard: {error}"
        label = "ShardError"
    else:
        samples, stats = result
        assert correct(samples), (
            f"{fmt} {mutation[0]}: silent corruption under on_error='raise': "
            f"{len(samples)} samples, expected {len(expected)} (or an error)"
        )
        assert stats["skipped_samples"] == stats["skipped_shards"] == 0
        if samples != expected:
            label = "ok (changed bytes read as written; the format has no checksum there)"

    # on_error="skip": never an exception; what is left out is counted.
    result, error = es_error_or_ok(lambda: _read(fmt, url, "skip", **options), ())
    samples, stats = result
    if len(samples) == len(reference) and correct(samples):
        return label
    skipped = stats["skipped_samples"] + stats["skipped_shards"]
    assert skipped > 0, (
        f"{fmt} {mutation[0]}: {len(samples)} of {len(expected)} samples without a counted skip"
    )
    if payload_only:
        assert {(s["__key__"], s["__index__"]) for s in samples} <= set(ids)
        return label
    truth_by_index = {s["__index__"]: s for s in reference}
    for s in samples:  # a sample may lose a bad member (counted), never gain a wrong value
        t = truth_by_index.get(s["__index__"], {})
        assert all(k in t and t[k] == v for k, v in s.items()), (
            f"{fmt} {mutation[0]}: under on_error='skip' sample {s['__index__']} was "
            "delivered with wrong content"
        )
    return label


@pytest.mark.parametrize("fmt", ["tar", "parquet", "arrow"])
@pytest.mark.parametrize("n", SCALES)
def test_mutated_shard_bytes(fmt, n, originals, tmp_path):
    orig = originals[fmt]
    base = tmp_path / "d"
    base.mkdir()
    url = f"{base}/orig.{fmt}"
    with open(url, "wb") as f:
        f.write(orig["bytes"])
    expected, _ = _read(fmt, url, "raise")
    assert len(expected) == (10 if fmt == "tar" else 40)

    sweep(
        f"shard bytes: {fmt}",
        mutations(len(orig["bytes"]), orig["headers"]),
        lambda m: _check(fmt, orig, expected, base, m),
        n,
        times=5,  # cheap: 5x the examples of a bad-input category
    )


def test_parquet_bit_flip_in_data_is_an_error(tmp_path):
    """Page CRCs: a flipped bit in a data page is a ShardError, not a different value."""
    table = pa.table({"x": np.arange(1000, dtype=np.int64)})
    (url,) = write_shards(table, f"{tmp_path}/p-%03d.parquet", "parquet", 10_000, index=False)
    with open(url, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 3] ^= 0x10  # inside the data page
    with open(url, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ShardError, match=r"p-000\.parquet"):
        list(ParquetSource(url))
    src = ParquetSource(url, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(src) == []
    assert src.last_epoch_stats["skipped_shards"] == 1


def test_arrow_corrupt_offsets_are_an_error_not_an_abort(tmp_path):
    """A list column whose offsets point outside the values aborted the process (a failed
    C++ check in pyarrow) before es_pipe validated IPC batches."""
    table = pa.table({"tokens": [list(range(i % 5)) for i in range(20)]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    data = bytearray(sink.getvalue().to_pybytes())
    ((start, _),) = _arrow_bodies(bytes(data))
    data[start + 8 : start + 12] = (10**8).to_bytes(4, "little")  # an offset, far out
    url = f"{tmp_path}/bad.arrow"
    with open(url, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ShardError, match=r"bad\.arrow"):
        list(ArrowSource(url))
