"""The state store: scan stamps, verdicts, a content-hash verdict cache, run history and the
run lock, in one SQLite file.

The store never holds mail content: no bodies, no part data, no subjects. A message row holds
its identity (source, mailbox, folder, native id), its version token, size and Message-ID, the
stamp it was last scanned with (component name → fingerprint), its status, findings (rule,
namespace, part path, sha256, meta) and problems.

A stamp names every rule file (hundreds in public rule sets) and nearly all messages share one
of a few stamps, so stamps live once each in their own table (canonical JSON) and messages
point to them; stamps read back are shared between messages and must be treated as read-only.

The file runs in WAL mode with ``synchronous=NORMAL``: every ``record()`` batch is one
transaction, so a SIGKILL loses at most the batch being written. The schema is versioned with
``PRAGMA user_version`` and upgraded by the functions in ``MIGRATIONS``. A store is used from
one thread at a time. Every ``sqlite3`` error is translated into ``StateError`` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import platformdirs

from rescan.errors import LockedError, StateError

Key = tuple[str, str, str, str]

# Fewer bound parameters per statement than SQLite's historical limit of 999.
_CHUNK = 500
# Rows fetched per page when iterating; no cursor stays open across a yield.
_PAGE = 1000
# Parsed stamps kept per store; a run sees a handful, this only bounds pathological cases.
_STAMP_MEMO = 4096
# Milliseconds a writer waits for another one before SQLITE_BUSY; batches are short.
_BUSY_TIMEOUT_MS = 15_000


@dataclass(frozen=True)
class StoredMessage:
    """What the state knows about one message (never its content).

    ``stamp`` maps a component name (rule file relative path, ``"clamav"``) to the fingerprint
    the message was last scanned with; stamps read from the store are shared between messages,
    so never mutate one (build a new dict). ``status`` is a ``Status`` value; ``findings`` and
    ``problems`` hold ``Finding.to_json()`` / ``Problem.to_json()`` dicts. ``action`` records an
    action already applied (e.g. ``"quarantine:Quarantine"``) so a rerun never applies it twice.
    """

    source: str
    mailbox: str
    folder: str
    id: str
    version: str
    size: int | None
    message_id: str | None
    stamp: dict[str, str]
    status: str
    findings: list[dict]
    problems: list[dict]
    first_seen_run: int | None
    last_scan_run: int | None
    action: str | None = None
    action_detail: str | None = None

    @property
    def key(self) -> Key:
        """Identity of the message: (source, mailbox, folder, id)."""
        return (self.source, self.mailbox, self.folder, self.id)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _dumps(value: Any) -> str:
    """Canonical JSON, so equal stamps are equal strings."""
    if isinstance(value, list) and not value:
        return "[]"
    return _ENCODER.encode(value)


def _loads_list(text: str) -> list:
    return [] if text == "[]" else json.loads(text)


def _chunks(seq: list, size: int = _CHUNK) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


# --- schema -------------------------------------------------------------------------------


def _schema_v1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            start TEXT NOT NULL,
            "end" TEXT,
            complete INTEGER NOT NULL DEFAULT 0,
            definitions TEXT NOT NULL,
            sources TEXT NOT NULL,
            summary TEXT)"""
    )
    db.execute(
        """CREATE TABLE stamps (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            digest TEXT NOT NULL UNIQUE,
            json TEXT NOT NULL)"""
    )
    db.execute(
        """CREATE TABLE messages (
            source TEXT NOT NULL,
            mailbox TEXT NOT NULL,
            folder TEXT NOT NULL,
            id TEXT NOT NULL,
            version TEXT NOT NULL,
            size INTEGER,
            message_id TEXT,
            stamp_id INTEGER NOT NULL REFERENCES stamps (id),
            status TEXT NOT NULL,
            findings TEXT NOT NULL,
            problems TEXT NOT NULL,
            first_seen_run INTEGER,
            last_scan_run INTEGER,
            action TEXT,
            action_detail TEXT,
            PRIMARY KEY (source, mailbox, folder, id)) WITHOUT ROWID"""
    )
    db.execute(
        "CREATE INDEX messages_not_clean ON messages (source, mailbox, folder, id)"
        " WHERE status <> 'clean'"
    )
    db.execute(
        """CREATE TABLE folders (
            source TEXT NOT NULL,
            mailbox TEXT NOT NULL,
            folder TEXT NOT NULL,
            token TEXT,
            PRIMARY KEY (source, mailbox, folder)) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE verdict_cache (
            sha256 TEXT NOT NULL,
            component_fp TEXT NOT NULL,
            findings TEXT NOT NULL,
            PRIMARY KEY (component_fp, sha256)) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE lock (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            token TEXT NOT NULL,
            pid INTEGER NOT NULL,
            proc_start TEXT NOT NULL,
            hostname TEXT NOT NULL,
            boot_id TEXT NOT NULL,
            started TEXT NOT NULL,
            run_label TEXT NOT NULL)"""
    )


