"""Container formats found inside mail: detection by content and bounded member readers.

A container is recognised by its first bytes (``sniff``), never by a declared name or type.
Each reader takes the container's bytes and a ``Budget`` and yields ``(name, data)`` pairs for
its members, one by one. Members are read in chunks against the budget, so a bomb stops at the
first limit instead of filling memory; declared sizes are never trusted. Nothing is ever written
to disk: member names are only strings (no path traversal by construction).

Readers raise library exceptions freely; ``rescan.extract`` catches them at one boundary and
records a ``malformed`` problem. Expected conditions (limits, encryption, unsupported methods)
are recorded on the budget as problems and the member is skipped.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from binascii import Error as BinasciiError
from binascii import a2b_uu
from typing import Callable, Iterator, Sequence

from rescan.models import Limits, Problem

Member = tuple[str, bytes]

CHUNK = 64 * 1024  # read size for streamed decompression; small enough to overshoot a cap little

# Below this expanded size the ratio limit does not apply: small, highly compressible members
# (padding, blank images, zero-filled tables in office files) are common and harmless, while a
# bomb needs size to hurt.
RATIO_FLOOR = 1024 * 1024

# Bound on password guesses per archive: a zip guess costs a header check or a short read.
MAX_PASSWORDS = 32
# A 7z guess costs a full AES key derivation (2^19 SHA-256 rounds, about half a second here).
MAX_7Z_PASSWORDS = 6

_MAGIC: Sequence[tuple[int, bytes, str]] = (
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"\x78\x9f\x3e\x22", "tnef"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),
    (257, b"ustar", "tar"),
)

_TYPES = {
    "zip": "application/zip",
    "7z": "application/x-7z-compressed",
    "rar": "application/vnd.rar",
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "tnef": "application/vnd.ms-tnef",
    "msg": "application/vnd.ms-outlook",
    "ole": "application/x-ole-storage",
    "tar": "application/x-tar",
    "message": "message/rfc822",
    "mbox": "application/mbox",
}

_LEAF_MAGIC: Sequence[tuple[bytes, str]] = (
    (b"MZ", "application/vnd.microsoft.portable-executable"),
    (b"\x7fELF", "application/x-executable"),
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"{\\rtf", "application/rtf"),
)

_HEADER_LINE = re.compile(rb"[!-9;-~]+:")
_KNOWN_HEADERS = frozenset(
    b"from to cc subject date message-id received return-path mime-version "
    b"content-type reply-to sender delivered-to x-mailer".split()
)
_UU_BEGIN = re.compile(rb"^begin [0-7]{3,4} ([^\r\n]+?)\r?$", re.M)
_MBOX_SPLIT = re.compile(rb"(?:\r?\n)(?=From [^\r\n]*\r?\n)")
_MBOX_ESCAPE = re.compile(rb"^>(>*From )", re.M)


class _Stop(Exception):
    """Raised inside a reader's sink when a member outgrows its cap."""


