"""Helpers for the scan-stamp tests: Maildirs built with the email package, rule files, and
the real CLI run as a subprocess."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The EICAR test string, split so that no file of the repository matches it.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_RULE = 'rule Eicar_Test { strings: $a = "EICAR-STANDARD-ANTIVIRUS-TEST-FILE" condition: $a }\n'
MARKER = "ACME-MARKER-7731"
MARKER_RULE = f'rule Acme_Marker {{ strings: $a = "{MARKER}" condition: $a }}\n'
# An attachment above the verdict cache's minimum part size, shared by many messages.
SHARED = b"quarterly report, shared by many messages\n" * 100


def message(i: int, *, infected: bool = False, marked: bool = False, shared: bytes | None = None) -> bytes:
    """The bytes of test message ``i``: EICAR attached when ``infected``, the marker string in
    the body when ``marked``, ``shared`` attached when given."""
    return _template(infected, marked, shared).replace(b"NNUMN", str(i).encode())


@functools.lru_cache(maxsize=None)
def _template(infected: bool, marked: bool, shared: bytes | None) -> bytes:
    """A message with ``NNUMN`` where its number goes (building thousands with the email
    package one by one is slow)."""
    m = EmailMessage()
    m["From"] = "senderNNUMN@example.org"
    m["To"] = "rcpt@example.org"
    m["Subject"] = "message NNUMN"
    m["Message-ID"] = "<NNUMN@stamps.example>"
    m.set_content("Body of message NNUMN.\n" + (f"{MARKER}\n" if marked else ""))
    if infected:
        m.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="invoice.com")
    if shared is not None:
        m.add_attachment(shared, maintype="application", subtype="octet-stream", filename="report.bin")
    return m.as_bytes()


def unique(i: int) -> str:
    """The Maildir unique name (and so the rescan message id) of message ``i``."""
    return f"{1_000_000 + i}.M{i}P1.stamps"


def maildir(root: Path, folder: str | None = None) -> Path:
    """Create (if needed) the Maildir at ``root``, or its Maildir++ subfolder; returns its dir."""
    d = root if folder is None else root / f".{folder}"
    for sub in ("cur", "new", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


def put(root: Path, i: int, data: bytes, folder: str | None = None) -> Path:
    """Write message ``i`` into ``cur/`` of the folder; returns its path."""
    path = maildir(root, folder) / "cur" / f"{unique(i)}:2,S"
    path.write_bytes(data)
    return path


def rules_dir(path: Path, **files: str) -> Path:
    """A rules directory holding ``name.yar`` files with the given texts."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / f"{name}.yar").write_text(text)
    return path


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment for CLI runs: compiled rules cached under ``tmp_path``."""
    return dict(os.environ, RESCAN_CACHE_DIR=str(tmp_path / "rules-cache"))


def rescan(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m rescan ARGS`` from the repository root; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "rescan", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def scan(env: dict, store: Path, state: Path, rules: Path, *extra: str) -> tuple[int, dict]:
    """``rescan scan`` with a JSON report; returns (exit code, report)."""
    p = rescan(env, "scan", str(store), "--rules", str(rules), "--state", str(state), "--format", "json", "-q", *extra)
    assert p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout)


def by_id(report: dict) -> dict[str, dict]:
    """The report's messages by id."""
    return {m["id"]: m for m in report["messages"]}


def query(state: Path, sql: str, *params) -> list[tuple]:
    """Rows of a read-only query on the state file."""
    db = sqlite3.connect(f"{state.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def copy_state(src: Path, dst: Path) -> Path:
    """Copy a state file with SQLite's backup API (consistent whatever its WAL holds)."""
    with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(sqlite3.connect(dst)) as b:
        a.backup(b)
    return dst
