"""A run's use of the state store: lock, run history, planner, batched commits, status.

``StateSession.open(settings, definitions)`` is a context manager. Without ``settings.state``
it is a null session (no stamps, no cache: every message is scanned). With it, it takes the
lock (a second live run fails with LockedError, exit 2), records the run, plans against
stamps, and commits records in batches so a crash loses at most the current batch. At the
end of a complete run, messages of a fully listed folder that were not seen (expunged from the
store) are forgotten.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterable

from rescan.definitions import Definitions
from rescan.models import Status
from rescan.pipeline import FullScanPlanner, Planner, Record

COMMIT_EVERY = 200  # records per transaction: a SIGKILL loses at most this many scans
COMMIT_SECONDS = 2.0  # ... or this much time, whichever comes first


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
            if self._planner_store is not None:
                self._planner_store.close()
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
        for rec in self._pending:
            v = rec.verdict
            stamp = {} if v.status is Status.ERROR else dict(self.components)
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

    def finish(self, report, enumerated: Iterable[tuple[str, str, str]] = ()) -> None:
        """Commit what is left, forget messages gone from the store, close the run in the
        history. ``enumerated`` names the (source, mailbox, folder) listed to the end without
        error; when the run is complete, their known messages not seen in this run are deleted
        from the state."""
        if self.store is None:
            return
        self.flush()
        if report.complete:
            for folder in enumerated:
                seen = self._seen.get(folder, set())
                gone = [(*folder, id) for id in self.store.ids_in_folder(*folder) if id not in seen]
                if gone:
                    self.store.forget(gone)
        self.store.end_run(self.run_id, report.summary.to_json(), complete=report.complete and not report.errors)


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
