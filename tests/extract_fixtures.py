"""Builders for extraction tests: messages, archives, bombs, TNEF and Outlook .msg files.

Formats that no installed library writes (ZipCrypto, overlapping zips, TNEF, OLE compound
files) are written by hand here, following their published layouts.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from email.message import EmailMessage

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def message(body: str = "Hello.\n", *attachments: tuple[bytes, str, str], subject: str = "test",
            message_id: str = "<m1@example.test>") -> bytes:
    """A multipart message with a text body and (data, content type, filename) attachments."""
    m = EmailMessage()
    m["From"] = "sender@example.test"
    m["To"] = "rcpt@example.test"
    m["Subject"] = subject
    m["Message-ID"] = message_id
    m.set_content(body)
    for data, ctype, filename in attachments:
        maintype, subtype = ctype.split("/")
        if maintype == "message":
            m.add_attachment(_parse(data), filename=filename)
        else:
            m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return m.as_bytes()


def _parse(raw: bytes):
    from email import message_from_bytes
    from email.policy import default

    return message_from_bytes(raw, policy=default)


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def aes_zip_of(members: dict[str, bytes], password: bytes) -> bytes:
    import pyzipper

    buf = io.BytesIO()
    with pyzipper.AESZipFile(buf, "w", compression=pyzipper.ZIP_DEFLATED,
                             encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(password)
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sevenzip_of(members: dict[str, bytes], password: str | None = None) -> bytes:
    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password=password) as z:
        for name, data in members.items():
            z.writestr(data, name)
    return buf.getvalue()


def gzip_of(data: bytes, name: str | None = None) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name or "", fileobj=buf, mode="wb", mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def bz2_of(data: bytes) -> bytes:
    return bz2.compress(data)


def xz_of(data: bytes) -> bytes:
    return lzma.compress(data)


# --- hand-written zips ----------------------------------------------------------------------

_EOCD = struct.Struct("<IHHHHIIH")


def raw_zip(entries: list[tuple[str, int, int, bytes, int, int]], centrals: int = 1) -> bytes:
    """A zip from (name, flags, method, stored bytes, crc, uncompressed size) entries. With
    ``centrals`` > 1 every entry gets that many central records pointing at the same local
    record (a full-overlap bomb)."""
    out, cd, count = bytearray(), bytearray(), 0
    for name, flags, method, payload, crc, usize in entries:
        offset, n = len(out), name.encode()
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc,
                           len(payload), usize, len(n), 0) + n + payload
        for _ in range(centrals):
            cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x21,
                              crc, len(payload), usize, len(n), 0, 0, 0, 0, 0, offset) + n
            count += 1
    return bytes(out + cd + _EOCD.pack(0x06054B50, 0, 0, count, count, len(cd), len(out), 0))


def zeros_deflate(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of zeros, made by repeating one flushed block (so
    building a gigabyte bomb costs milliseconds)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * mib + b"\x03\x00"


def zip_bomb(mib: int) -> bytes:
    """One member expanding to ``mib`` MiB of zeros (CRC deliberately not computed)."""
    return raw_zip([("zeros.bin", 0, 8, zeros_deflate(mib), 0, (mib << 20) & 0xFFFFFFFF)])


def gzip_bomb(mib: int) -> bytes:
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + zeros_deflate(mib) + struct.pack(
        "<II", 0, (mib << 20) & 0xFFFFFFFF)


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


def zipcrypto_zip(name: str, data: bytes, password: bytes) -> bytes:
    """A stored member encrypted with traditional PKWARE encryption (ZipCrypto)."""
    table = _crc_table()
    keys = [0x12345678, 0x23456789, 0x34567890]

    def update(b: int) -> None:
        keys[0] = (keys[0] >> 8) ^ table[(keys[0] ^ b) & 0xFF]
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = (keys[2] >> 8) ^ table[(keys[2] ^ (keys[1] >> 24)) & 0xFF]

    for b in password:
        update(b)
    crc = zlib.crc32(data)
    plain = bytes(range(11)) + bytes([crc >> 24]) + data
    out = bytearray()
    for b in plain:
        k = keys[2] | 2
        out.append(b ^ (((k * (k ^ 1)) >> 8) & 0xFF))
        update(b)
    return raw_zip([(name, 1, 0, bytes(out), crc, len(data))])


# --- TNEF and Outlook .msg --------------------------------------------------------------------


def tnef_of(name: str, data: bytes) -> bytes:
    """A minimal TNEF stream (winmail.dat) holding one attachment."""

    def obj(level: int, attr: int, atype: int, payload: bytes) -> bytes:
        return (bytes([level]) + struct.pack("<HHI", attr, atype, len(payload)) + payload
                + struct.pack("<H", sum(payload) & 0xFFFF))

    return (struct.pack("<IH", 0x223E9F78, 1)
            + obj(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))
            + obj(2, 0x9002, 0x0006, bytes(14))
            + obj(2, 0x8010, 0x0001, name.encode() + b"\0")
            + obj(2, 0x800F, 0x0006, data))


_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_FREE, _END, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def ole_of(tree: dict) -> bytes:
    """A small OLE compound file (version 3) from a tree of {name: bytes | subtree}. Every
    stream lives in the mini stream, so streams must stay under 4096 bytes."""
    entries: list[list] = [["Root Entry", 5, None, []]]  # name, type, data, child ids
    queue = [(0, tree)]
    while queue:
        parent, node = queue.pop(0)
        for name, value in node.items():
            entries.append([name, 1 if isinstance(value, dict) else 2,
                            None if isinstance(value, dict) else value, []])
            entries[parent][3].append(len(entries) - 1)
            if isinstance(value, dict):
                queue.append((len(entries) - 1, value))
    mini, minifat, starts = bytearray(), [], {}
    for i, (_, etype, data, _) in enumerate(entries):
        if etype == 2 and data:
            assert len(data) < 4096
            first = len(mini) // 64
            n = -(-len(data) // 64)
            starts[i] = first
            minifat += [first + k + 1 for k in range(n - 1)] + [_END]
            mini += data.ljust(n * 64, b"\0")
    assert len(minifat) <= 128
    dir_sectors = -(-len(entries) // 4)
    mini_sectors = -(-len(mini) // 512)
    first_mini = 2 + dir_sectors
    fat = [_FATSECT, _END]
    fat += [2 + k + 1 for k in range(dir_sectors - 1)] + [_END]
    if mini_sectors:
        fat += [first_mini + k + 1 for k in range(mini_sectors - 1)] + [_END]
    assert len(fat) <= 128
    directory = bytearray()
    for i, (name, etype, data, kids) in enumerate(entries):
        right = _NOSTREAM
        for (_, _, _, siblings) in entries:
            if i in siblings and siblings.index(i) + 1 < len(siblings):
                right = siblings[siblings.index(i) + 1]
        uname = name.encode("utf-16-le")
        if etype == 5:
            start, size = (first_mini if mini_sectors else _END), len(mini)
        else:
            start, size = starts.get(i, _END), len(data or b"")
        directory += struct.pack("<64sHBBIII16sIQQIQ", uname, len(uname) + 2, etype, 1,
                                 _NOSTREAM, right, kids[0] if kids else _NOSTREAM, bytes(16), 0,
                                 0, 0, start, size)
    directory = directory.ljust(dir_sectors * 512, b"\0")
    header = (_OLE_MAGIC + bytes(16) + struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6) + bytes(6)
              + struct.pack("<IIIIIIIII", 0, 1, 2, 0, 4096, 1, 1, _END, 0)
              + struct.pack("<109I", 0, *[_FREE] * 108))
    fat_sector = struct.pack(f"<{len(fat)}I", *fat).ljust(512, b"\xff")
    minifat_sector = struct.pack(f"<{len(minifat)}I", *minifat).ljust(512, b"\xff")
    return header + fat_sector + minifat_sector + bytes(directory) + bytes(mini).ljust(
        mini_sectors * 512, b"\0")


def outlook_msg(attachments: list[tuple[str, bytes | None]]) -> bytes:
    """An Outlook .msg with attachments (name, data); data None makes an embedded-object
    attachment without a binary data stream."""
    tree: dict = {"__properties_version1.0": bytes(32),
                  "__substg1.0_0037001F": "Outlook test".encode("utf-16-le")}
    for i, (name, data) in enumerate(attachments):
        att: dict = {"__properties_version1.0": bytes(8),
                     "__substg1.0_3707001F": name.encode("utf-16-le")}
        if data is not None:
            att["__substg1.0_37010102"] = data
        else:
            att["__substg1.0_3701000D"] = {"__properties_version1.0": bytes(8)}
        tree[f"__attach_version1.0_#{i:08X}"] = att
    return ole_of(tree)
