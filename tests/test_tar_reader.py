"""es_pipe's own tar reader (es_pipe/sources/tar.py) against what it replaces.

Tars are written by ``tarfile`` (ustar, pax, GNU), ``webdataset.TarWriter`` and es_pipe;
the samples read must be those ``webdataset.WebDataset`` groups and the bytes those
``tarfile`` extracts. Damaged tars (truncated anywhere, bad checksums, bad number fields,
things the reader refuses) give a ShardError naming the shard, never a partial sample.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import threading
import warnings

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from es_pipe.errors import ShardError
from es_pipe.retry import RetryingFile
from es_pipe.shard_writer import write_shards
from es_pipe.sources import WebDatasetSource
from es_pipe.sources import tar as tar_reader

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}


class Kind(bytes):
    """A member type other than a regular file (no data)."""


def _write_tar(path, members, fmt=tarfile.PAX_FORMAT, **info_kw) -> str:
    """``members``: (name, bytes) for regular files, (name, Kind(type)) for others."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            for k, v in info_kw.items():
                setattr(info, k, v)
            if not isinstance(data, Kind):
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.type = data
                if data in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = "../../etc/passwd"
                tf.addfile(info)
    return str(path)


def _truth(path) -> list[dict]:
    """The samples of a tar by tarfile (random access) + webdataset's grouping rules."""
    out: list[dict] = []
    key = None
    with tarfile.open(path, "r:") as tf:
        for m in tf.getmembers():
            if not m.isreg() or _is_meta(m.name):
                continue
            prefix, ext = wds.tariterators.base_plus_ext(m.name)
            assert prefix is not None, m.name
            if prefix != key:
                key = prefix
                out.append({"__key__": prefix, "__index__": len(out)})
            out[-1][ext.lower()] = tf.extractfile(m).read()
    return out


def _is_meta(name: str) -> bool:
    """webdataset's tar_file_iterator: metadata members, never part of a sample."""
    return bool(re.match(r"__[^/]*__($|/)", name)) or (
        "/" not in name and name.startswith("__") and name.endswith("__")
    )


def _ours(urls, **kw) -> list[dict]:
    got = list(WebDatasetSource(urls, **kw))
    return [{k: v for k, v in s.items() if k != "__shard__"} for s in got]