class Budget:
    """Per-message limits bookkeeping: counts parts and bytes, caps streamed reads, and
    collects problems. One instance per extraction pass; not shared between messages.

    ``passwords`` are the candidates tried on encrypted archives, in order.
    """

    def __init__(self, limits: Limits, passwords: Sequence[str], problems: list[Problem]):
        self.limits = limits
        self._passwords: list[str] = []
        self._later: list[Callable[[], Sequence[str]]] = []
        self.add_passwords(passwords)
        self.problems = problems
        self.files = 0
        self.bytes = 0
        self.full = False  # the file limit was hit: nothing more is read or yielded
        self.decrypted: set[str] = set()  # member paths opened with a password

    def add_passwords(self, passwords: Sequence[str]) -> None:
        """Append password candidates (duplicates dropped, at most ``MAX_PASSWORDS`` kept)."""
        self._passwords = list(dict.fromkeys([*self._passwords, *passwords]))[:MAX_PASSWORDS]

    def add_passwords_later(self, source: Callable[[], Sequence[str]]) -> None:
        """Append the candidates ``source()`` gives, computed only if an encrypted archive
        asks for them (looking for hints in every message's text would cost every scan)."""
        self._later.append(source)

    @property
    def passwords(self) -> list[str]:
        """The password candidates, in order."""
        while self._later:
            self.add_passwords(self._later.pop(0)())
        return self._passwords

    def problem(self, code: str, detail: str, part: str | None) -> None:
        """Record a problem. Takes a ``Problem`` code, a detail text and the part path."""
        self.problems.append(Problem(code, detail, part))

    def room(self, path: str) -> bool:
        """True if one more part may be produced; else records ``limit:max-files`` once."""
        if self.full:
            return False
        if self.files >= self.limits.max_files:
            self.full = True
            self.problem("limit:max-files", f"more than {self.limits.max_files} parts", path)
            return False
        return True

    def admit(self, path: str, size: int) -> bool:
        """Count a part of ``size`` bytes about to be yielded. Returns False (and records the
        limit that refuses it) when it does not fit."""
        if not self.room(path):
            return False
        if size > self.limits.max_filesize:
            self.problem("limit:max-filesize", f"{size} bytes > {self.limits.max_filesize}", path)
            return False
        if self.bytes + size > self.limits.max_scansize:
            self.problem(
                "limit:max-scansize", f"message parts exceed {self.limits.max_scansize} bytes", path
            )
            return False
        self.files += 1
        self.bytes += size
        return True

    def caps(self, compressed: int | None) -> list[tuple[int, str]]:
        """The byte caps for one member, smallest first, each with the limit code it names.
        ``compressed`` is the member's stored size when the ratio limit applies."""
        caps = [
            (self.limits.max_filesize, "limit:max-filesize"),
            (max(self.limits.max_scansize - self.bytes, 0), "limit:max-scansize"),
        ]
        if compressed is not None:
            caps.append((max(self.limits.max_ratio * compressed, RATIO_FLOOR), "limit:max-ratio"))
        return sorted(caps)

    def declared_over_cap(self, path: str, declared: int, compressed: int | None) -> bool:
        """True (and the limit recorded) when a member *declares* more bytes than its cap: it
        is not read at all, and counts against the scan size as if read to the cap (so a
        42.zip of many such members still ends at max-scansize). A declared size is never
        trusted the other way: a member that declares little is still read against the cap."""
        cap, code = self.caps(compressed)[0]
        if declared <= cap:
            return False
        self.problem(code, f"declares {declared} bytes (cap {cap}); not read", path)
        self.spend(cap + 1, path, code)  # what reading it to the cap would have cost
        return True

    def read(self, path: str, read: Callable[[int], bytes], compressed: int | None) -> bytes | None:
        """Read a stream chunk by chunk until EOF or the smallest cap. Returns the bytes, or
        None after recording the limit that stopped it (the prefix is dropped)."""
        cap, code = self.caps(compressed)[0]
        out = io.BytesIO()  # getvalue() hands over its buffer: a big member is held once, not twice
        while True:
            chunk = read(CHUNK)
            if not chunk:
                return out.getvalue()
            out.write(chunk)
            if out.tell() > cap:
                self.problem(code, f"stopped after {out.tell()} bytes (cap {cap})", path)
                self.spend(out.tell(), path, code)
                return None

    def sink(self, path: str, compressed: int | None) -> _Sink:
        """A writable buffer that raises once it outgrows this member's cap (for libraries
        that push data instead of letting us pull it)."""
        cap, code = self.caps(compressed)[0]

        def overflow(n: int) -> None:
            self.problem(code, f"stopped after {n} bytes (cap {cap})", path)
            self.spend(n, path, code)

        return _Sink(cap, overflow)

    def spend(self, n: int, path: str, stopped_by: str) -> None:
        """Count ``n`` bytes decompressed and thrown away against the message's scan size, so
        that a bomb of many small bombs (42.zip) cannot make unbounded work; once the budget is
        gone nothing more of the message is read."""
        self.bytes += n
        if self.bytes >= self.limits.max_scansize and not self.full:
            self.full = True
            if stopped_by == "limit:max-scansize":
                return  # already said
            self.problem(
                "limit:max-scansize",
                f"more than {self.limits.max_scansize} bytes decompressed; the rest was not read",
                path,
            )


