"""The tar reader's inline step over pax headers that set nothing it uses, pinned to the
full parser.

``webdataset.TarWriter`` writes a pax header (a float ``mtime``) before every member;
es_pipe's reader steps over such headers inline (es_pipe/sources/tar.py,
``_pax_ignorable``). Everything here is read twice, with the inline step and with it
switched off (``_PAX_TYPES`` emptied: every pax header goes through the full parser, as
before), and the samples, the samples handed out before an error, and the error message
must be the same. The full parser itself is pinned to ``tarfile`` by test_tar_reader.py.
"""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from es_pipe.errors import ShardError
from es_pipe.sources import WebDatasetSource
from es_pipe.sources import tar as tar_reader


def _outcome(url: str) -> tuple[list[dict], str | None]:
    """The samples read, and the ShardError's message (None if the shard read whole)."""
    got: list[dict] = []
    try:
        for s in WebDatasetSource([url]):
            got.append(s)
    except ShardError as exc:
        return got, str(exc)
    return got, None


def _both(url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict], str | None]:
    """Read with the inline pax step and without; assert the same; return it."""
    fast = _outcome(url)
    with monkeypatch.context() as m:
        m.setattr(tar_reader, "_PAX_TYPES", frozenset())
        slow = _outcome(url)
    assert fast == slow
    return fast


def _raw_pax(body: bytes, typ: bytes = tarfile.XHDTYPE, size: int | None = None) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = typ, len(body) if size is None else size
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes((-len(body)) % 512)


def _records(records: list[tuple[str, str]]) -> bytes:
    body = b""
    for k, v in records:
        rec = f" {k}={v}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return body


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uname = len(data), 0o444, "bigdata"
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes((-len(data)) % 512)


def _tarwriter_shard(path, n: int, seed: int = 0) -> str:
    url = str(path)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(url) as w:
        for i in range(n):
            size = int(rng.integers(0, 2000))
            w.write({"__key__": f"s{i:05d}", "bin": rng.bytes(size), "txt": f"sample {i}"})
    return url


def test_tarwriter_shards_take_the_inline_step_and_read_as_before(tmp_path, monkeypatch):
    url = _tarwriter_shard(tmp_path / "w.tar", 300)
    with tarfile.open(url) as tf:  # the shard has what this test is about
        assert all(m.pax_headers.get("mtime") for m in tf.getmembers())
    extensions = []
    full = tar_reader._Members._extension

    def counted(self, *args):
        extensions.append(args)
        return full(self, *args)

    monkeypatch.setattr(tar_reader._Members, "_extension", counted)
    got, error = _both(url, monkeypatch)
    assert error is None and len(got) == 300
    assert got[7]["txt"] == b"sample 7" and got[7]["__key__"] == "s00007"
    # both reads: the full one parses 600 pax headers, the inline one at most the few
    # that a 1 MiB read cuts
    assert 600 <= len(extensions) <= 603
    extensions.clear()
    _outcome(url)
    assert len(extensions) <= 3


A = ("mtime", "1796597489.6912029")
IGNORABLE = [A, ("atime", "1.5"), ("ctime", "2"), ("uid", "1000"), ("gid", "x")]
IGNORABLE += [
    ("uname", "bigdata"),
    ("gname", "g"),
    ("comment", "a = b\n c"),
    ("hdrcharset", "BINARY"),
]


@pytest.mark.parametrize(
    "body",
    [
        _records([A]),
        _records(IGNORABLE),
        _records([A, ("path", "renamed.txt")]),
        _records([("size", "3"), A]),
        _records([A, ("linkpath", "x")]),
        _records([A, ("GNU.sparse.map", "0,1")]),
        _records([("path", "dir/k1.txt/"), A, ("size", "bad")]),
        _records([A]) + b"0 mtime=1\n",  # a record of length 0: an error
        b"0 mtime=1\n",
        _records([A]) + b"garbage after the records",
        b"28 mtime=1796597489.6912029",  # no newline, a length past the data
        b"5 =x\n" + _records([("path", "k9.txt")]),  # no key: the records end there
        b"12mtime=1\n",
        b"1" * 40 + b" mtime=1\n",  # a length longer than int() reads
        b"1" * 5000 + b" mtime=1\n",
        b"3 x=" + _records([("path", "k9.txt")]),
        b"9 a=b\n" + b"\xff\xfe=\x80\n",
        b"",
    ],
)
@pytest.mark.parametrize("typ", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE])
def test_hand_made_pax_headers(tmp_path, monkeypatch, body, typ):
    url = tmp_path / "pax.tar"
    first = _member("k0.txt", b"zero")
    rest = _member("k1.txt", b"one") + _member("k2.txt", b"two") + bytes(1024)
    url.write_bytes(first + _raw_pax(body, typ) + rest)
    got, error = _both(str(url), monkeypatch)
    if body in (_records([A]), _records(IGNORABLE)):
        assert error is None and [s["txt"] for s in got] == [b"zero", b"one", b"two"]
    if body.startswith(b"0 ") or b"0 mtime=1\n" in body:
        assert error is not None and "pax record of length 0" in error
    url.write_bytes(_raw_pax(body, typ) + rest)  # the pax header first in the shard
    _both(str(url), monkeypatch)


