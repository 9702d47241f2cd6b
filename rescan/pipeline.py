"""The data path, in one direction: connectors → refs → planner → fetcher → worker pool → records.

``Pipeline.run()`` is a generator of ``Record``s (one per message, in completion order).
Fetching runs in threads apart from scanning (which runs in the worker pool), and the bytes
fetched but not yet scanned are bounded by ``in_flight_bytes``, so memory does not grow with the
store. Messages of local stores travel to the workers as readers (``Connector.readers``) that
the worker reads, counted against the same bound by their size. Folder and source failures are collected in ``Pipeline.errors`` and the run goes on.

Incremental folders: when the ``Ledger`` holds a usable cursor for a folder and its connector
can tell what changed since (``Connector.changes``), only the new messages are listed and
planned; ids expunged since are forgotten; the folder's known messages that are not clean are
planned again from the state (so the report still lists every message whose verdict is not
clean, and failed scans are retried), and its known clean ones are only counted
(``Pipeline.unchanged``). Otherwise the folder is listed whole. Once every record of a folder
has been yielded (and the run was not stopped), ``Ledger.folder_done`` gets its new cursor.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from rescan.errors import AuthError, RescanError, TaskTimeout, WorkerCrashed
from rescan.models import Limits, MessageRef, Status, Verdict, error_verdict, too_large

if TYPE_CHECKING:  # the worker side is imported when the first message is sent to a worker
    from rescan.scan import ScanResult

log = logging.getLogger("rescan")


@dataclass(frozen=True)
class Plan:
    """What to do with one message: ``skip`` (stamp current: ``previous`` is the stored
    verdict), ``full``, or ``delta`` (scan only ``components``; ``previous`` findings of the
    other components are kept)."""

    kind: str
    components: tuple[str, ...] | None = None
    previous: Verdict | None = None
    was_clean_or_unknown: bool = True
    rewrite: bool = False  # a skip whose stored verdict changed (findings of removed rule files)


@dataclass(frozen=True)
class Record:
    """One message's outcome in this run."""

    ref: MessageRef
    verdict: Verdict
    new: bool  # not clean now, and clean or unknown before this run
    scanned: bool  # scanned in this run (False: its stamp was current)
    plan: Plan = field(default_factory=lambda: Plan("full"))
    cache_rows: tuple = ()
    parts_from_cache: int = 0  # parts answered by the verdict cache instead of an engine


BATCH_COUNT = 16  # messages per worker task: one round trip for many small messages ...
BATCH_BYTES = 1024 * 1024  # ... but a big one travels alone


class Planner(Protocol):
    """Decides per ref whether to skip, delta-scan or fully scan (see rescan.planner)."""

    def plan(self, refs: Sequence[MessageRef]) -> list[Plan]: ...


class FullScanPlanner:
    """Without a state store every message gets a full scan."""

    def plan(self, refs: Sequence[MessageRef]) -> list[Plan]:
        return [Plan("full") for _ in refs]


class Ledger(Protocol):
    """What the state knows per folder, for incremental listing (see rescan.session).

    ``cursor``, ``forget``, ``not_clean`` and ``clean_count`` are called from fetch threads;
    ``folder_done`` from the thread iterating ``Pipeline.run()``, after every record of the
    folder was consumed."""

    def cursor(self, source: str, mailbox: str, folder: str) -> str | None: ...

    def forget(self, source: str, mailbox: str, folder: str, ids: Sequence[str]) -> None: ...

    def not_clean(self, source: str, mailbox: str, folder: str, exclude: set[str]) -> Iterator[list[MessageRef]]: ...

    def clean_count(self, source: str, mailbox: str, folder: str, exclude: set[str]) -> int: ...

    def folder_done(self, source: str, mailbox: str, folder: str, cursor: str | None, whole: bool) -> None: ...


