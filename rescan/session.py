"""A run's use of the state store: lock, run history, planner, batched commits, status.

``StateSession.open(settings, definitions)`` is a context manager. Without ``settings.state``
it is a null session (no stamps, no cache: every message is scanned). With it, it takes the
lock (a second live run fails with LockedError, exit 2), records the run, plans against
stamps, and commits records in batches so a crash loses at most the current batch.

The session is also the pipeline's ``Ledger`` (incremental listing): a folder's token in the
state holds the connector's cursor and the definitions version the folder was last completed
with. The cursor is used only when that version is the current one and ``--full`` is not given:
then every message of the folder known to the state carries the current stamp, and only what
changed since needs listing. A token of other definitions is cleared before any record of the
folder is committed, and a new one stored only once every record of the folder is committed,
so an interrupted run never leaves a cursor over messages it did not stamp. When a folder
listed whole is done, its known messages that were not seen (expunged from the store) are
forgotten.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from rescan.definitions import Definitions
from rescan.models import MessageRef, Status
from rescan.pipeline import FullScanPlanner, Planner, Record

COMMIT_EVERY = 200  # records per transaction: a SIGKILL loses at most this many scans
COMMIT_SECONDS = 2.0  # ... or this much time, whichever comes first
NOT_CLEAN_BATCH = 500  # known not-clean messages of an incremental folder planned per batch


def default_state_path() -> Path:
    """The state file in the user's state directory."""
    from rescan.state import StateStore

    return StateStore.default_path()


def previous_components(state: str | Path | None) -> dict[str, str] | None:
    """Component fingerprints of the last complete run in ``state`` (None without one)."""
    if not state or not Path(state).exists():
        return None
    from rescan.state import StateStore

    with StateStore(state) as store:
        last = store.last_complete_run()
    return last["definitions"].get("components") if last else None


class StateSession:
    """Bookkeeping of one run against the state store (or none)."""

    def __init__(self, store, definitions: Definitions, full: bool):
        self.store = store
        self.definitions = definitions
        self.full = full
        self.components = definitions.components()
        self.previous_components: dict[str, str] | None = None
        self.cache_path: str | None = None
        self.run_id: int | None = None
        self._pending: list[Record] = []
        self._seen: dict[tuple[str, str, str], set[str]] = {}  # ids seen this run, per folder
        self._planner_store = None
        self._ledger_store = None  # the fetch threads' connection, one call at a time
        self._ledger_lock = threading.Lock()
        self._last_commit = time.monotonic()

    @classmethod
    def open(cls, settings, definitions: Definitions) -> StateSession:
        """A session for ``settings.state`` (a null session when it is None)."""
        if not settings.state:
            return cls(None, definitions, True)
        from rescan.state import StateStore

        store = StateStore(settings.state)
        session = cls(store, definitions, settings.full)
        try:
            store.acquire_lock("rescan " + " ".join(s.url for s in settings.sources))
        except BaseException:
            store.close()
            raise
        last = store.last_complete_run()
        session.previous_components = last["definitions"].get("components") if last else None
        session.cache_path = str(settings.state)
        session.run_id = store.begin_run(
            {"version": definitions.version, "components": session.components},
            [s.url for s in settings.sources],
        )
        return session

    def __enter__(self) -> StateSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.store is None:
            return
        try:
            self.flush()
            if exc is not None and self.run_id is not None:
                self.store.end_run(self.run_id, {"error": str(exc)}, complete=False)
        finally:
            for extra in (self._planner_store, self._ledger_store):
                if extra is not None:
                    extra.close()
            self.store.release_lock()
            self.store.close()

    def planner(self) -> Planner:
        """The planner for this run."""
        if self.store is None:
            return FullScanPlanner()
        from rescan.planner import StatePlanner
        from rescan.state import StateStore

        # The planner runs in the fetch threads (one at a time): it gets its own connection.
        self._planner_store = StateStore(self.store.path, threads=True)
        return StatePlanner(self._planner_store, self.components, self.full)

    def cache_key_of(self, components: tuple[str, ...] | None) -> str | None:
        """Verdict-cache key of a component set (None without a state store)."""
        return None if self.store is None else self.definitions.fingerprint_of(components)

    def add(self, rec: Record) -> None:
        """Note the message as seen; queue its record for the next batch commit; commit when
        the batch is full."""
        if self.store is None:
            return
        r = rec.ref
        self._seen.setdefault((r.source, r.mailbox, r.folder), set()).add(r.id)
        if rec.plan.kind == "skip" and not rec.plan.rewrite:
            return
        self._pending.append(rec)
        if len(self._pending) >= COMMIT_EVERY or time.monotonic() - self._last_commit > COMMIT_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Commit queued records and their verdict-cache rows in one transaction each."""
        from rescan.state import StoredMessage

        self._last_commit = time.monotonic()
        if self.store is None or not self._pending:
            return
        items, rows = [], []
        current, none = self.components, {}  # shared: the store encodes each distinct stamp once
        for rec in self._pending:
            v = rec.verdict
            stamp = none if v.status is Status.ERROR else current
            r = rec.ref
            items.append(
                StoredMessage(
                    source=r.source, mailbox=r.mailbox, folder=r.folder, id=r.id,
                    version=r.version, size=r.size, message_id=v.message_id, stamp=stamp,
                    status=v.status.value, findings=[f.to_json() for f in v.findings],
                    problems=[p.to_json() for p in v.problems],
                    first_seen_run=self.run_id, last_scan_run=self.run_id,
                )
            )
            rows.extend(rec.cache_rows)
        self._pending.clear()
        self.store.record(self.run_id, items)
        if rows:
            self.store.cache_put(rows)

    def action_done(self, key: tuple[str, str, str, str]) -> str | None:
        """The action already applied to a message in an earlier run, if any."""
        if self.store is None:
            return None
        self.flush()
        stored = self.store.get_messages([key]).get(key)
        return stored.action if stored else None

    def mark_action(self, key: tuple[str, str, str, str], action: str, detail: str) -> None:
        """Record that ``action`` was applied, so a rerun does not apply it again."""
        if self.store is not None:
            self.store.mark_action(key, action, detail)

    def finish(self, report) -> None:
        """Commit what is left and close the run in the history."""
        if self.store is None:
            return
        self.flush()
        self.store.end_run(self.run_id, report.summary.to_json(), complete=report.complete and not report.errors)


    # -- the pipeline's Ledger (see the module docstring) ------------------------------------

    def _fetch_side(self):
        """The fetch threads' own connection to the state (callers hold ``_ledger_lock``)."""
        if self._ledger_store is None:
            from rescan.state import StateStore

            self._ledger_store = StateStore(self.store.path, threads=True)
        return self._ledger_store

    def cursor(self, source: str, mailbox: str, folder: str) -> str | None:
        """The folder's stored cursor when it may be used (see the module docstring), else
        None; a token stored with other definitions is cleared. Called from fetch threads."""
        if self.store is None:
            return None
        with self._ledger_lock:
            store = self._fetch_side()
            token = store.folder_token(source, mailbox, folder)
            if token is None:
                return None
            version, cursor = parse_folder_token(token)
            if version != self.definitions.version:
                store.set_folder_token(source, mailbox, folder, None)
                return None
        return None if self.full else cursor

    def forget(self, source: str, mailbox: str, folder: str, ids: Sequence[str]) -> None:
        """Delete messages expunged from the folder. Called from fetch threads."""
        if self.store is None or not ids:
            return
        with self._ledger_lock:
            self._fetch_side().forget([(source, mailbox, folder, i) for i in ids])

    def not_clean(self, source: str, mailbox: str, folder: str, exclude: set[str]) -> Iterator[list[MessageRef]]:
        """The folder's known messages whose verdict is not clean (ids in ``exclude`` left
        out), as refs in batches, to be planned again. Called from fetch threads."""
        if self.store is None:
            return
        with self._ledger_lock:
            rows = self._fetch_side().not_clean_in_folder(source, mailbox, folder)
        while True:
            with self._ledger_lock:  # each page is read under the lock
                page = list(itertools.islice(rows, NOT_CLEAN_BATCH))
            batch = [
                MessageRef(m.source, m.mailbox, m.folder, m.id, m.version, m.size)
                for m in page if m.id not in exclude
            ]
            if batch:
                yield batch
            if len(page) < NOT_CLEAN_BATCH:
                return

    def clean_count(self, source: str, mailbox: str, folder: str, exclude: set[str]) -> int:
        """How many of the folder's known messages are clean, ids in ``exclude`` left out.
        Called from fetch threads."""
        if self.store is None:
            return 0
        with self._ledger_lock:
            return self._fetch_side().count_clean(source, mailbox, folder, exclude)

    def folder_done(self, source: str, mailbox: str, folder: str, cursor: str | None, whole: bool) -> None:
        """Every record of the folder was consumed: commit them, forget the messages a whole
        listing did not see, then store the folder's new cursor (or clear it without one)."""
        if self.store is None:
            return
        key = (source, mailbox, folder)
        self.flush()
        seen = self._seen.pop(key, set())
        if whole:
            gone = [(*key, id) for id in self.store.ids_in_folder(*key) if id not in seen]
            if gone:
                self.store.forget(gone)
        token = folder_token(self.definitions.version, cursor) if cursor is not None else None
        if token is not None or self.store.folder_token(*key) is not None:
            self.store.set_folder_token(*key, token)