class _Sink:
    def __init__(self, cap: int, on_overflow: Callable[[int], None]):
        self.buf = io.BytesIO()
        self.cap = cap
        self.on_overflow = on_overflow

    def write(self, data: bytes) -> int:
        self.buf.write(data)
        if self.buf.tell() > self.cap:
            self.on_overflow(self.buf.tell())
            raise _Stop
        return len(data)

    def size(self) -> int:
        return self.buf.tell()

    def value(self) -> bytes:
        return self.buf.getvalue()


def sniff(data: bytes) -> str | None:
    """The container kind of ``data`` judged by content, or None for a leaf.

    Kinds: zip, 7z, rar, gzip, bzip2, xz, tar, tnef, msg, message, mbox, uu.
    """
    for offset, magic, kind in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if kind == "ole":
                return "msg" if _is_outlook_msg(data) else None
            return kind
    if data[:3] == b"BZh" and data[4:10] == b"1AY&SY":
        return "bzip2"
    if data.startswith(b"From ") and _looks_like_headers(data.split(b"\n", 1)[-1]):
        return "mbox"
    if _looks_like_headers(data):
        return "message"
    if b"\0" not in data[:4096] and _UU_BEGIN.search(data):
        return "uu"
    return None


def detect_type(data: bytes, kind: str | None = None) -> str:
    """A MIME type for ``data`` from its content: containers, common binaries, else text/plain
    for NUL-free UTF-8 and application/octet-stream otherwise. ``kind`` is ``sniff(data)``
    when the caller already has it."""
    kind = kind or sniff(data)
    if kind in _TYPES:
        return _TYPES[kind]
    for magic, ctype in _LEAF_MAGIC:
        if data.startswith(magic):
            return ctype
    head = data[:4096]
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "text/plain"
        except UnicodeDecodeError as e:
            if e.start >= len(head) - 3:  # a character cut at the sample's end
                return "text/plain"
    return "application/octet-stream"


def _looks_like_headers(data: bytes) -> bool:
    """An RFC 5322 header block: header or continuation lines up to a blank line, with at
    least two well-known field names."""
    known = 0
    for i, line in enumerate(data[:65536].split(b"\n")):
        line = line.rstrip(b"\r")
        if not line:
            return known >= 2 and i > 0
        if line[:1] in (b" ", b"\t"):
            if i == 0:
                return False
            continue
        m = _HEADER_LINE.match(line)
        if not m:
            return False
        if line[: m.end() - 1].lower() in _KNOWN_HEADERS:
            known += 1
    return False


def _is_outlook_msg(data: bytes) -> bool:
    try:
        import olefile
    except ImportError:
        return False
    try:
        with olefile.OleFileIO(data) as ole:
            return ole.exists("__properties_version1.0") and any(
                e[0].startswith("__substg1.0_") for e in ole.listdir(streams=True, storages=False)
            )
    except Exception:  # not a valid OLE file: a leaf, like any other unknown binary
        return False


# --- zip ----------------------------------------------------------------------------------

_ZIP_UNSUPPORTED = {6: "implode", 9: "deflate64", 97: "wavpack", 98: "ppmd"}