class NoLedger:
    """Without a state store every folder is listed whole and nothing is kept."""

    def cursor(self, source: str, mailbox: str, folder: str) -> str | None:
        return None

    def forget(self, source: str, mailbox: str, folder: str, ids: Sequence[str]) -> None:
        return None

    def not_clean(self, source: str, mailbox: str, folder: str, exclude: set[str]) -> Iterator[list[MessageRef]]:
        return iter(())

    def clean_count(self, source: str, mailbox: str, folder: str, exclude: set[str]) -> int:
        return 0

    def folder_done(self, source: str, mailbox: str, folder: str, cursor: str | None, whole: bool) -> None:
        return None


@dataclass(frozen=True)
class RunError:
    """A store, mailbox or folder that could not be read; the run went on without it."""

    source: str
    mailbox: str | None
    folder: str | None
    error: str

    def to_json(self) -> dict:
        return {"source": self.source, "mailbox": self.mailbox, "folder": self.folder, "error": self.error}


class ByteBudget:
    """A counting semaphore over bytes. One item larger than the whole budget is let through
    alone, so a big message waits for the others instead of deadlocking."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event, on_wait: Callable[[], None] | None = None) -> bool:
        """Wait until ``n`` bytes fit; False when ``stop`` was set while waiting. ``on_wait``
        is called once before waiting (to send off what the caller holds, so that the bytes
        it has acquired can come back)."""
        with self._cond:
            while self.used and self.used + n > self.limit:
                if stop.is_set():
                    return False
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                    continue
                self._cond.wait(0.2)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class Pipeline:
    """One scan over several open connectors.

    ``executor`` runs ``rescan.scan.scan_message`` (a ``WorkerPool`` whose initializer is
    ``rescan.scan.init_worker``). ``cache_key_of(components)`` gives the verdict-cache key of a
    component set (None disables the cache). ``ledger`` keeps folder cursors (incremental
    listing; see the module docstring). ``stop`` ends the run at a batch boundary.
    ``unchanged`` counts the known clean messages of incremental folders (no record each);
    ``incremental`` holds the (source, mailbox, folder) listed incrementally.
    """

    def __init__(
        self,
        connectors: Sequence,
        executor: Executor,
        limits: Limits,
        planner: Planner | None = None,
        in_flight_bytes: int = 64 * 1024 * 1024,
        cache_key_of: Callable[[tuple[str, ...] | None], str | None] = lambda c: None,
        passwords: tuple[str, ...] = ("infected",),
        on_discovered: Callable[[int], None] = lambda n: None,
        ledger: Ledger | None = None,
    ):
        self.connectors = list(connectors)
        self.executor = executor
        self.limits = limits
        self.planner = planner or FullScanPlanner()
        self.budget = ByteBudget(in_flight_bytes)
        self.cache_key_of = cache_key_of
        self.passwords = passwords
        self.on_discovered = on_discovered
        self.ledger = ledger or NoLedger()
        self.stop = threading.Event()
        self.errors: list[RunError] = []
        self.fatal: AuthError | None = None  # credentials refused: the run stops, exit 2
        self.mailboxes: set[tuple[str, str]] = set()
        self.folders: set[tuple[str, str, str]] = set()
        self.incremental: set[tuple[str, str, str]] = set()
        self.unchanged = 0
        self._q: queue.Queue = queue.Queue()
        # Per folder: scans submitted and not yet recorded; folders listed to the end.
        self._scanning: dict[tuple[str, str, str], int] = {}
        self._listed: dict[tuple[str, str, str], tuple[str | None, bool]] = {}
        self._plan_lock = threading.Lock()

    # -- fetch side (threads) -------------------------------------------------------------
    def _units(self, conn) -> list[tuple[str, str]]:
        units = []
        try:
            for mailbox in conn.mailboxes():
                self.mailboxes.add((conn.source, mailbox))
                try:
                    for folder in conn.folders(mailbox):
                        units.append((mailbox, folder))
                except AuthError:
                    raise
                except RescanError as exc:
                    self.errors.append(RunError(conn.source, mailbox, None, str(exc)))
        except AuthError as exc:
            self._fail(exc)
        except RescanError as exc:
            self.errors.append(RunError(conn.source, None, None, str(exc)))
        return units

    def _fail(self, exc: AuthError) -> None:
        self.fatal = self.fatal or exc
        self.stop.set()

    def _fetch_connector(self, conn) -> None:
        try:
            self._fetch_all(conn)
        finally:
            self._q.put(("fetched",))  # wakes the scan side at once when this was the last

    def _fetch_all(self, conn) -> None:
        units = self._units(conn)
        n = max(1, min(conn.max_connections, conn.options.connections))
        work: queue.Queue = queue.Queue()
        for u in units:
            work.put(u)
        threads = [
            threading.Thread(target=self._fetch_units, args=(conn, work), name=f"fetch-{i}", daemon=True)
            for i in range(min(n, max(1, len(units))))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _fetch_units(self, conn, work: queue.Queue) -> None:
        while not self.stop.is_set():
            try:
                mailbox, folder = work.get_nowait()
            except queue.Empty:
                return
            key = (conn.source, mailbox, folder)
            self.folders.add(key)
            try:
                cursor = self.ledger.cursor(*key)
                changes = conn.changes(mailbox, folder, cursor) if cursor is not None else None
                if changes is None:
                    for refs in conn.refs(mailbox, folder):
                        if self.stop.is_set():
                            return
                        self._fetch_batch(conn, refs)
                    listed = (conn.cursor(mailbox, folder), True)
                else:
                    self.incremental.add(key)
                    if not self._fetch_changes(conn, key, changes):
                        return
                    listed = (changes.cursor, False)
                if not self.stop.is_set():
                    self._q.put(("listed", key, listed))
            except AuthError as exc:
                self._fail(exc)
            except RescanError as exc:
                self.errors.append(RunError(conn.source, mailbox, folder, str(exc)))
            except Exception as exc:  # a connector bug must not end the run silently
                log.exception("unexpected failure reading %s %s/%s", conn.source, mailbox, folder)
                self.errors.append(RunError(conn.source, mailbox, folder, f"{type(exc).__name__}: {exc}"))

    def _fetch_changes(self, conn, key: tuple[str, str, str], changes) -> bool:
        """Plan the new messages of an incremental folder, then its known messages that are
        not clean; count its known clean ones. False when the run was stopped on the way."""
        self.ledger.forget(*key, changes.gone)  # gone from the store: nothing will name them
        new: set[str] = set()
        for refs in changes.refs:
            if self.stop.is_set():
                return False
            new.update(r.id for r in refs)
            self._fetch_batch(conn, refs)
        replanned: set[str] = set()
        for refs in self.ledger.not_clean(*key, new):
            if self.stop.is_set():
                return False
            replanned.update(r.id for r in refs)
            self._fetch_batch(conn, refs)
        self._q.put(("unchanged", self.ledger.clean_count(*key, new | replanned)))
        return True

    def _fetch_batch(self, conn, refs: list[MessageRef]) -> None:
        """Plan ``refs``, fetch those to scan, and send them to the scan side in batches (of
        one plan's components, up to BATCH_COUNT messages or BATCH_BYTES), the records of the
        others in one list."""
        records: list[Record] = []
        batches: dict[tuple[str, ...] | None, list[tuple[MessageRef, bytes, Plan]]] = {}
        try:
            self._fetch_into(conn, refs, records, batches)
        finally:
            self._send(batches)
            if records:
                self._q.put(("records", records))

    def _send(self, batches: dict) -> None:
        for batch in batches.values():
            self._q.put(("scan", batch))
        batches.clear()

    def _fetch_into(self, conn, refs: list[MessageRef], records: list[Record], batches: dict) -> None:
        self.on_discovered(len(refs))
        with self._plan_lock:
            plans = self.planner.plan(refs)
        to_fetch = []
        for ref, plan in zip(refs, plans):
            if plan.kind == "skip":
                records.append(Record(ref, plan.previous, False, False, plan))
            elif ref.size is not None and ref.size > self.limits.max_message_size:
                v = too_large(ref.size, self.limits.max_message_size)
                records.append(Record(ref, v, plan.was_clean_or_unknown, False, plan))
            else:
                to_fetch.append((ref, plan))
        if not to_fetch:
            return
        readers = conn.readers([r for r, _ in to_fetch])
        if readers is not None:  # a worker reads each message itself
            for (ref, plan), reader in zip(to_fetch, readers):
                if not self._batch(batches, ref, reader, plan):
                    break
            return
        by_key = {ref.key: plan for ref, plan in to_fetch}
        seen = set()
        try:
            for ref, raw in conn.fetch([r for r, _ in to_fetch]):
                seen.add(ref.key)
                plan = by_key[ref.key]
                if isinstance(raw, Exception):
                    records.append(Record(ref, error_verdict("fetch", str(raw)), plan.was_clean_or_unknown, False, plan))
                    continue
                if len(raw) > self.limits.max_message_size:
                    v = too_large(len(raw), self.limits.max_message_size)
                    records.append(Record(ref, v, plan.was_clean_or_unknown, False, plan))
                    continue
                if not self._batch(batches, ref, raw, plan):
                    break
        except RescanError as exc:
            detail = str(exc)
        else:
            detail = "not returned by the store"
        if self.stop.is_set():
            return  # stopped: what was not fetched is left for the next run
        for ref, plan in to_fetch:  # nothing is silently skipped
            if ref.key not in seen:
                records.append(Record(ref, error_verdict("fetch", detail), plan.was_clean_or_unknown, False, plan))

    def _batch(self, batches: dict, ref: MessageRef, raw, plan: Plan) -> bool:
        """Add a message (its bytes, or a reader of them) to the batch of its plan's
        components, once its bytes fit in the budget; send the batch when full. False when
        the run was stopped while waiting."""
        if not self.budget.acquire(_weight(raw), self.stop, on_wait=lambda: self._send(batches)):
            return False
        comps = self._components(plan)
        batch = batches.setdefault(comps, [])
        batch.append((ref, raw, plan))
        if len(batch) >= BATCH_COUNT or sum(_weight(r) for _, r, _ in batch) >= BATCH_BYTES:
            self._q.put(("scan", batches.pop(comps)))
        return True

    # -- scan side (main thread) ----------------------------------------------------------
    def run(self) -> Iterator[Record]:
        """Scan every message of every connector; yields each message's Record."""
        fetchers = [threading.Thread(target=self._fetch_connector, args=(c,), daemon=True) for c in self.connectors]
        for t in fetchers:
            t.start()
        in_flight: set[Future] = set()
        cancelled = False
        fetching = len(fetchers)
        while True:
            if self.stop.is_set() and not cancelled:  # scans not started are left for the next run
                cancelled = True
                for fut in list(in_flight):
                    fut.cancel()
            if not fetching and not in_flight and self._q.empty():
                break  # every fetcher said it is done, and everything it sent was handled
            try:
                item = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            kind = item[0]
            if kind == "fetched":
                fetching -= 1
            elif kind == "records":
                yield from item[1]
            elif kind == "scan":
                batch = item[1]
                if self.stop.is_set():
                    self.budget.release(sum(_weight(raw) for _, raw, _ in batch))
                else:
                    in_flight.add(self._submit(batch))
                    self._pending(batch, 1)
            elif kind == "result":
                _, batch, fut = item
                in_flight.discard(fut)
                if fut.cancelled():
                    self.budget.release(sum(_weight(raw) for _, raw, _ in batch))
                elif len(batch) > 1 and fut.exception() is not None:
                    in_flight.update(self._submit([one]) for one in batch)  # find the culprit
                    continue  # its messages are still pending
                else:
                    for rec in self._records(batch, fut):
                        yield rec
                for folder in self._pending(batch, -1):
                    self._settle(folder)
            elif kind == "listed":
                _, folder, listed = item
                self._listed[folder] = listed
                self._settle(folder)
            elif kind == "unchanged":
                self.unchanged += item[1]
        for t in fetchers:
            t.join()
        if self.fatal is not None:
            raise self.fatal

    def _pending(self, batch: list[tuple[MessageRef, bytes, Plan]], delta: int) -> set[tuple[str, str, str]]:
        """Add ``delta`` per message of ``batch`` to its folder's count of scans submitted and
        not yet recorded; returns the folders of the batch."""
        counts = collections.Counter((ref.source, ref.mailbox, ref.folder) for ref, _, _ in batch)
        for folder, n in counts.items():
            self._scanning[folder] = self._scanning.get(folder, 0) + n * delta
        return set(counts)

    def _settle(self, folder: tuple[str, str, str]) -> None:
        """Tell the ledger a folder is done once it was listed to the end and every record of
        it has been consumed; never after a stop (some of its messages got no record)."""
        if folder in self._listed and not self._scanning.get(folder) and not self.stop.is_set():
            cursor, whole = self._listed.pop(folder)
            self._scanning.pop(folder, None)
            self.ledger.folder_done(*folder, cursor, whole)

    @staticmethod
    def _components(plan: Plan) -> tuple[str, ...] | None:
        return plan.components if plan.kind == "delta" else None

    def _submit(self, batch: list[tuple[MessageRef, bytes, Plan]]) -> Future:
        from rescan.scan import scan_batch

        comps = self._components(batch[0][2])
        args = ([raw for _, raw, _ in batch], comps, self.limits, self.cache_key_of(comps), self.passwords)
        submit_timed = getattr(self.executor, "submit_timed", None)
        if submit_timed is not None:  # a batch over time is retried one message at a time
            fut = submit_timed(self.limits.timeout, scan_batch, *args)
        else:
            fut = self.executor.submit(scan_batch, *args)
        fut.add_done_callback(lambda f: self._q.put(("result", batch, f)))
        return fut

    def _records(self, batch: list[tuple[MessageRef, bytes, Plan]], fut: Future) -> Iterator[Record]:
        try:
            results: list[ScanResult] | BaseException = fut.result()
        except Exception as exc:
            results = exc
        for i, (ref, raw, plan) in enumerate(batch):
            self.budget.release(_weight(raw))
            yield self._record(ref, plan, results if isinstance(results, BaseException) else results[i])

    def _record(self, ref: MessageRef, plan: Plan, result: ScanResult | BaseException) -> Record:
        if isinstance(result, BaseException):
            if isinstance(result, TaskTimeout):
                v = error_verdict("timeout", f"scan did not finish: {result}")
            elif isinstance(result, WorkerCrashed):
                v = error_verdict("crash", str(result))
            else:
                v = error_verdict("engine", f"{type(result).__name__}: {result}")
            return Record(ref, v, plan.was_clean_or_unknown, True, plan)
        verdict = result.verdict
        if not result.scanned:  # the worker could not read it, or it had grown too large
            return Record(ref, verdict, plan.was_clean_or_unknown, False, plan)
        if plan.kind == "delta" and plan.previous is not None:
            verdict = merge_delta(plan.previous, verdict, plan.components or ())
        new = verdict.status is not Status.CLEAN and plan.was_clean_or_unknown
        return Record(ref, verdict, new, result.scanned, plan, result.cache_rows, result.parts_from_cache)


def _weight(raw) -> int:
    """Bytes a message in flight stands for: its bytes, or the size of the file a worker
    reads."""
    return len(raw) if isinstance(raw, bytes) else raw.size


def merge_delta(previous: Verdict, delta: Verdict, components: Sequence[str]) -> Verdict:
    """Combine a delta scan with the stored verdict: findings of components not rescanned are
    kept (``previous`` already has findings of removed components dropped by the planner)."""
    rescanned = set(components)
    kept = tuple(f for f in previous.findings if f.namespace not in rescanned)
    findings = kept + delta.findings
    problems = delta.problems
    return Verdict(
        Verdict.decide(findings, problems),
        findings,
        problems,
        delta.message_id or previous.message_id,
        delta.subject or previous.subject,
        delta.bytes_scanned,
    )