def folder_token(version: str, cursor: str) -> str:
    """The text stored per folder: the definitions version it was completed with, and the
    connector's cursor."""
    return json.dumps({"definitions": version, "cursor": cursor}, sort_keys=True)


def parse_folder_token(token: str) -> tuple[str | None, str | None]:
    """(definitions version, cursor) of a stored folder token; (None, None) when it is not
    one (a token of an older rescan)."""
    try:
        doc = json.loads(token)
    except ValueError:
        return None, None
    if not isinstance(doc, dict) or not isinstance(doc.get("cursor"), str):
        return None, None
    return doc.get("definitions"), doc["cursor"]


def show_status(state: str | None, rules: list[str], fmt: str) -> None:
    """Print per source and mailbox: messages known, stamp coverage, infected, last run."""
    from rescan.errors import UsageError
    from rescan.state import StateStore

    path = Path(state) if state else StateStore.default_path()
    if not path.exists():
        raise UsageError(f"no state store at {path}: run a scan with --state first")
    with StateStore(path) as store:
        if rules:
            components = Definitions.build(rules).components()
        else:
            last = store.last_complete_run() or store.last_run()
            components = last["definitions"].get("components", {}) if last else {}
        rows = store.status(components)
        last = store.last_run()
    if fmt == "json":
        print(json.dumps({"state": str(path), "last_run": last, "mailboxes": rows}, indent=2, default=str))
        return
    print(f"State: {path}")
    if last:
        print(f"Last run: {last.get('start')} → {last.get('end') or 'unfinished'}")
    for r in rows:
        print(
            f"{r['source']} {r['mailbox']}: {r['messages']} messages, "
            f"{r['coverage']:.1f}% scanned with current definitions, {r['infected']} infected, "
            f"last scanned {r.get('last_scan') or '-'}"
        )
    sys.stdout.flush()
