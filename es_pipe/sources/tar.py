"""A streaming tar reader for WebDataset shards, close to the bytes.

Python's ``tarfile`` costs tens of microseconds per member (a ``TarInfo`` object, a file
object per extraction, reads through a stream wrapper); for shards of small samples it
spent ~80% of a read. This module parses the 512-byte headers itself, from large reads
(1 MiB), slicing the payloads out of the buffer, and hands samples to the node in chunks.

What is read is exactly what ``tarfile`` reads, member by member (the tests compare both
on tars written by ``tarfile`` in ustar, pax and GNU format, by ``webdataset.TarWriter``
and by es_pipe, and on fuzzed bytes):

* every header is checked as ``tarfile`` checks it: the checksum (unsigned or signed
  byte sum), every numeric field (``tarfile.nti``), names decoded as UTF-8 with
  ``surrogateescape``, the ustar ``prefix`` joined to the name, an old-style regular file
  whose name ends in ``/`` is a directory;
* pax extended headers (``x``) set ``path`` (trailing ``/`` stripped) and ``size``; GNU
  ``L`` headers set the name; a header after an extension header must be valid;
* regular members (types ``0``, ``\\0``, ``7``) carry data; links, devices, directories
  and FIFOs carry none (their size field is ignored) and are never followed; unknown
  types are stepped over by their size;
* the archive ends at the first all-zero block; a missing one (truncation) is an error.

Refused with a :class:`~es_pipe.ShardError` instead of being interpreted: sparse members
and global pax headers that change names or sizes (``tarfile`` applies those in ways that
do not suit a sample reader), negative sizes. Samples are grouped as webdataset groups
them (:data:`KEY_RE` is ``webdataset.tariterators.base_plus_ext``'s rule; ``__*__`` members
are metadata and skipped), with es_pipe's stricter rules for bad samples (see
:class:`~es_pipe.sources.WebDatasetSource`).

The payload bytes of a pruned sample (or of one delivered before a resume) are never
copied: inside the buffer they are stepped over; a skip of 256 KiB or more past the buffer
seeks (on a stream that cannot seek, the bytes are read and dropped). Every header is still
parsed and checked, so on small samples pruning saves little time (the headers are the
cost); on large ones it saves the bytes.

Speed: headers of plain regular files (type ``0``, no prefix, no link name) whose mode,
uid, gid and device fields equal those of the last header the full parser checked take an
inline fast path (see :func:`iter_tar_samples`); everything else goes through the full
parser. Both accept exactly the same headers. Pax headers whose records change nothing
this reader uses (``webdataset.TarWriter`` writes one with a float ``mtime`` before every
member) are stepped over inline too (:func:`_pax_ignorable`): a header of the same bytes
as one the full parser's checks accepted, its records scanned without building them.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NoReturn

from es_pipe.errors import ShardError

__all__ = ["KEY_RE", "iter_tar_samples"]

BLOCK = 512
READ_SIZE = 1 << 20
CHUNK = 64  # samples per chunk handed to the node
_AFTER_SEEK = 64 << 10  # the first read after a seek (grows x4 per read to READ_SIZE)
_SEEK_MIN = 256 << 10  # skips shorter than this past the buffer are read, not seeked
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_ZERO = bytes(BLOCK)
_Z100, _Z167 = bytes(100), bytes(167)  # an empty link name; an empty prefix and padding
_ENC, _ERR = "utf-8", "surrogateescape"  # tarfile's defaults on a UTF-8 system
_REGULAR = frozenset(tarfile.REGULAR_TYPES) - {tarfile.GNUTYPE_SPARSE}
_SUPPORTED = frozenset(tarfile.SUPPORTED_TYPES)
_PAX = frozenset((tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_nti, _nts = tarfile.nti, tarfile.nts  # type: ignore[attr-defined]  # public, not in typeshed


class _Bad(Exception):
    """A header ``tarfile`` would reject (bad checksum, bad number, truncated)."""


class _Buffer:
    """Sequential reads of a file through a large buffer; forward skips seek."""

    __slots__ = ("ahead", "base", "buf", "f", "pos", "seekable")

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.buf = b""
        self.pos = 0
        self.base = 0  # file offset of buf[0]
        self.ahead = READ_SIZE  # bytes read ahead; small after a seek, to not undo it
        try:
            self.seekable = bool(f.seekable())
        except Exception:
            self.seekable = False

    def fill(self, n: int) -> bool:
        """Make ``buf[pos:pos + n]`` available; False when the file ends first.

        Bytes left in the buffer (a member cut by the end of the last read) are completed
        with a read of just the missing bytes, so that only that member is copied; the
        next read is a large one again, used as it comes (no copy)."""
        have = len(self.buf) - self.pos
        parts = [self.buf[self.pos :]] if have else []
        self.base += self.pos
        self.pos = 0
        while have < n:
            b = self.f.read(n - have if parts else max(n, self.ahead))
            if not b:
                break
            parts.append(b)
            have += len(b)
        if len(parts) == 1:
            self.ahead = min(READ_SIZE, self.ahead * 4)
        self.buf = b"".join(parts) if len(parts) != 1 else parts[0]
        return have >= n

    def take(self, n: int) -> bytes | None:
        """The next ``n`` bytes (None if the file ends first)."""
        if len(self.buf) - self.pos < n and not self.fill(n):
            return None
        p = self.pos
        self.pos = p + n
        return self.buf[p : p + n]

    def skip(self, n: int) -> None:
        """Step over ``n`` bytes without copying them (a seek beyond the buffer)."""
        end = self.pos + n
        if end <= len(self.buf):
            self.pos = end
            return
        target = self.base + end
        here = self.base + len(self.buf)
        if target - here < _SEEK_MIN:  # a short hop: read on rather than seek and restart
            if self.fill(n):
                self.pos += n
                return
            end = self.pos + n  # the file ends within the hop: the next read finds it
            target = self.base + end
            here = self.base + len(self.buf)
        self.buf, self.pos, self.base = b"", 0, target
        if self.seekable:
            self.f.seek(target)
            self.ahead = _AFTER_SEEK
            return
        while here < target:  # a stream: read and drop
            b = self.f.read(min(target - here, READ_SIZE))
            if not b:
                return  # the next header read finds the end
            here += len(b)

    @property
    def offset(self) -> int:
        return self.base + self.pos


def _padded(n: int) -> int:
    return (n + BLOCK - 1) & ~(BLOCK - 1)


def _check_header(hdr: bytes, ok_static: set[bytes]) -> int:
    """Validate a non-zero 512-byte header as ``tarfile.TarInfo.frombuf`` does; return
    its size field. Raise :class:`_Bad` where tarfile raises ``InvalidHeaderError``."""
    try:
        chksum = _nti(hdr[148:156])
        static = hdr[100:124] + hdr[136:148] + hdr[329:345]
        if static not in ok_static:  # mode, uid, gid, mtime, devmajor, devminor
            for a, b in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
                _nti(hdr[a:b])
            if len(ok_static) > 4096:
                ok_static.clear()
            ok_static.add(static)
        size = _nti(hdr[124:136])
    except tarfile.HeaderError as exc:
        raise _Bad("invalid number field") from exc
    # Unsigned byte sum without the checksum field, plus 8 spaces: two exact adler32 sums
    # (a 256-byte half sums to at most 65280 < 65521, so the modulus never applies).
    total = (zlib.adler32(hdr[:256]) & 0xFFFF) + (zlib.adler32(hdr[256:]) & 0xFFFF) - 2
    if chksum != 256 + total - sum(hdr[148:156]) and chksum != 256 + sum(
        struct.unpack_from("148b8x356b", hdr)
    ):
        raise _Bad("bad checksum")
    return size


class _Members:
    """Parses headers (with their pax/GNU extension headers) into members."""

    def __init__(self, stream: _Buffer, url: str) -> None:
        self.s = stream
        self.url = url
        self.ok_static: set[bytes] = set()
        # mode+uid+gid and devmajor+devminor of the last header checked here (the fast
        # path of iter_tar_samples takes headers with the same bytes as valid)
        # (devmajor, devminor, then the 167 zero bytes the fast path needs)
        self.ids = self.dev_tail = b"\xff"  # matches no header before the first one
        self.first = True

    def next(self, subsequent: bool = False) -> tuple[str, bytes, int] | None:
        """``(name, type, size)`` of the next member, its data next in the stream (regular
        members), or None at the end-of-archive block. ``subsequent``: the header follows
        an extension header (stepped over by the caller), so it must be a valid one."""
        return self._member(subsequent=subsequent)

    def _member(self, subsequent: bool) -> tuple[str, bytes, int] | None:
        s = self.s
        at = s.offset
        hdr = s.take(BLOCK)
        if hdr is None or hdr == _ZERO:
            if hdr is None or subsequent:
                self._end_error(at, "is missing" if hdr is None else "is all zeros", subsequent)
            self.first = False
            return None
        try:
            size = _check_header(hdr, self.ok_static)
        except _Bad as exc:
            self._end_error(at, f"is invalid ({exc})", subsequent)
        self.ids, self.dev_tail = hdr[100:124], hdr[329:345] + _Z167
        self.first = False
        if size < 0:
            raise ShardError(
                f"shard {self.url!r}: the tar header at byte {at} has a negative size; "
                "re-create or re-download the shard"
            )
        typ = hdr[156:157]
        name = _nts(hdr[0:100], _ENC, _ERR)
        if typ == b"\0" and name.endswith("/"):
            typ = tarfile.DIRTYPE
        if hdr[345] and typ not in tarfile.GNU_TYPES:
            prefix = _nts(hdr[345:500], _ENC, _ERR)
            if prefix:
                name = prefix + "/" + name
        if typ in _REGULAR or (typ not in _SUPPORTED and typ not in _EXTENSIONS):
            return name, typ, size
        if typ in _SUPPORTED and typ not in tarfile.GNU_TYPES:
            return name, typ, 0  # links, devices, directories, FIFOs: no data
        return self._extension(hdr, typ, size, at)

    def _extension(self, hdr: bytes, typ: bytes, size: int, at: int) -> tuple[str, bytes, int]:
        if typ == tarfile.GNUTYPE_SPARSE:
            raise ShardError(
                f"shard {self.url!r}: the member at byte {at} is a sparse file, which a "
                "WebDataset shard never holds; re-create the shard without sparse files"
            )
        data = self.s.take(_padded(size))
        if data is None:
            self._truncated(at)
        if typ in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            nxt = self._member(subsequent=True)
            assert nxt is not None
            name, ntyp, nsize = nxt
            if typ == tarfile.GNUTYPE_LONGNAME:
                name = _nts(data, _ENC, _ERR)
                if ntyp == tarfile.DIRTYPE:
                    name = name.removesuffix("/")
            return name, ntyp, nsize
        pax = self._pax_records(data, at)
        sparse = [k for k in pax if k.startswith("GNU.sparse.")]
        if sparse or (typ == tarfile.XGLTYPE and {"path", "size"} & set(pax)):
            raise ShardError(
                f"shard {self.url!r}: the pax header at byte {at} sets {sorted(pax)[:5]}, "
                "which es_pipe does not interpret (sparse files, or a global name or size); "
                "re-create the shard with plain members"
            )
        nxt = self._member(subsequent=True)
        assert nxt is not None
        name, ntyp, nsize = nxt
        if typ in _PAX:  # tarfile's _apply_pax_info for the fields a sample reader uses
            if "path" in pax:
                name = pax["path"].rstrip("/")
            if "size" in pax:
                try:
                    nsize = int(pax["size"])
                except ValueError:
                    nsize = 0
                if nsize < 0:
                    raise ShardError(
                        f"shard {self.url!r}: the pax header at byte {at} sets a negative "
                        "size; re-create or re-download the shard"
                    )
                if ntyp not in _REGULAR and ntyp in _SUPPORTED:
                    nsize = 0
        return name, ntyp, nsize

    def _pax_records(self, buf: bytes, at: int) -> dict[str, str]:
        """The records of a pax header, parsed as ``tarfile``'s ``_proc_pax`` parses them."""
        out: dict[str, str] = {}
        pos = 0
        while True:
            match = _PAX_RECORD.match(buf, pos)
            if not match:
                return out
            length = int(match.group(1))
            if length == 0:
                self._end_error(at, "is invalid (a pax record of length 0)", subsequent=True)
            value = buf[match.end(2) + 1 : match.start(1) + length - 1]
            out[_pax_text(match.group(2))] = _pax_text(value)
            pos += length

    def _end_error(self, at: int, what: str, subsequent: bool) -> None:
        if self.first:
            raise ShardError(
                f"shard {self.url!r} is not a readable tar (its first header {what}); "
                "re-create or re-download it"
            )
        if subsequent:
            raise ShardError(
                f"shard {self.url!r} is truncated or corrupt: the tar header at byte {at} "
                f"{what}; re-create or re-download the shard"
            )
        raise _EndError(at, what)

    def _truncated(self, at: int) -> NoReturn:
        raise ShardError(
            f"shard {self.url!r} is truncated or corrupt: the data of the member at byte "
            f"{at} ends early (unexpected end of data); re-create or re-download the shard"
        )


