"""Messages and stores the tests build for themselves."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from pathlib import Path

# Assembled from two pieces so that no file of the project matches an EICAR signature.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def message(n: int, subject: str | None = None, body: str = "Hello.\n", attachments=()) -> bytes:
    """A small message numbered ``n``; ``attachments`` are (filename, bytes) pairs."""
    msg = EmailMessage()
    msg["From"] = f"sender{n}@example.org"
    msg["To"] = "rcpt@example.org"
    msg["Subject"] = subject or f"message {n}"
    msg["Message-ID"] = f"<m{n}@test.example>"
    msg.set_content(body)
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes()


def zipped(name: str, data: bytes) -> bytes:
    """A zip archive holding one member."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def make_maildir(root: Path, messages: dict[str, bytes]) -> Path:
    """A Maildir at ``root``; keys are ``folder/name`` (folder "" for INBOX, "Sub" for .Sub)."""
    for d in ("cur", "new", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for key, raw in messages.items():
        folder, _, name = key.rpartition("/")
        base = root / f".{folder}" if folder else root
        for d in ("cur", "new", "tmp"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "cur" / name).write_bytes(raw)
    return root


def infected_store(root: Path, total: int, infected: set[int]) -> Path:
    """A Maildir of ``total`` messages; those numbered in ``infected`` carry EICAR, as a plain
    attachment, in a zip, or in a forwarded message, in turn. Messages alternate between INBOX
    and the subfolder Archive."""
    msgs = {}
    for n in range(total):
        folder = "" if n % 2 == 0 else "Archive"
        if n in infected:
            kind = n % 3
            if kind == 0:
                raw = message(n, attachments=[("invoice.com", EICAR)])
            elif kind == 1:
                raw = message(n, attachments=[("docs.jpg", zipped("run.exe", EICAR))])
            else:
                inner = message(10_000 + n, attachments=[("advice.com", EICAR)])
                msg = EmailMessage()
                msg["Subject"] = f"Fwd: message {n}"
                msg["Message-ID"] = f"<m{n}@test.example>"
                msg.set_content("forwarded")
                msg.add_attachment(inner, maintype="message", subtype="rfc822")
                raw = msg.as_bytes()
        else:
            raw = message(n, body=f"Nothing to see in message {n}.\n" * 5)
        msgs[f"{folder}/{n:06d}.M{n}P1.test"] = raw
    return make_maildir(root, msgs)
