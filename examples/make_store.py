"""Rebuild the example store ``examples/maildir`` (a Maildir with one Maildir++ subfolder).

Run from the repository root: ``python examples/make_store.py``. The store holds clean mail,
EICAR attached, EICAR in a zip disguised as a photo, and EICAR in a forwarded message.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from email.message import EmailMessage
from email.utils import format_datetime
from datetime import datetime, timezone
from pathlib import Path

# The EICAR test string, split so that this file itself is not detected.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ROOT = Path(__file__).resolve().parent / "maildir"


def message(n: int, subject: str, body: str, sender: str = "alice@example.org") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime(2026, 11, n, 9, 30, tzinfo=timezone.utc))
    msg["Message-ID"] = f"<example-{n}@rescan.example>"
    msg.set_content(body)
    return msg


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def build() -> dict[str, EmailMessage]:
    msgs: dict[str, EmailMessage] = {}
    msgs["cur/1001.M1P1.example"] = message(1, "Lunch on Friday?", "Shall we meet at noon?\n")
    m = message(2, "Quarterly figures", "The figures are attached.\n")
    m.add_attachment(b"quarter,revenue\nQ3,1200\n", maintype="text", subtype="csv", filename="q3.csv")
    msgs["cur/1002.M2P1.example"] = m
    m = message(3, "Your invoice", "Please open the attached file.\n", sender="billing@invalid.example")
    m.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="invoice.com")
    msgs["new/1003.M3P1.example"] = m
    m = message(4, "Scanned documents", "See the archive.\n", sender="scanner@invalid.example")
    m.add_attachment(zipped("scan_0042.exe", EICAR), maintype="image", subtype="jpeg", filename="photo.jpg")
    msgs["new/1004.M4P1.example"] = m
    inner = message(5, "Original: payment advice", "Details attached.\n", sender="payments@invalid.example")
    inner.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="advice.com")
    m = message(6, "Fwd: payment advice", "Forwarding this, looks odd.\n", sender="carol@example.org")
    m.add_attachment(inner)
    msgs[".Archive/cur/1006.M6P1.example"] = m
    msgs[".Archive/cur/1007.M7P1.example"] = message(7, "Minutes of the meeting", "Attached are the minutes.\n")
    return msgs


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for sub in ("", ".Archive/"):
        for d in ("cur", "new", "tmp"):
            (ROOT / sub / d).mkdir(parents=True, exist_ok=True)
            (ROOT / sub / d / ".keep").touch()
    (ROOT / ".Archive" / "maildirfolder").touch()
    for name, msg in build().items():
        (ROOT / name).write_bytes(msg.as_bytes())
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