# MIGRATIONS[i] upgrades a database from user_version i to i + 1. Append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_schema_v1]


# --- process identity for the lock ----------------------------------------------------------


def _boot_id() -> str:
    """An id of the current boot ("" where the platform does not tell)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot ("" where unknown), to tell a
    reused pid from the process that took the lock."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host."""
    if sys.platform == "win32":
        # os.kill() on Windows terminates the process; ask the kernel instead.
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed process its parent has not reaped yet still answers signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --- the store ------------------------------------------------------------------------------


class StateStore:
    """SQLite state of rescan: one file, WAL, versioned schema (see the module docstring).

    Takes the path of the database file (parent directories are created). Raises
    ``StateError`` when the file cannot be opened, is not a database, or has a schema newer
    than this version of rescan knows. Usable as a context manager (closes, releasing the
    lock if held).
    """

    _COLUMNS = (
        "source, mailbox, folder, id, version, size, message_id, stamp_id, status, findings,"
        " problems, first_seen_run, last_scan_run, action, action_detail"
    )

    def __init__(self, path: str | Path, threads: bool = False):
        """Open (and create or migrate) the state file. ``threads=True`` lets the store be
        used from other threads than the one that opened it, one call at a time (the caller
        serialises). Raises StateError."""
        self.path = Path(path)
        self._lock_token: str | None = None
        self._stamps: dict[int, dict[str, str]] = {}
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"state {self.path}: cannot create its directory: {e.strerror}") from e
        with self._errors():
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000,
                check_same_thread=not threads,
            )
            try:
                self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
            except BaseException:
                self._db.close()
                self._db = None
                raise

    @staticmethod
    def default_path() -> Path:
        """The default state file: ``state.sqlite`` in the user's state directory."""
        return platformdirs.user_state_path("rescan") / "state.sqlite"

    def close(self) -> None:
        """Release the lock if this store holds it and close the database. Idempotent."""
        if self._db is None:
            return
        try:
            if self._lock_token is not None:
                self.release_lock()
        finally:
            self._db.close()
            self._db = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StateError(f"state {self.path}: {e}") from e

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"state {self.path}: the store is closed")
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue here, not at commit)."""
        db = self._conn
        with self._errors():
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself after some errors
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _migrate(self) -> None:
        db = self._conn
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StateError(
                f"state {self.path}: schema version {version} is newer than this rescan knows"
                f" ({len(MIGRATIONS)}); upgrade rescan or use another --state"
            )
        for target in range(version + 1, len(MIGRATIONS) + 1):
            with self._transaction():
                # Another process may have migrated while we waited for the write lock.
                if db.execute("PRAGMA user_version").fetchone()[0] >= target:
                    continue
                MIGRATIONS[target - 1](db)
                db.execute(f"PRAGMA user_version = {target}")

    # --- lock

    def acquire_lock(self, run_label: str) -> None:
        """Take the run lock of this state file (one run at a time).

        Takes a label naming the run (shown to whoever finds the lock held). A lock left by a
        dead process on this host, by a reused pid, or from an earlier boot is taken over.
        Raises ``LockedError`` when a live process holds it (or a process on another host,
        whose liveness cannot be checked). Re-acquiring a lock this store holds does nothing.
        """
        me = (os.getpid(), _proc_start(os.getpid()), socket.gethostname(), _boot_id())
        with self._transaction() as db:
            row = db.execute(
                "SELECT token, pid, proc_start, hostname, boot_id, started FROM lock"
            ).fetchone()
            if row is not None:
                token, pid, proc_start, hostname, boot_id, started = row
                if token == self._lock_token:
                    return
                if self._lock_is_live(pid, proc_start, hostname, boot_id):
                    where = "" if hostname == me[2] else f" on host {hostname}"
                    raise LockedError(
                        f"state {self.path} is locked by pid {pid}{where} (started {started})"
                    )
            token = uuid.uuid4().hex
            db.execute(
                "INSERT OR REPLACE INTO lock VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (token, *me, _now(), run_label),
            )
        self._lock_token = token

    @staticmethod
    def _lock_is_live(pid: int, proc_start: str, hostname: str, boot_id: str) -> bool:
        if hostname != socket.gethostname():
            return True
        if boot_id and boot_id != _boot_id():
            return False
        if not _pid_alive(pid):
            return False
        return not (proc_start and proc_start != _proc_start(pid))

    def release_lock(self) -> None:
        """Release the run lock if this store holds it (a lock taken over by another run is
        left alone)."""
        if self._lock_token is None:
            return
        with self._transaction() as db:
            db.execute("DELETE FROM lock WHERE token = ?", (self._lock_token,))
        self._lock_token = None

    # --- runs

    def begin_run(self, definitions: dict, sources: list[str]) -> int:
        """Record the start of a run. Takes the definitions (JSON-able dict) and the source
        URLs (never with secrets). Returns the run id."""
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO runs (start, definitions, sources) VALUES (?, ?, ?)",
                (_now(), _dumps(definitions), _dumps(sources)),
            )
            return int(cur.lastrowid)

    def end_run(self, run_id: int, summary: dict, complete: bool) -> None:
        """Record the end of run ``run_id`` with its summary; ``complete`` is False when the
        run stopped early (``--max-duration``, errors) and must be continued. Stamps no
        message uses any more are dropped. Raises ``StateError`` for an unknown run."""
        with self._transaction() as db:
            cur = db.execute(
                'UPDATE runs SET "end" = ?, summary = ?, complete = ? WHERE id = ?',
                (_now(), _dumps(summary), int(complete), run_id),
            )
            if cur.rowcount != 1:
                raise StateError(f"state {self.path}: no run {run_id}")
            db.execute("DELETE FROM stamps WHERE id NOT IN (SELECT stamp_id FROM messages)")

    def last_complete_run(self) -> dict | None:
        """The latest run that ended complete, or None. Returns a dict with ``id``, ``start``,
        ``end``, ``complete``, ``definitions``, ``summary``, ``sources``."""
        return self._run_where("WHERE complete = 1")

    def last_run(self) -> dict | None:
        """The latest run started, complete or not (same dict as ``last_complete_run``)."""
        return self._run_where("")

    def _run_where(self, where: str) -> dict | None:
        with self._errors():
            row = self._conn.execute(
                'SELECT id, start, "end", complete, definitions, summary, sources FROM runs '
                f"{where} ORDER BY id DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "start": row[1],
            "end": row[2],
            "complete": bool(row[3]),
            "definitions": json.loads(row[4]),
            "summary": json.loads(row[5]) if row[5] is not None else None,
            "sources": json.loads(row[6]),
        }

    # --- messages

    def _stamp(self, stamp_id: int) -> dict[str, str]:
        """The stamp with this id, parsed once per store (ids are never reused)."""
        stamp = self._stamps.get(stamp_id)
        if stamp is None:
            if len(self._stamps) >= _STAMP_MEMO:
                self._stamps.clear()
            row = self._conn.execute("SELECT json FROM stamps WHERE id = ?", (stamp_id,)).fetchone()
            stamp = self._stamps[stamp_id] = json.loads(row[0])
        return stamp

    def _stamp_ids(self, db: sqlite3.Connection, items: list[StoredMessage]) -> list[int]:
        """The stamp id of each item, storing new stamps. Items of a batch nearly always share
        a few stamps: compare by identity, then by equality, before encoding any."""
        by_identity: dict[int, int] = {}
        distinct: list[tuple[dict[str, str], int]] = []
        out = []
        for m in items:
            sid = by_identity.get(id(m.stamp))
            if sid is None:
                sid = next((i for d, i in distinct if d == m.stamp), None)
                if sid is None:
                    text = _dumps(m.stamp)
                    digest = hashlib.sha256(text.encode()).hexdigest()
                    db.execute(
                        "INSERT OR IGNORE INTO stamps (digest, json) VALUES (?, ?)", (digest, text)
                    )
                    sid = db.execute(
                        "SELECT id FROM stamps WHERE digest = ?", (digest,)
                    ).fetchone()[0]
                    distinct.append((m.stamp, sid))
                by_identity[id(m.stamp)] = sid
            out.append(sid)
        return out

    def _message(self, row: tuple) -> StoredMessage:
        source, mailbox, folder, id_, version, size, message_id, stamp_id = row[:8]
        return StoredMessage(
            source, mailbox, folder, id_, version, size, message_id, self._stamp(stamp_id),
            row[8], _loads_list(row[9]), _loads_list(row[10]), *row[11:],
        )  # fmt: skip

    @staticmethod
    def _by_folder(keys: Iterable[Key]) -> dict[tuple[str, str, str], list[str]]:
        groups: dict[tuple[str, str, str], list[str]] = {}
        for source, mailbox, folder, id_ in keys:
            groups.setdefault((source, mailbox, folder), []).append(id_)
        return groups

    def get_messages(self, keys: list[Key]) -> dict[Key, StoredMessage]:
        """Look up many messages at once. Takes (source, mailbox, folder, id) keys; returns the
        known ones by key (unknown keys are absent)."""
        out: dict[Key, StoredMessage] = {}
        with self._errors():
            db = self._conn
            for (source, mailbox, folder), ids in self._by_folder(keys).items():
                for chunk in _chunks(ids):
                    marks = ",".join("?" * len(chunk))
                    for row in db.execute(
                        f"SELECT {self._COLUMNS} FROM messages WHERE source = ? AND mailbox = ?"
                        f" AND folder = ? AND id IN ({marks})",
                        (source, mailbox, folder, *chunk),
                    ):
                        out[row[:4]] = self._message(row)
        return out

    def record(self, run_id: int, items: list[StoredMessage]) -> None:
        """Insert or update a batch of messages in one transaction: either the whole batch is
        stored or none of it.

        ``first_seen_run`` keeps the stored value (else the item's, else ``run_id``);
        ``last_scan_run`` is the item's, else ``run_id``. An item without ``action`` keeps the
        stored action while the version token is unchanged (a changed message has had none).
        Items sharing one stamp dict object (the run's current stamp) are stored fastest.
        """

        def rows(stamp_ids: list[int]) -> Iterator[tuple]:
            for m, stamp_id in zip(items, stamp_ids):
                yield (
                    m.source, m.mailbox, m.folder, m.id, m.version, m.size, m.message_id,
                    stamp_id, m.status, _dumps(m.findings), _dumps(m.problems),
                    m.first_seen_run if m.first_seen_run is not None else run_id,
                    m.last_scan_run if m.last_scan_run is not None else run_id,
                    m.action, m.action_detail,
                )  # fmt: skip

        with self._transaction() as db:
            db.executemany(
                f"INSERT INTO messages ({self._COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source, mailbox, folder, id) DO UPDATE SET"
                " version = excluded.version, size = excluded.size,"
                " message_id = excluded.message_id, stamp_id = excluded.stamp_id,"
                " status = excluded.status, findings = excluded.findings,"
                " problems = excluded.problems,"
                " first_seen_run = coalesce(messages.first_seen_run, excluded.first_seen_run),"
                " last_scan_run = excluded.last_scan_run,"
                " action_detail = CASE WHEN excluded.action IS NOT NULL"
                "   THEN excluded.action_detail WHEN messages.version = excluded.version"
                "   THEN messages.action_detail END,"
                " action = CASE WHEN excluded.action IS NOT NULL THEN excluded.action"
                "   WHEN messages.version = excluded.version THEN messages.action END",
                rows(self._stamp_ids(db, items)),
            )

    def _paged(self, where: str, params: tuple) -> Iterator[StoredMessage]:
        """Messages matching ``where`` in key order, a page at a time (no cursor is held open
        while the caller works, so it may write to the store meanwhile)."""
        after: tuple = ()
        while True:
            cond = where + (" AND (source, mailbox, folder, id) > (?, ?, ?, ?)" if after else "")
            with self._errors():
                rows = self._conn.execute(
                    f"SELECT {self._COLUMNS} FROM messages WHERE {cond}"
                    f" ORDER BY source, mailbox, folder, id LIMIT {_PAGE}",
                    params + after,
                ).fetchall()
            for row in rows:
                yield self._message(row)
            if len(rows) < _PAGE:
                return
            after = tuple(rows[-1][:4])

    def messages_in_folder(self, source: str, mailbox: str, folder: str) -> Iterator[StoredMessage]:
        """Every known message of one folder, ordered by id."""
        return self._paged("source = ? AND mailbox = ? AND folder = ?", (source, mailbox, folder))

    def not_clean_in_folder(self, source: str, mailbox: str, folder: str) -> Iterator[StoredMessage]:
        """The messages of one folder whose current status is not ``clean``, ordered by id."""
        return self._paged(
            "source = ? AND mailbox = ? AND folder = ? AND status <> 'clean'", (source, mailbox, folder)
        )

    def count_clean(self, source: str, mailbox: str, folder: str, exclude: Iterable[str] = ()) -> int:
        """How many messages of one folder are ``clean``, leaving out the ids in ``exclude``
        (counted in one read snapshot, whatever other connections commit meanwhile)."""
        where = "source = ? AND mailbox = ? AND folder = ? AND status = 'clean'"
        params = (source, mailbox, folder)
        db = self._conn
        with self._errors():
            db.execute("BEGIN")
            try:
                n = db.execute(f"SELECT count(*) FROM messages WHERE {where}", params).fetchone()[0]
                for chunk in _chunks(sorted(set(exclude))):
                    n -= db.execute(
                        f"SELECT count(*) FROM messages WHERE {where} AND id IN ({','.join('?' * len(chunk))})",
                        params + tuple(chunk),
                    ).fetchone()[0]
            finally:
                db.execute("COMMIT")
        return n

    def ids_in_folder(self, source: str, mailbox: str, folder: str) -> list[str]:
        """The native ids of every known message of one folder (cheap: no rows built)."""
        with self._errors():
            rows = self._conn.execute(
                "SELECT id FROM messages WHERE source = ? AND mailbox = ? AND folder = ?",
                (source, mailbox, folder),
            ).fetchall()
        return [r[0] for r in rows]

    def iter_not_clean(self) -> Iterator[StoredMessage]:
        """Every message whose current status is not ``clean``, ordered by key (for reports)."""
        return self._paged("status <> 'clean'", ())

    def forget(self, keys: Iterable[Key]) -> None:
        """Delete messages that are gone from their store (one transaction)."""
        with self._transaction() as db:
            for (source, mailbox, folder), ids in self._by_folder(keys).items():
                for chunk in _chunks(ids):
                    db.execute(
                        "DELETE FROM messages WHERE source = ? AND mailbox = ? AND folder = ?"
                        f" AND id IN ({','.join('?' * len(chunk))})",
                        (source, mailbox, folder, *chunk),
                    )

    def forget_folder(self, source: str, mailbox: str, folder: str) -> None:
        """Delete every message of one folder (its ids were reset, e.g. a new UIDVALIDITY)."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM messages WHERE source = ? AND mailbox = ? AND folder = ?",
                (source, mailbox, folder),
            )

    def mark_action(self, key: Key, action: str, detail: str) -> None:
        """Record that ``action`` (e.g. ``"quarantine:Quarantine"``) was applied to a message,
        with a detail (e.g. where the copy went). Raises ``StateError`` for an unknown message."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE messages SET action = ?, action_detail = ?"
                " WHERE source = ? AND mailbox = ? AND folder = ? AND id = ?",
                (action, detail, *key),
            )
            if cur.rowcount != 1:
                raise StateError(f"state {self.path}: no message {key!r}")

    # --- status

    def status(self, components: dict[str, str]) -> list[dict]:
        """Coverage per source and mailbox, ordered by source and mailbox.

        Takes the current definitions as component name → fingerprint. Returns dicts with
        ``source``, ``mailbox``, ``messages`` (known), ``current`` (stamp equals
        ``components`` exactly), ``coverage`` (percent of ``current``, never shown as 100 while
        one is outdated), ``infected``, ``partial``, ``errors``, ``skipped``,
        ``last_scan_run`` and ``last_scan`` (start time of that run, ISO 8601).
        """
        with self._errors():
            rows = self._conn.execute(
                "SELECT g.*, runs.start FROM (SELECT source, mailbox, count(*),"
                " sum(stamp_id IS (SELECT id FROM stamps WHERE digest = ?)),"
                " sum(status = 'infected'), sum(status = 'partial'),"
                " sum(status = 'error'), sum(status = 'skipped'), max(last_scan_run) AS run"
                " FROM messages GROUP BY source, mailbox) AS g"
                " LEFT JOIN runs ON runs.id = g.run ORDER BY g.source, g.mailbox",
                (hashlib.sha256(_dumps(components).encode()).hexdigest(),),
            ).fetchall()
        out = []
        for source, mailbox, known, current, infected, partial, errors, skipped, run, start in rows:
            coverage = round(100.0 * current / known, 2)
            if current < known:
                coverage = min(coverage, 99.99)
            out.append(
                {
                    "source": source,
                    "mailbox": mailbox,
                    "messages": known,
                    "current": current,
                    "coverage": coverage,
                    "infected": infected,
                    "partial": partial,
                    "errors": errors,
                    "skipped": skipped,
                    "last_scan_run": run,
                    "last_scan": start,
                }
            )
        return out

    # --- folders

    def folder_token(self, source: str, mailbox: str, folder: str) -> str | None:
        """The token last stored for a folder (e.g. IMAP UIDVALIDITY), or None."""
        with self._errors():
            row = self._conn.execute(
                "SELECT token FROM folders WHERE source = ? AND mailbox = ? AND folder = ?",
                (source, mailbox, folder),
            ).fetchone()
        return None if row is None else row[0]

    def set_folder_token(self, source: str, mailbox: str, folder: str, token: str | None) -> None:
        """Store a folder's token; when it changes the caller forgets the folder's messages."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO folders VALUES (?, ?, ?, ?)",
                (source, mailbox, folder, token),
            )

    # --- verdict cache

    def cache_get(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], list[dict]]:
        """Cached findings by content. Takes (part sha256, component fingerprint) pairs;
        returns findings (JSON dicts; an empty list means scanned clean) for the pairs present."""
        by_fp: dict[str, list[str]] = {}
        for sha, fp in pairs:
            by_fp.setdefault(fp, []).append(sha)
        out: dict[tuple[str, str], list[dict]] = {}
        with self._errors():
            db = self._conn
            for fp, shas in by_fp.items():
                for chunk in _chunks(shas):
                    for sha, findings in db.execute(
                        "SELECT sha256, findings FROM verdict_cache WHERE component_fp = ?"
                        f" AND sha256 IN ({','.join('?' * len(chunk))})",
                        (fp, *chunk),
                    ):
                        out[(sha, fp)] = _loads_list(findings)
        return out

    def cache_put(self, rows: list[tuple[str, str, list[dict]]]) -> None:
        """Store findings per (part sha256, component fingerprint), replacing earlier ones;
        one transaction."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO verdict_cache (sha256, component_fp, findings)"
                " VALUES (?, ?, ?)",
                ((sha, fp, _dumps(findings)) for sha, fp, findings in rows),
            )


class CacheReader:
    """Read-only access to the verdict cache, for worker processes (one per process).

    Opened lazily with ``mode=ro``; a state file that does not exist yet, or any SQLite error,
    reads as a cache miss: the part is then simply scanned.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def get(self, sha256: str, component_fp: str) -> list[dict] | None:
        """Cached findings for one part and component-set fingerprint, or None on a miss."""
        try:
            if self._db is None:
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
            row = self._db.execute(
                "SELECT findings FROM verdict_cache WHERE component_fp = ? AND sha256 = ?",
                (component_fp, sha256),
            ).fetchone()
        except sqlite3.Error:
            return None
        return _loads_list(row[0]) if row else None
