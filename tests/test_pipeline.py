"""The pipeline over a memory store with real worker processes: every message gets exactly one
record, crashes and hangs become errors for that message only, fetch failures are reported,
in-flight bytes stay bounded."""

from __future__ import annotations

import os
import threading
import time

from connectors.base import open_source
from connectors.memory import MemoryStore
from rescan.engines import Engine, EngineSpec
from rescan.models import Finding, Limits, Status
from rescan.pipeline import ByteBudget, Pipeline
from rescan.pool import WorkerPool
from rescan.scan import init_worker
from tests.mailgen import message


class TrapEngine(Engine):
    """Finds BAD, crashes its process on CRASH, hangs on HANG."""

    name = "trap"

    def scan_part(self, part, components=None):
        if b"CRASH" in part.data:
            os._exit(7)
        if b"HANG" in part.data:
            time.sleep(600)
        if b"BAD" in part.data:
            return [Finding("trap", "Bad", "trap.rules", part=part.path, sha256=part.sha256)], []
        return [], []


class TrapSpec(EngineSpec):
    name = "trap"

    def components(self):
        return {"trap.rules": "1"}

    def load(self):
        return TrapEngine()


def run(store: MemoryStore, name: str, limits=Limits(timeout=3), **kw):
    src = store.register(name)
    with open_source(src) as conn, WorkerPool(2, init_worker, ([TrapSpec()],), task_timeout=limits.timeout) as pool:
        p = Pipeline([conn], pool, limits, **kw)
        records = list(p.run())
    return p, {r.ref.id: r for r in records}


def test_every_message_gets_one_record_and_findings():
    store = MemoryStore()
    for i in range(50):
        store.add("alice", "INBOX" if i % 2 else "Work", f"m{i:02d}", message(i, body="BAD\n" if i in (3, 40) else "fine\n"))
    p, recs = run(store, "plain")
    assert len(recs) == 50
    infected = sorted(k for k, r in recs.items() if r.verdict.status is Status.INFECTED)
    assert infected == ["m03", "m40"]
    assert recs["m03"].verdict.findings[0].part == "1"
    assert recs["m03"].verdict.message_id == "<m3@test.example>"
    assert p.folders == {("memory:plain", "alice", "INBOX"), ("memory:plain", "alice", "Work")}


def test_crash_and_hang_are_errors_of_their_message_only():
    store = MemoryStore()
    for i in range(12):
        store.add("alice", "INBOX", f"m{i:02d}", message(i))
    store.add("alice", "INBOX", "crash", message(100, body="CRASH\n"))
    store.add("alice", "INBOX", "hang", message(101, body="HANG\n"))
    _, recs = run(store, "traps")
    assert len(recs) == 14
    assert recs["crash"].verdict.status is Status.ERROR
    assert recs["crash"].verdict.problems[0].code == "crash"
    assert recs["hang"].verdict.status is Status.ERROR
    assert recs["hang"].verdict.problems[0].code == "timeout"
    assert all(recs[f"m{i:02d}"].verdict.status is Status.CLEAN for i in range(12))


def test_fetch_failure_is_an_error_record_not_a_gap():
    store = MemoryStore()
    for i in range(5):
        store.add("alice", "INBOX", f"m{i}", message(i))
    store.fail_fetch.add("m2")
    _, recs = run(store, "fetchfail")
    assert len(recs) == 5
    assert recs["m2"].verdict.status is Status.ERROR
    assert recs["m2"].verdict.problems[0].code == "fetch"


def test_oversize_messages_are_skipped_without_fetching():
    store = MemoryStore()
    store.add("alice", "INBOX", "big", message(1, body="x" * 10_000))
    store.add("alice", "INBOX", "small", message(2))
    _, recs = run(store, "big", limits=Limits(max_message_size=5_000, timeout=3))
    assert recs["big"].verdict.status is Status.SKIPPED
    assert recs["big"].verdict.problems[0].code == "too-large"
    assert recs["small"].verdict.status is Status.CLEAN
    assert store.fetches == 1


def test_in_flight_bytes_are_bounded():
    store = MemoryStore()
    for i in range(40):
        store.add("alice", "INBOX", f"m{i:02d}", message(i, body="y" * 20_000))
    src = store.register("bounded")
    peak = 0
    with open_source(src) as conn, WorkerPool(2, init_worker, ([TrapSpec()],)) as pool:
        p = Pipeline([conn], pool, Limits(), in_flight_bytes=50_000)
        for _ in p.run():
            peak = max(peak, p.budget.used)
    assert 0 < peak <= 50_000 + 21_000  # one message may pass alone over the limit


def test_fetchers_holding_part_of_a_batch_never_starve_each_other():
    # Four fetch threads each gather messages into a batch; the budget fits one message at a
    # time. A fetcher about to wait sends off what it holds, so the run always finishes.
    store = MemoryStore()
    for i in range(32):
        store.add("alice", f"F{i % 4}", f"m{i:02d}", message(i, body="z" * 30_000))
    src = store.register("starve")
    out: list = []
    with open_source(src) as conn, WorkerPool(2, init_worker, ([TrapSpec()],)) as pool:
        p = Pipeline([conn], pool, Limits(), in_flight_bytes=40_000)
        t = threading.Thread(target=lambda: out.extend(p.run()), daemon=True)
        t.start()
        t.join(120)
        assert not t.is_alive(), "the run did not finish"
    assert len(out) == 32 and all(r.verdict.status is Status.CLEAN for r in out)
    assert p.budget.used == 0