def zip_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """Members of a zip archive (deflate, bzip2, lzma; ZipCrypto and AES with known or guessed
    passwords). Overlapping entries (a bomb that reuses one compressed blob) stop the archive."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    aes = False
    if any(i.flag_bits & 1 for i in zf.infolist()):
        try:
            import pyzipper  # reads ZipCrypto and WinZip AES alike
        except ImportError:
            pass
        else:
            zf, aes = pyzipper.AESZipFile(io.BytesIO(data)), True
    infos = [i for i in zf.infolist() if not i.is_dir()]
    bad_layout = _zip_layout_error(data, infos)
    if bad_layout:
        budget.problem("malformed", f"zip: {bad_layout}", path)
        return
    good: list[str] = []
    for info in infos:
        mpath = f"{path}/{info.filename}"
        if not budget.room(mpath):
            return
        if info.compress_type in _ZIP_UNSUPPORTED:
            name = _ZIP_UNSUPPORTED[info.compress_type]
            budget.problem("unsupported", f"zip: {name} compression", mpath)
            continue
        if not info.flag_bits & 1:
            try:
                body = _zip_read(zf, info, None, mpath, budget)
            except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError) as e:
                budget.problem("malformed", f"zip: {type(e).__name__}: {str(e)[:120]}", mpath)
                continue
        elif info.compress_type == 99 and not aes:
            budget.problem("unsupported", "zip: AES encryption needs pyzipper", mpath)
            continue
        else:
            body = _zip_decrypt(zf, info, mpath, budget, good)
        if body is not None:
            yield info.filename, body


def _zip_read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, pwd: bytes | None, mpath: str,
              budget: Budget) -> bytes | None:
    if budget.declared_over_cap(mpath, info.file_size, info.compress_size):
        return None
    with zf.open(info, pwd=pwd) as f:
        return budget.read(mpath, f.read, info.compress_size)


def _zip_decrypt(zf: zipfile.ZipFile, info: zipfile.ZipInfo, mpath: str, budget: Budget,
                 good: list[str]) -> bytes | None:
    """Try the password that opened an earlier member first, then every candidate."""
    problems_before = len(budget.problems)
    for pw in list(dict.fromkeys(good + budget.passwords)):
        try:
            body = _zip_read(zf, info, pw.encode("utf-8"), mpath, budget)
        except (RuntimeError, zipfile.BadZipFile, ValueError, OSError, EOFError,
                zlib.error, lzma.LZMAError):
            del budget.problems[problems_before:]  # a cap hit under a wrong key means nothing
            continue
        if body is not None or len(budget.problems) > problems_before:
            good.insert(0, pw)
            budget.decrypted.add(mpath)
            return body
    budget.problem("encrypted", "zip: no known password opens it", mpath)
    return None


def _zip_layout_error(data: bytes, infos: list[zipfile.ZipInfo]) -> str | None:
    """Describe an entry without a local record or the first pair of entries whose local
    records overlap (a bomb reusing one compressed blob); None for a sound layout."""
    spans = []
    for info in infos:
        start = info.header_offset
        head = data[start : start + 30]
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            return f"entry {info.filename!r} has no local header"
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        spans.append((start, start + 30 + name_len + extra_len + info.compress_size, info.filename))
    spans.sort()
    for (_, end, name), (start, _, nxt) in zip(spans, spans[1:]):
        if start < end:
            return f"overlapping entries {name!r} and {nxt!r}"
    return None


# --- tar and single-file compressors -------------------------------------------------------


def tar_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """Regular-file members of an uncompressed tar (compressed tars arrive here after their
    gzip/bzip2/xz layer was opened as its own container)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if not info.isreg():
                continue
            mpath = f"{path}/{info.name}"
            if not budget.room(mpath):
                return
            f = tf.extractfile(info)
            body = budget.read(mpath, f.read, None) if f else None
            if body is not None:
                yield info.name, body


def gzip_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """The one decompressed member of a gzip stream, named from its header when it has one."""
    name = _gzip_name(data) or _strip_suffix(filename, (".tgz", ".tar"), (".gz", ""))
    yield from _single(gzip.GzipFile(fileobj=io.BytesIO(data)), name, data, path, budget)


def bzip2_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """The one decompressed member of a bzip2 stream."""
    name = _strip_suffix(filename, (".tbz2", ".tar"), (".bz2", ""))
    yield from _single(bz2.BZ2File(io.BytesIO(data)), name, data, path, budget)


def xz_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """The one decompressed member of an xz stream."""
    name = _strip_suffix(filename, (".txz", ".tar"), (".xz", ""))
    yield from _single(lzma.LZMAFile(io.BytesIO(data)), name, data, path, budget)


def _single(stream: io.BufferedIOBase, name: str, data: bytes, path: str,
            budget: Budget) -> Iterator[Member]:
    mpath = f"{path}/{name}"
    if not budget.room(mpath):
        return
    with stream:
        body = budget.read(mpath, stream.read, len(data))
    if body is not None:
        yield name, body