_EXTENSIONS = frozenset((tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE))
_EXTENSIONS |= _PAX | {tarfile.GNUTYPE_SPARSE}


class _EndError(Exception):
    """The archive has no valid end-of-archive block where the next header should be."""

    def __init__(self, at: int, what: str) -> None:
        super().__init__(at, what)
        self.at, self.what = at, what


_PAX_TYPES = frozenset(t[0] for t in (*_PAX, tarfile.XGLTYPE))  # type bytes as ints
_PAX_USED = frozenset((b"path", b"size", b"linkpath"))  # records not stepped over inline


def _pax_ignorable(buf: bytes, pos: int, end: int) -> bool:
    """Whether the pax records in ``buf[pos:end]`` parse as :meth:`_Members._pax_records`
    parses them without an error and set nothing but keys this reader ignores (anything
    but ``path``, ``size``, ``linkpath`` and ``GNU.sparse.*``).

    A bytes scan, no regex and no dict: for the common header of one ``mtime`` record it
    is a few ``find`` calls. False sends the header to the full parser, which raises what
    it raises today (a record of length 0) or applies the records."""
    while True:  # the loop of _pax_records, with _PAX_RECORD's match done by hand
        sp = buf.find(b" ", pos, end)
        if sp <= pos or not buf[pos:sp].isdigit():  # (\d+) then " ": no match, the end
            return True
        if sp - pos > 18:  # int() of a huge length: the full parser's error, if any
            return False
        eq = buf.find(b"=", sp + 1, end)
        if eq <= sp + 1:  # ([^=]+)=: no match, the end
            return True
        key = buf[sp + 1 : eq]
        length = int(buf[pos:sp])
        if not length or key in _PAX_USED or key.startswith(b"GNU.sparse."):
            return False
        pos += length