def _wds(urls) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    return [
        {k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
        for s in got
    ]


def _strip_index(samples):
    return [{k: v for k, v in s.items() if k != "__index__"} for s in samples]


# ------------------------------------------------------------------ formats and writers

MEMBERS = [
    ("k0.txt", b"zero"),
    ("k0.CLS", b"0"),  # extensions are lower-cased
    ("k0.seg.png", b"\x89PNG" * 100),  # multi-dot extension
    ("dir", Kind(tarfile.DIRTYPE)),
    ("dir/k1.txt", b""),  # an empty member
    ("dir/k1.json", b"{}" * 256),  # exactly 512 bytes: no padding
    ("link.txt", Kind(tarfile.SYMTYPE)),  # links are skipped, never followed
    ("hard.txt", Kind(tarfile.LNKTYPE)),
    ("fifo", Kind(tarfile.FIFOTYPE)),
    ("__meta__", b"metadata"),  # webdataset metadata: skipped
    ("k2.bin", bytes(range(256)) * 9),
    ("x" * 150 + "/k3.txt", b"a long name"),  # ustar prefix / pax path / GNU longname
    ("dir/.hidden", b"hidden file: key 'dir/', extension 'hidden' (webdataset's rule)"),
    ("k4.txt", b"last"),
]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tarfile_formats_read_as_tarfile_and_webdataset_read_them(tmp_path, fmt):
    members = MEMBERS
    if fmt != "ustar":  # a long non-ASCII name: pax path or GNU longname
        members = [*MEMBERS[:-1], ("ü" * 120 + ".txt", b"unicode long name"), MEMBERS[-1]]
    url = _write_tar(tmp_path / f"t-{fmt}.tar", members, FORMATS[fmt])
    got = _ours([url])
    assert got == _truth(url)
    assert _strip_index(got) == _wds([url])
    assert len(got) == (6 if fmt == "ustar" else 7)
    assert got[1]["__key__"] == "dir/k1" and got[1]["txt"] == b""
    assert got[0]["cls"] == b"0" and got[0]["seg.png"] == b"\x89PNG" * 100


def test_webdataset_tarwriter_shards(tmp_path):
    url = str(tmp_path / "w.tar")
    rng = np.random.default_rng(0)
    with wds.TarWriter(url) as w:
        for i in range(300):
            n = int(rng.integers(0, 3000))
            w.write({"__key__": f"s{i:05d}", "bin": rng.bytes(n), "txt": f"sample {i}"})
    got = _ours([url])
    assert len(got) == 300
    assert got == _truth(url) and _strip_index(got) == _wds([url])


def test_es_pipe_shards_and_compressed_shards(tmp_path):
    blob = bytes(range(256)) * 20
    samples = ({"__key__": f"{i:06d}", "bin": blob[: i * 7], "cls": i} for i in range(500))
    urls = write_shards(samples, str(tmp_path / "e-%03d.tar"), "tar", 200, index=False)
    got = _ours(urls)
    assert [s["__key__"] for s in got] == [f"{i:06d}" for i in range(500)]
    assert _strip_index(got) == _wds(urls)
    with open(urls[0], "rb") as f, gzip.open(urls[0] + ".gz", "wb") as g:
        g.write(f.read())
    assert _ours([urls[0] + ".gz"]) == _ours([urls[0]])


def test_members_larger_than_a_read(tmp_path):
    rng = np.random.default_rng(1)
    big = rng.bytes(tar_reader.READ_SIZE * 2 + 123)
    members = [("a.bin", big), ("a.txt", b"x"), ("b.bin", big[::-1]), ("c.txt", b"y" * 700)]
    url = _write_tar(tmp_path / "big.tar", members)
    got = _ours([url])
    assert got == _truth(url) and got[0]["bin"] == big and got[1]["bin"] == big[::-1]
    # pruned and resumed samples whose data lies beyond the buffer: seek over it
    assert [s["__key__"] for s in _ours([url], pruned={url: np.array([1])})] == ["a", "c"]


def test_gnu_old_style_and_odd_types(tmp_path):
    """Types tarfile treats specially: AREGTYPE ("\\0") is a regular file, or a directory
    when its name ends in "/"; CONTTYPE ("7") is a regular file; an unknown type is
    stepped over by its size and never a sample member."""
    url = str(tmp_path / "odd.tar")
    with tarfile.open(url, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, typ, data in [
            ("k0.txt", tarfile.AREGTYPE, b"old-style regular"),
            ("olddir/", tarfile.AREGTYPE, b""),
            ("k1.txt", tarfile.CONTTYPE, b"contiguous"),
            ("k2.txt", b"V", b"volume header, with data to step over" * 30),
            ("k3.txt", tarfile.REGTYPE, b"regular"),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.size = typ, len(data)
            tf.addfile(info, io.BytesIO(data))
    got = _ours([url])
    assert [s["__key__"] for s in got] == ["k0", "k1", "k3"]
    assert got == _truth(url)


def _pax_header(records: dict[str, str], typ: bytes = tarfile.XHDTYPE) -> bytes:
    body = b""
    for k, v in records.items():
        rec = f" {k}={v}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = typ, len(body)
    pad = (-len(body)) % 512
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(pad)


def _member(name: str, data: bytes, size: int | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes((-len(data)) % 512)


def test_pax_size_and_path_override_the_header(tmp_path):
    data = b"0123456789" * 100
    raw = (
        _pax_header({"path": "k0.txt/", "size": str(len(data)), "mtime": "bad", "uid": "x"})
        + _member("ignored-name", data, size=0)
        + _pax_header({"comment": "a global header that changes nothing"}, tarfile.XGLTYPE)
        + _member("k1.txt", b"one")
        + bytes(1024)
    )
    url = tmp_path / "pax.tar"
    url.write_bytes(raw)
    got = _ours([str(url)])
    assert got == _truth(url)
    assert got[0] == {"__key__": "k0", "__index__": 0, "txt": data}


@pytest.mark.parametrize(
    ("records", "typ"),
    [
        ({"path": "renamed.txt"}, tarfile.XGLTYPE),
        ({"size": "3"}, tarfile.XGLTYPE),
        ({"GNU.sparse.map": "0,1"}, tarfile.XHDTYPE),
    ],
)
def test_pax_headers_es_pipe_refuses(tmp_path, records, typ):
    url = tmp_path / "refused.tar"
    url.write_bytes(_member("k0.txt", b"a") + _pax_header(records, typ) + _member("k1.txt", b"b"))
    with pytest.raises(ShardError, match=r"refused\.tar.*pax header.*does not interpret"):
        _ours([str(url)])


def test_sparse_member_is_refused(tmp_path):
    hdr = bytearray(_member("k1.txt", b"sparse?"))
    hdr[156:157] = tarfile.GNUTYPE_SPARSE
    _fix_checksum(hdr)
    url = tmp_path / "sparse.tar"
    url.write_bytes(_member("k0.txt", b"a") + bytes(hdr) + bytes(1024))
    with pytest.raises(ShardError, match=r"sparse\.tar.*sparse file"):
        _ours([str(url)])


# ------------------------------------------------------------------ headers, checked


def _fix_checksum(hdr: bytearray, signed: bool = False) -> None:
    hdr[148:156] = b" " * 8
    fmt = "512b" if signed else "512B"
    import struct

    total = sum(struct.unpack_from(fmt, bytes(hdr[:512])))
    hdr[148:156] = b"%06o\0 " % (total & 0o777777)


def _shard(tmp_path, n=6) -> tuple[str, bytes, list[int]]:
    """A tar of ``n`` samples (two members each) and the offsets of its headers."""
    raw = b"".join(_member(f"k{i}.{e}", f"{i}{e}".encode() * 50) for i in range(n) for e in "ab")
    raw += bytes(1024)
    url = str(tmp_path / "h.tar")
    with open(url, "wb") as f:
        f.write(raw)
    with tarfile.open(url) as tf:
        offsets = [m.offset for m in tf.getmembers()]
    return url, raw, offsets


def test_a_signed_checksum_is_accepted_as_tarfile_accepts_it(tmp_path):
    url, raw, offsets = _shard(tmp_path)
    b = bytearray(raw)
    at = offsets[4]  # k2.a: give it a non-ASCII name and an old-style signed checksum
    name = "k2é.a".encode()
    b[at : at + 100] = name + bytes(100 - len(name))
    hdr = bytearray(b[at : at + 512])
    _fix_checksum(hdr, signed=True)
    b[at : at + 512] = hdr
    with open(url, "wb") as f:
        f.write(b)
    got = _ours([url])
    assert got == _truth(url) and got[2]["__key__"] == "k2é"


@pytest.mark.parametrize(
    "damage", ["checksum", "size_field", "mode_field", "mtime_field", "zero_checksum_field"]
)
@pytest.mark.parametrize("member", [0, 5, 11])
def test_invalid_headers_are_errors_never_partial(tmp_path, damage, member):
    url, raw, offsets = _shard(tmp_path)
    b = bytearray(raw)
    at = offsets[member]
    field = {
        "checksum": None,
        "size_field": (124, b"0000000008x\0"),
        "mode_field": (100, b"07 7\0\0\0\0"),
        "mtime_field": (136, b"9\0\0\0\0\0\0\0\0\0\0\0"),
        "zero_checksum_field": (148, b"\0" * 8),
    }[damage]
    if field is None:
        b[at + 20] ^= 1  # a name byte changed, checksum not updated
    else:
        pos, value = field
        b[at + pos : at + pos + len(value)] = value
        if damage != "zero_checksum_field":
            hdr = bytearray(b[at : at + 512])
            _fix_checksum(hdr)  # the checksum is right: the number field is what is wrong
            b[at : at + 512] = hdr
    with open(url, "wb") as f:
        f.write(b)
    with pytest.raises(ShardError, match=r"h\.tar"):
        _ours([url])
    src = WebDatasetSource([url], on_error="skip")
    with pytest.warns(UserWarning):
        got = list(src)
    # samples strictly before the damaged one, whole; never the one being read
    assert [s["__key__"] for s in got] == [f"k{i}" for i in range(member // 2)]
    assert all(set(s) >= {"a", "b"} for s in got) and src.stats["skipped_shards"] == 1


def test_every_truncation_is_an_error_or_the_whole_shard(tmp_path):
    url, raw, _ = _shard(tmp_path, n=3)
    whole = _ours([url])
    end = len(raw) - 1024  # the first end-of-archive block ends at end + 512
    for cut in [*range(0, len(raw), 97), *range(0, len(raw), 512)]:
        with open(url, "wb") as f:
            f.write(raw[:cut])
        if cut >= end + 512:
            assert _ours([url]) == whole
            continue
        with pytest.raises(ShardError, match=r"h\.tar"):
            _ours([url])


def test_error_after_an_extension_header(tmp_path):
    url = tmp_path / "ext.tar"
    url.write_bytes(_member("k0.txt", b"a") + _pax_header({"path": "k1.txt"}) + b"\x7f" * 512)
    with pytest.raises(ShardError, match=r"ext\.tar.*truncated or corrupt"):
        _ours([str(url)])
    longname = bytearray(_member("k1.txt", b"x" * 10))
    longname[156:157] = tarfile.GNUTYPE_LONGNAME
    _fix_checksum(longname)
    url.write_bytes(_member("k0.txt", b"a") + bytes(longname) + bytes(1024))
    with pytest.raises(ShardError, match=r"ext\.tar.*truncated or corrupt"):
        _ours([str(url)])


def test_not_a_tar_and_empty_tar(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert _ours([str(empty)]) == []
    for name, data in [("zero.tar", b""), ("text.tar", b"hello\n" * 200)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ShardError, match=rf"{name}.*not a readable tar"):
            _ours([str(tmp_path / name)])


# ------------------------------------------------------------------ pruning saves bytes


def test_pruned_payloads_are_seeked_over_not_read(tmp_path, monkeypatch):
    payload = bytes(range(256)) * (3 * 4096)  # 3 MiB per sample, three reads' worth
    samples = ({"__key__": f"s{i}", "bin": payload, "cls": i} for i in range(10))
    (url,) = write_shards(samples, str(tmp_path / "p-%03d.tar"), "tar", 100, index=False)
    read = []
    real = RetryingFile.read

    def counted(self, n=-1):  # the real read; only the bytes it returns are counted
        data = real(self, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(RetryingFile, "read", counted)
    kept = [1, 7]
    got = _ours([url], pruned={url: np.array([i for i in range(10) if i not in kept])})
    assert [s["__index__"] for s in got] == kept and got[0]["bin"] == payload
    size = os.path.getsize(url)
    # two kept samples plus at most one read-ahead per seek, not the 30 MiB of the shard
    assert sum(read) < 2 * len(payload) + 4 * tar_reader.READ_SIZE < size / 2


def test_a_stream_that_cannot_seek(tmp_path):
    """Pruned payloads of a non-seekable stream (a pipe) are read and dropped."""
    payload = b"p" * (tar_reader.READ_SIZE + 5000)
    samples = ({"__key__": f"s{i}", "bin": payload} for i in range(4))
    (url,) = write_shards(samples, str(tmp_path / "n-%03d.tar"), "tar", 100, index=False)
    raw = open(url, "rb").read()  # noqa: SIM115
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as f:
            f.write(raw)

    threading.Thread(target=feed, daemon=True).start()
    with os.fdopen(r, "rb") as f:
        assert not f.seekable()
        chunks = list(
            tar_reader.iter_tar_samples(
                f, url, start=1, pruned={2}, bad_sample=print, check_count=lambda n: None
            )
        )
    got = [s for c in chunks for s in c]
    assert [s["__index__"] for s in got] == [1, 3] and got[1]["bin"] == payload


# ------------------------------------------------------------------ random tars


_NAMES = st.lists(
    st.tuples(
        st.sampled_from(["", "d/", "a/b/", "é/", "x" * 120 + "/", "__m/", "d/."]),
        st.one_of(  # a few keys, so that samples get several members; and odd names
            st.sampled_from(["k", "k", "k", "q", "_", "__x", "\n", "", "é"]),
            st.text(alphabet="abXY_.é\n", min_size=0, max_size=8),
        ),
        st.sampled_from(["txt", "CLS", "seg.png", "", "b__", "x/y"]),
    ),
    min_size=0,
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    names=_NAMES,
    fmt=st.sampled_from(list(FORMATS.values())),
    sizes=st.lists(st.integers(0, 1500), min_size=12, max_size=12),
    mtime=st.integers(0, 2**33 - 1),
)
def test_random_tars_read_as_tarfile(tmp_path_factory, names, fmt, sizes, mtime):
    """Random members and names (hidden files, dots, newlines, "__" metadata names,
    extensions with slashes), in every format: the same samples as tarfile + webdataset's
    rules, or a ShardError where es_pipe is stricter (a member without a key, a key or an
    extension twice)."""
    path = tmp_path_factory.mktemp("r") / "r.tar"
    members = [(f"{d}{k}.{e}", bytes([i % 251]) * sizes[i]) for i, (d, k, e) in enumerate(names)]
    try:
        _write_tar(path, members, fmt, mtime=mtime)
    except ValueError:  # ustar cannot hold that name
        return
    with tarfile.open(path) as tf:  # the names as tarfile reads them back
        read_names = [m.name for m in tf.getmembers() if m.isreg() and not _is_meta(m.name)]
    problem = None
    seen, key, exts = set(), None, set()
    for name in read_names:
        prefix, ext = wds.tariterators.base_plus_ext(name)
        if prefix is None:
            problem = problem or "no key"
            continue
        if prefix != key:
            if prefix in seen:
                problem = problem or "twice"
            seen.add(prefix)
            key, exts = prefix, set()
        elif ext.lower() in exts:
            problem = problem or "two"
        exts.add(ext.lower())
    if problem is not None:
        with pytest.raises(ShardError, match=problem):
            _ours([str(path)])
        return
    assert _ours([str(path)]) == _truth(path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_names_that_are_not_utf8(tmp_path, fmt):
    """Bytes that are not UTF-8 decode as tarfile decodes them (surrogateescape), and the
    members of one such key still form one sample."""
    members = [
        ("k\udcff.txt", b"a"),
        ("k\udcff.cls", b"b"),
        ("\udce9\udc80/x.txt", b"c"),  # an invalid sequence before a slash
        ("\udce9\udc80/x.\udcfe", b"d"),  # and as an extension
        ("z.txt", b"e"),
    ]
    url = _write_tar(tmp_path / "b.tar", members, FORMATS[fmt])
    got = _ours([url])
    assert got == _truth(url)
    assert [s["__key__"] for s in got] == ["k\udcff", "\udce9\udc80/x", "z"]
    assert got[1]["\udcfe"] == b"d"


def _tarfile_samples(data: bytes) -> list[dict] | None:
    """What tarfile reads from ``data`` grouped as webdataset groups it; None where
    tarfile fails or a sample is malformed (then es_pipe must raise)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            files = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return None
    out: list[dict] = []
    key, seen = None, set()
    for name, payload in files:
        if _is_meta(name):
            continue
        prefix, ext = wds.tariterators.base_plus_ext(name)
        if prefix is None:
            return None
        if prefix != key:
            if prefix in seen:
                return None
            key = prefix
            seen.add(prefix)
            out.append({"__key__": prefix, "__index__": len(out)})
        if ext.lower() in out[-1]:
            return None
        out[-1][ext.lower()] = payload
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    member=st.integers(0, 11),
    at=st.integers(0, 511),
    patch=st.binary(min_size=1, max_size=8),
    signed=st.booleans(),
)
def test_headers_changed_with_a_valid_checksum(tmp_path_factory, member, at, patch, signed):
    """Any change to a header whose checksum is then made right again (so that every
    other field check, in the fast path and the full parser, is what decides): es_pipe
    reads what tarfile reads, or raises a ShardError; never other samples."""
    base = tmp_path_factory.mktemp("h")
    raw = b"".join(_member(f"k{i}.{e}", f"{i}{e}".encode() * 50) for i in range(6) for e in "ab")
    raw += bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        start = [m.offset for m in tf.getmembers()][member]
    b = bytearray(raw)
    if 148 <= at < 156:
        at = 140
    b[start + at : start + at + len(patch)] = patch[: 512 - at]
    hdr = bytearray(b[start : start + 512])
    _fix_checksum(hdr, signed=signed)
    b[start : start + 512] = hdr
    data = bytes(b)
    url = base / "m.tar"
    url.write_bytes(data)
    truth = _tarfile_samples(data)
    try:
        got = _ours([str(url)])
    except ShardError as exc:
        assert "m.tar" in str(exc)
        return
    assert truth is not None and got == truth