def _gzip_name(data: bytes) -> str | None:
    flags = data[3] if len(data) > 3 else 0
    pos = 10
    if flags & 4:  # FEXTRA
        if len(data) < 12:
            return None
        pos += 2 + struct.unpack("<H", data[10:12])[0]
    if not flags & 8:  # FNAME
        return None
    end = data.find(b"\0", pos, pos + 1024)
    if end <= pos:
        return None
    return data[pos:end].decode("latin-1")


def _strip_suffix(filename: str | None, special: tuple[str, str], plain: tuple[str, str]) -> str:
    if not filename:
        return "data"
    low = filename.lower()
    for suffix, repl in (special, plain):
        if low.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)] + repl
    return "data"


# --- 7z ------------------------------------------------------------------------------------


def sevenzip_members(data: bytes, path: str, filename: str | None,
                     budget: Budget) -> Iterator[Member]:
    """Members of a 7z archive, decompressed in memory. Declared sizes are checked first
    (py7zr never writes past them), and each member's writes are capped as they arrive."""
    import py7zr

    errors = (py7zr.exceptions.Bad7zFile, py7zr.exceptions.PasswordRequired,
              py7zr.exceptions.CrcError, lzma.LZMAError, EOFError, ValueError, OSError)
    try:
        with py7zr.SevenZipFile(io.BytesIO(data)) as probe:
            encrypted = probe.needs_password()
    except py7zr.exceptions.PasswordRequired:
        encrypted = True  # the header itself is encrypted
    candidates: list[str | None] = budget.passwords[:MAX_7Z_PASSWORDS] if encrypted else [None]
    for pw in candidates:
        problems_before = len(budget.problems)
        try:
            members = _sevenzip_extract(py7zr, data, pw, path, budget)
        except errors:
            if not encrypted:
                raise
            del budget.problems[problems_before:]
            continue
        if pw is not None:
            budget.decrypted.update(f"{path}/{name}" for name, _ in members)
        yield from members
        return
    budget.problem("encrypted", "7z: no known password opens it", path)


def _sevenzip_extract(py7zr, data: bytes, pw: str | None, path: str,
                      budget: Budget) -> list[Member]:
    from py7zr.io import Py7zIO, WriterFactory

    class Writer(Py7zIO):
        def __init__(self, sink: _Sink):
            self.sink = sink

        def write(self, s: bytes) -> int:
            return self.sink.write(bytes(s))

        def read(self, size: int | None = None) -> bytes:
            return b""

        def seek(self, offset: int, whence: int = 0) -> int:
            return 0

        def flush(self) -> None:
            pass

        def size(self) -> int:
            return self.sink.size()

    with py7zr.SevenZipFile(io.BytesIO(data), password=pw) as z:
        files = [f for f in z.list() if not f.is_directory]
        declared = sum(f.uncompressed for f in files)
        for f in files:
            cap, code = budget.caps(None)[0]
            if f.uncompressed > cap:
                budget.problem(code, f"declares {f.uncompressed} bytes (cap {cap})",
                               f"{path}/{f.filename}")
                return []
        room = budget.limits.max_scansize - budget.bytes
        if declared > room:
            budget.problem("limit:max-scansize", f"declares {declared} bytes (room {room})", path)
            return []
        if declared > max(budget.limits.max_ratio * len(data), RATIO_FLOOR):
            budget.problem("limit:max-ratio", f"declares {declared} bytes from {len(data)}", path)
            return []
        sinks: list[_Sink] = []

        class Factory(WriterFactory):
            def create(self, name: str) -> Py7zIO:
                idx = len(sinks)
                mname = files[idx].filename if idx < len(files) else name
                sink = budget.sink(f"{path}/{mname}", None)
                sinks.append(sink)
                return Writer(sink)

        try:
            z.extract(factory=Factory())
        except _Stop:
            return []
    return [(f.filename, s.value()) for f, s in zip(files, sinks)]


# --- Outlook: TNEF and .msg ---------------------------------------------------------------