def test_workers_read_local_files_themselves_and_report_what_they_cannot(tmp_path):
    import pickle

    from connectors.local import EmlFile, MaildirFile
    from rescan.scan import scan_batch

    for sub in ("cur", "new", "tmp"):
        (tmp_path / "md" / sub).mkdir(parents=True)
    (tmp_path / "md" / "cur" / "1.M1.h:2,S").write_bytes(message(1, body="BAD\n"))
    (tmp_path / "md" / "cur" / "3.M3.h:2,").write_bytes(message(3, body="x" * 5000))
    (tmp_path / "a.eml").write_bytes(message(4))
    md = str(tmp_path / "md")
    readers = [
        MaildirFile(md, "INBOX", "1.M1.h", "new/1.M1.h", 10),  # moved to cur/ since listed
        MaildirFile(md, "INBOX", "2.M2.h", "cur/2.M2.h:2,", 10),  # expunged since listed
        MaildirFile(md, "INBOX", "3.M3.h", "cur/3.M3.h:2,", 10),  # grew past the limit
        EmlFile(str(tmp_path), "a.eml", 10),
        EmlFile(str(tmp_path), "../etc/passwd", 10),
    ]
    readers = pickle.loads(pickle.dumps(readers))  # as they travel to a worker
    init_worker([TrapSpec()])
    results = scan_batch(readers, None, Limits(max_message_size=4000))
    assert [(r.verdict.status, r.scanned) for r in results] == [
        (Status.INFECTED, True), (Status.ERROR, False), (Status.SKIPPED, False),
        (Status.CLEAN, True), (Status.ERROR, False)]
    assert [p.code for r in results for p in r.verdict.problems] == ["fetch", "too-large", "fetch"]
    assert "2.M2.h: message no longer in the Maildir" in results[1].verdict.problems[0].detail


def test_maildir_messages_are_read_by_the_workers_not_sent_to_them(tmp_path):
    store = tmp_path / "md"
    for sub in ("cur", "new", "tmp"):
        (store / sub).mkdir(parents=True)
    for i in range(40):
        (store / "cur" / f"{i}.M{i}.h:2,S").write_bytes(message(i, body="BAD\n" if i == 7 else "ok\n"))
    sent = []
    with open_source(f"maildir:{store}") as conn, WorkerPool(2, init_worker, ([TrapSpec()],)) as pool:
        real = pool.submit_timed
        pool.submit_timed = lambda t, fn, raws, *a: sent.extend(raws) or real(t, fn, raws, *a)
        records = list(Pipeline([conn], pool, Limits()).run())
    assert len(sent) == 40 and not any(isinstance(r, bytes) for r in sent)
    assert [r.ref.id for r in records if r.verdict.status is Status.INFECTED] == ["7.M7.h"]
    assert all(r.scanned for r in records)


def test_byte_budget_lets_one_large_item_through_alone():
    b = ByteBudget(100)
    stop = threading.Event()
    assert b.acquire(500, stop)
    stop.set()
    assert not b.acquire(1, stop)
    b.release(500)
    assert b.acquire(60, stop) and b.acquire(40, stop)


class RecordingLedger:
    """A ledger that hands out no cursor and notes when each folder was reported done, and
    how many records the consumer had taken by then."""

    def __init__(self):
        self.consumed = 0
        self.consumed_by_folder: dict[str, int] = {}
        self.done: dict[str, tuple[int, bool]] = {}

    def cursor(self, source, mailbox, folder):
        return None

    def folder_done(self, source, mailbox, folder, cursor, whole):
        self.done[folder] = (self.consumed_by_folder.get(folder, 0), whole)


def test_a_folder_is_done_only_after_all_its_records_were_consumed():
    store = MemoryStore()
    for i in range(30):
        store.add("alice", ("INBOX", "Work", "Old")[i % 3], f"m{i:02d}", message(i, body="BAD\n" if i == 4 else "fine\n"))
    ledger = RecordingLedger()
    src = store.register("ledger")
    with open_source(src) as conn, WorkerPool(2, init_worker, ([TrapSpec()],), task_timeout=3) as pool:
        p = Pipeline([conn], pool, Limits(timeout=3), ledger=ledger)
        for rec in p.run():
            folder = rec.ref.folder
            ledger.consumed_by_folder[folder] = ledger.consumed_by_folder.get(folder, 0) + 1
            assert folder not in ledger.done  # no record of a folder after it was done
    assert ledger.done == {"INBOX": (10, True), "Work": (10, True), "Old": (10, True)}


def test_a_stopped_run_reports_no_folder_done_that_lost_records():
    store = MemoryStore()
    for i in range(40):
        store.add("alice", "INBOX", f"m{i:02d}", message(i))
    ledger = RecordingLedger()
    src = store.register("stopped")
    pool = WorkerPool(1, init_worker, ([TrapSpec()],), task_timeout=3)
    try:
        with open_source(src) as conn:
            p = Pipeline([conn], pool, Limits(timeout=3), ledger=ledger)
            records = []
            for rec in p.run():
                records.append(rec)
                p.stop.set()
    finally:
        pool.shutdown(cancel_futures=True)  # as the CLI does: scans not started are dropped
    assert len(records) < 40 and ledger.done == {}