@pytest.mark.parametrize(
    "after",
    [
        b"",  # the file ends
        bytes(1024),  # an end block where the member should be
        b"\x7f" * 512,  # an invalid header
        _raw_pax(_records([A])) + _member("k1.txt", b"one") + bytes(1024),  # pax after pax
        _raw_pax(_records([("path", "k5.txt")])) + _member("k1.txt", b"one") + bytes(1024),
    ],
)
def test_what_follows_an_ignorable_pax_header(tmp_path, monkeypatch, after):
    url = tmp_path / "after.tar"
    url.write_bytes(_member("k0.txt", b"zero") + _raw_pax(_records([A])) + after)
    _, error = _both(str(url), monkeypatch)
    if not after or after.startswith(bytes(512)) or after.startswith(b"\x7f"):
        assert error is not None and "truncated or corrupt" in error
    url.write_bytes(_raw_pax(_records([A])) + after)  # the pax header first in the shard
    _both(str(url), monkeypatch)


@pytest.mark.parametrize(
    "damage",
    ["checksum", "size", "negative size", "mode", "truncated data"],
)
def test_damaged_pax_headers(tmp_path, monkeypatch, damage):
    pax = bytearray(_raw_pax(_records([A])))
    if damage == "checksum":
        pax[148:156] = b"0000000\0"
    elif damage in ("size", "negative size", "mode"):
        a, b, field = {
            "size": (124, 136, b"0000000x001\0"),
            "negative size": (124, 136, b"\xff" * 12),
            "mode": (100, 108, b"07x7777\0"),
        }[damage]
        pax[a:b] = field
        pax[148:156] = b" " * 8
        pax[148:156] = b"%06o\0 " % sum(pax[:512])
    url = tmp_path / "bad.tar"
    if damage == "truncated data":
        pax[124:136] = b"%011o\0" % 5000
        pax[148:156] = b" " * 8
        pax[148:156] = b"%06o\0 " % sum(pax[:512])
    url.write_bytes(
        _member("k0.txt", b"zero") + bytes(pax) + _member("k1.txt", b"one") + bytes(1024)
    )
    got, error = _both(str(url), monkeypatch)
    # the sample before the damage is held back with the error (it could be partial)
    assert error is not None and "bad.tar" in error and got == []


@pytest.mark.parametrize("read_size", [512, 1024, 1536, 2000, 2048, 3000, 4096, 7777])
def test_pax_headers_across_read_buffer_boundaries(tmp_path, monkeypatch, read_size):
    url = _tarwriter_shard(tmp_path / "w.tar", 40, seed=read_size)
    monkeypatch.setattr(tar_reader, "READ_SIZE", read_size)
    monkeypatch.setattr(tar_reader, "_AFTER_SEEK", read_size)
    got, error = _both(url, monkeypatch)
    assert error is None and len(got) == 40
    with open(url, "rb") as f:
        data = f.read()
    with tarfile.open(url) as tf:  # the end of the last member (zeros follow, to 10 KiB)
        last = tf.getmembers()[-1]
        end = last.offset_data + last.size
    for cut in range(512 * 7 + 1, end, 512 * 7 + 1):  # truncated inside a header, data or padding
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        got, error = _both(str(tmp_path / "cut.tar"), monkeypatch)
        assert error is not None


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(
                [b"mtime", b"atime", b"uid", b"comment", b"path", b"size", b"GNU.sparse.x"]
            ).map(lambda k: _records([(k.decode(), "1")])),
            st.binary(max_size=12),
            st.sampled_from([b" ", b"=", b"\n", b"0", b"10 ", b"1" * 19 + b" "]),
        ),
        max_size=8,
    ),
    typ=st.sampled_from([tarfile.XHDTYPE, tarfile.XGLTYPE]),
)
def test_random_pax_records(tmp_path_factory, pieces, typ):
    url = tmp_path_factory.mktemp("fuzz") / "f.tar"
    body = b"".join(pieces)
    url.write_bytes(
        _member("k0.txt", b"zero") + _raw_pax(body, typ) + _member("k1.txt", b"one") + bytes(1024)
    )
    with pytest.MonkeyPatch.context() as mp:
        _both(str(url), mp)