def tnef_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """Attachments of a TNEF blob (winmail.dat)."""
    from tnefparse import TNEF

    tnef = TNEF(data, do_checksum=False)
    for n, att in enumerate(tnef.attachments, 1):
        name = _text(att.long_filename()) or f"attachment-{n}"
        if budget.room(f"{path}/{name}"):
            yield name, bytes(att.data)


def msg_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """Attachments of an Outlook .msg file: each ``__attach_version1.0_*`` storage's binary
    data stream. Embedded messages and OLE objects are reported as unsupported."""
    import olefile

    with olefile.OleFileIO(data) as ole:
        storages = sorted({e[0] for e in ole.listdir(streams=True, storages=True)
                           if e[0].startswith("__attach_version1.0_")})
        for n, storage in enumerate(storages, 1):
            name = _msg_name(ole, storage) or f"attachment-{n}"
            mpath = f"{path}/{name}"
            if not budget.room(mpath):
                return
            stream = f"{storage}/__substg1.0_37010102"
            if not ole.exists(stream):
                budget.problem("unsupported", "msg: attachment is not plain binary data", mpath)
                continue
            yield name, ole.openstream(stream).read()


def _msg_name(ole, storage: str) -> str | None:
    for prop, enc in (("3707001F", "utf-16-le"), ("3704001F", "utf-16-le"),
                      ("3707001E", "latin-1"), ("3704001E", "latin-1")):
        stream = f"{storage}/__substg1.0_{prop}"
        if ole.exists(stream):
            return ole.openstream(stream).read().decode(enc, "replace").rstrip("\0") or None
    return None


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.strip("\0").strip() if value else None


# --- text containers: mbox and uuencode ---------------------------------------------------


def mbox_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """Messages of an mbox file, each without its ``From`` line and with ``>From`` unquoted."""
    for n, chunk in enumerate(_MBOX_SPLIT.split(data), 1):
        name = f"message-{n}.eml"
        if not budget.room(f"{path}/{name}"):
            return
        body = chunk.split(b"\n", 1)[1] if b"\n" in chunk else b""
        yield name, _MBOX_ESCAPE.sub(rb"\1", body)


def uu_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """Files uuencoded inside a text (``begin 644 name`` ... ``end``)."""
    for m in _UU_BEGIN.finditer(data):
        name = m.group(1).decode("latin-1").strip() or "data"
        if not budget.room(f"{path}/{name}"):
            return
        body, complete = uudecode(data[m.end():])
        if not complete:
            budget.problem("malformed", "uuencode: no end line", f"{path}/{name}")
        yield name, body


def uudecode(text: bytes) -> tuple[bytes, bool]:
    """Decode uuencoded lines up to ``end``. Returns the bytes and whether ``end`` was found.
    Lines with a wrong length are decoded as far as their length byte says (like uudecode)."""
    out = bytearray()
    for line in text.splitlines():
        line = line.rstrip(b"\r")
        if line.strip() == b"end":
            return bytes(out), True
        if not line:
            continue
        try:
            out += a2b_uu(line)
        except BinasciiError:
            n = ((line[0] - 32) & 63) * 4 // 3 + 1
            try:
                out += a2b_uu(line[:n + 1].ljust(n + 1, b" "))
            except BinasciiError:
                continue
    return bytes(out), False


def rar_members(data: bytes, path: str, filename: str | None, budget: Budget) -> Iterator[Member]:
    """RAR is recognised but not opened: there is no free extractor to bound."""
    budget.problem("unsupported", "rar: no free extractor", path)
    return iter(())


READERS: dict[str, Callable[[bytes, str, str | None, Budget], Iterator[Member]]] = {
    "zip": zip_members,
    "tar": tar_members,
    "gzip": gzip_members,
    "bzip2": bzip2_members,
    "xz": xz_members,
    "7z": sevenzip_members,
    "tnef": tnef_members,
    "msg": msg_members,
    "mbox": mbox_members,
    "uu": uu_members,
    "rar": rar_members,
}
"""Member readers by container kind (``message`` is handled by ``rescan.extract`` itself)."""