def _pax_text(b: bytes) -> str:
    try:
        return b.decode("utf-8", "strict")
    except UnicodeDecodeError:
        return b.decode(_ENC, _ERR)


def iter_tar_samples(
    f: BinaryIO,
    url: str,
    *,
    start: int,
    pruned: set[int],
    bad_sample: Callable[[str], None],
    check_count: Callable[[int], None],
    chunk: int = CHUNK,
) -> Iterator[list[dict[str, Any]]]:
    """Chunks (lists) of the samples of one tar, in tar order.

    Each sample is ``{"__key__", "__shard__": url, "__index__": ordinal, ext: bytes...}``.
    Pruned ordinals and the first ``start`` kept samples are left out, their payloads not
    copied. ``bad_sample(message)`` is called for a member without a key, a key that
    appears twice or an extension twice in a sample (it raises or counts). Before the
    last sample is handed out, the end-of-archive block is checked and
    ``check_count(number of samples)`` is called: a truncated shard never yields a partial
    last sample. Shard-level problems raise :class:`ShardError`; the samples completed
    before the problem are handed out first.
    """
    s = _Buffer(f)
    members = _Members(s, url)
    take, skip, key_match = s.take, s.skip, KEY_RE.match
    adler, decode = zlib.adler32, _ENC
    regular = _REGULAR
    mtime = b"\xff"  # the last mtime field found valid (matches no header at first)
    pax_ok: dict[bytes, int] = {}  # pax headers found valid before: their size fields
    pax_types, check = _PAX_TYPES, _check_header
    after_pax = False  # the header just stepped over inline was an ignorable pax header
    sizes: dict[bytes, int] = {}  # size fields parsed before
    checksums: dict[bytes, tuple[int, int]] = {}  # checksum fields: (value, 1 + byte sum)
    ordinal = -1
    kept = 0
    key: str | None = None
    cur: dict[str, Any] | None = None
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    error: BaseException | None = None
    try:
        while True:
            # The fast path, inline: a plain regular file (type "0", no prefix, no link
            # name) whose header is in the buffer and whose mode, uid, gid and device
            # fields are those of the last header the full parser checked.
            buf, pos = s.buf, s.pos
            size = -1
            if (
                len(buf) - pos >= BLOCK
                and buf[pos + 156] == 48
                and buf.startswith(members.ids, pos + 100)
                and buf.startswith(members.dev_tail, pos + 329)
                and buf.startswith(_Z100, pos + 157)
            ):
                hdr = buf[pos : pos + BLOCK]
                # number fields seen before, by their bytes (sizes and checksums repeat):
                # size, and checksum with the checksum field's own byte sum (+ 1)
                f_size, field = hdr[124:136], hdr[148:156]
                size = sizes.get(f_size, -1)
                known = checksums.get(field)
                try:  # int() of the stripped field: equal to tarfile.nti where it succeeds
                    if size < 0:
                        size = sizes[f_size] = int(f_size.rstrip(b" \0"), 8)
                    if known is None:
                        chksum = int(field.rstrip(b" \0"), 8)
                        known = checksums[field] = (chksum, adler(field) & 0xFFFF)
                    if not buf.startswith(mtime, pos + 136):  # mtime: only checked
                        int(hdr[136:148].rstrip(b" \0"), 8)
                        mtime = hdr[136:148]
                except ValueError:
                    size = -1
                if len(sizes) > 4096 or len(checksums) > 4096:
                    sizes.clear()
                    checksums.clear()
                # 267 zero bytes (prefix, padding, link name): the byte sum is below
                # adler32's modulus, so adler32 gives it exactly (1 + sum); tarfile sums
                # the checksum field as 8 spaces.
                # known is None only where size < 0
                if size >= 0 and known[0] == 256 + (adler(hdr) & 0xFFFF) - known[1]:  # type: ignore[index]
                    end = hdr.find(0, 0, 100)
                    name = hdr[: end if end >= 0 else 100].decode(decode, _ERR)
                    s.pos = pos + BLOCK
                    after_pax = False
                else:
                    size = -1
            if (  # a pax header that sets nothing used here, its records in the buffer
                size < 0
                and len(buf) - pos >= BLOCK
                and buf[pos + 156] in pax_types
                and not after_pax
            ):
                hdr = buf[pos : pos + BLOCK]
                psize = pax_ok.get(hdr, -1)
                if psize < 0:
                    try:
                        psize = check(hdr, members.ok_static)
                    except _Bad:
                        psize = -1
                    if psize >= 0:
                        if len(pax_ok) > 4096:
                            pax_ok.clear()
                        pax_ok[hdr] = psize
                end = pos + BLOCK + _padded(psize)
                if psize >= 0 and end <= len(buf) and _pax_ignorable(buf, pos + BLOCK, end):
                    # as the full parser: the next header belongs to this one (it must be
                    # valid; an end block there is an error), the pax records change nothing
                    s.pos = end
                    members.first = False
                    after_pax = True
                    continue
            if size < 0:  # everything else: the full parser
                member = members.next(subsequent=after_pax)
                after_pax = False
                if member is None:
                    break
                name, typ_b, size = member
                if typ_b not in regular:
                    if size:
                        skip(_padded(size))
                    continue
            if name.startswith("__") and (
                _META.match(name) or ("/" not in name and name.endswith("__"))
            ):
                skip(_padded(size))
                continue
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if dot > slash + 1 and "\n" not in name:  # what KEY_RE's first try matches
                prefix, suffix = name[:dot], name[dot + 1 :]
            else:
                m = key_match(name)
                if m is None:
                    skip(_padded(size))
                    bad_sample(
                        f"shard {url!r}: member {name!r} has no key (webdataset names "
                        "are KEY.EXTENSION); rename or remove that member"
                    )
                    continue
                prefix, suffix = m.groups()
            if prefix != key:
                if cur is not None:
                    out.append(cur)
                    if len(out) >= chunk:
                        yield out
                        out = []
                ordinal += 1
                key, cur = prefix, None
                if prefix in seen:
                    skip(_padded(size))
                    bad_sample(
                        f"shard {url!r}: key {prefix!r} appears twice (sample "
                        f"{ordinal}); keys must be unique and a sample's files "
                        "adjacent; rewrite the shard"
                    )
                    continue
                seen.add(prefix)
                if ordinal in pruned:
                    skip(_padded(size))
                    continue
                kept += 1
                if kept <= start:
                    skip(_padded(size))
                    continue
                cur = {"__key__": prefix, "__shard__": url, "__index__": ordinal}
            elif cur is None:  # pruned, delivered before a resume, or bad: not copied
                skip(_padded(size))
                continue
            suffix = suffix.lower()
            if suffix in cur:
                skip(_padded(size))
                bad_sample(
                    f"shard {url!r}: key {prefix!r} has two {suffix!r} files; "
                    "rewrite the shard with one file per extension"
                )
                cur = None
                continue
            p = s.pos
            after = p + ((size + 511) & ~511)
            if after <= len(s.buf):  # the fast path: data and padding in the buffer
                cur[suffix] = s.buf[p : p + size]
                s.pos = after
                continue
            at = s.offset
            data = take(size)
            if data is None:
                raise ShardError(
                    f"shard {url!r} is truncated or corrupt near sample {ordinal} (key "
                    f"{key!r}): the data of member {name!r} at byte {at} ends early "
                    "(unexpected end of data); re-create or re-download the shard"
                )
            skip(_padded(size) - size)
            cur[suffix] = data
    except _EndError as exc:
        error = ShardError(
            f"shard {url!r} ends without a valid end-of-archive block after sample "
            f"{ordinal} (key {key!r}): the tar header at byte {exc.at} {exc.what}; the file "
            "is truncated or corrupt; the last sample was not delivered; re-create or "
            "re-download the shard"
        )
    except Exception as exc:  # hand out what was complete before the problem
        error = exc
    if error is not None:
        if out:
            yield out
        raise error
    # tar headers have a weak checksum: the count is checked before the last sample
    check_count(ordinal + 1)
    if cur is not None:
        out.append(cur)
    if out:
        yield out
