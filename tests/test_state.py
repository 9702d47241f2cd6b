"""The state store: schema and migrations, message round trips, batch atomicity under errors
and SIGKILL, the run lock across processes, the verdict cache, reports and coverage."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from rescan import state as state_mod
from rescan.errors import LockedError, StateError
from rescan.state import StateStore, StoredMessage

REPO = Path(__file__).resolve().parents[1]
STAMP = {"rules/a.yar": "fa" * 32, "rules/b.yar": "fb" * 32, "clamav": "c1"}
FINDING = {
    "engine": "yara",
    "rule": "Evil",
    "namespace": "rules/a.yar",
    "tags": [],
    "meta": {"author": "x"},
    "part": "2/invoice.zip/payload.exe",
    "sha256": "ab" * 32,
}


def msg(i: int, status: str = "clean", folder: str = "INBOX", mailbox: str = "alice", **kw):
    fields = dict(
        source="maildir:/srv/mail",
        mailbox=mailbox,
        folder=folder,
        id=f"{i:06d}.M1P2.host",
        version=f"v{i}",
        size=1000 + i,
        message_id=f"<{i}@example.org>",
        stamp=STAMP,
        status=status,
        findings=[FINDING] if status == "infected" else [],
        problems=[{"code": "encrypted", "detail": "zip", "part": "2"}] * (status == "partial"),
        first_seen_run=None,
        last_scan_run=None,
    )
    fields.update(kw)
    return StoredMessage(**fields)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "sub" / "state.sqlite"


@pytest.fixture
def store(path):
    with StateStore(path) as s:
        yield s


def child(code: str, *args: str) -> subprocess.Popen:
    """A Python subprocess running ``code`` with the repository importable."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


# --- schema


def test_creates_parent_dirs_wal_and_schema_version(path):
    StateStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(state_mod.MIGRATIONS) == 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "messages", "stamps", "folders", "verdict_cache", "lock"} <= tables


def test_reopen_keeps_data(path):
    with StateStore(path) as s:
        run = s.begin_run({"version": "d1"}, ["maildir:/srv/mail"])
        s.record(run, [msg(1)])
    with StateStore(path) as s:
        assert s.get_messages([msg(1).key])[msg(1).key].version == "v1"


def test_newer_schema_is_refused(path):
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StateError, match="schema version 99 is newer"):
        StateStore(path)


def test_not_a_database_is_a_state_error(tmp_path):
    bad = tmp_path / "state.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a database"):
        StateStore(bad)


def test_unusable_directory_is_a_state_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="cannot create its directory"):
        StateStore(tmp_path / "file" / "state.sqlite")


def test_migrations_run_in_order_and_keep_data(path, monkeypatch):
    with StateStore(path) as s:
        run = s.begin_run({}, [])
        s.record(run, [msg(1)])

    def v2(db):
        db.execute("ALTER TABLE messages ADD COLUMN note TEXT")

    monkeypatch.setattr(state_mod, "MIGRATIONS", [*state_mod.MIGRATIONS, v2])
    with StateStore(path) as s:
        assert s.get_messages([msg(1).key])[msg(1).key].message_id == "<1@example.org>"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "note" in {r[1] for r in db.execute("PRAGMA table_info(messages)")}


def test_schema_cannot_hold_mail_content(path):
    StateStore(path).close()
    db = sqlite3.connect(path)
    columns = {
        t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")}
        for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    assert columns["messages"] == {
        "source", "mailbox", "folder", "id", "version", "size", "message_id", "stamp_id",
        "status", "findings", "problems", "first_seen_run", "last_scan_run", "action",
        "action_detail",
    }  # fmt: skip
    everything = {c for cols in columns.values() for c in cols}
    for word in ("body", "subject", "data", "content", "raw", "payload", "text", "from", "to"):
        assert not any(word in c.lower().split("_") for c in everything), word
    assert "subject" not in StoredMessage.__dataclass_fields__


# --- messages


def test_record_and_get_round_trip(store):
    run = store.begin_run({}, [])
    items = [msg(1), msg(2, "infected"), msg(3, "partial", message_id=None, size=None)]
    store.record(run, items)
    got = store.get_messages([m.key for m in items] + [("maildir:/x", "a", "b", "nope")])
    assert set(got) == {m.key for m in items}
    for m in items:
        assert got[m.key] == replace(m, first_seen_run=run, last_scan_run=run)


def test_get_messages_many_keys_across_folders(store):
    run = store.begin_run({}, [])
    items = [msg(i, folder=f"F{i % 3}") for i in range(1300)]
    store.record(run, items)
    assert set(store.get_messages([m.key for m in items])) == {m.key for m in items}


def test_record_upsert_keeps_first_seen_and_action_while_version_holds(store):
    r1 = store.begin_run({}, [])
    store.record(r1, [msg(1, "infected"), msg(2, "infected")])
    store.mark_action(msg(1).key, "quarantine:Quarantine", "copied to Quarantine/77")
    store.mark_action(msg(2).key, "quarantine:Quarantine", "copied to Quarantine/78")
    r2 = store.begin_run({}, [])
    store.record(r2, [msg(1, "infected"), msg(2, "clean", version="v2-changed")])
    got = store.get_messages([msg(1).key, msg(2).key])
    one, two = got[msg(1).key], got[msg(2).key]
    assert (one.first_seen_run, one.last_scan_run) == (r1, r2)
    assert (one.action, one.action_detail) == ("quarantine:Quarantine", "copied to Quarantine/77")
    assert (two.status, two.action, two.action_detail) == ("clean", None, None)


def test_mark_action_unknown_message(store):
    with pytest.raises(StateError, match="no message"):
        store.mark_action(msg(9).key, "tag:rescan-infected", "")


def test_failed_batch_stores_nothing(store):
    run = store.begin_run({}, [])
    store.record(run, [msg(0)])
    bad = [msg(i) for i in range(1, 100)]
    bad[50] = msg(51, findings=[{"not json": {1, 2}}])  # fails mid-batch
    with pytest.raises(TypeError):
        store.record(run, bad)
    keys = [m.key for m in bad]
    assert store.get_messages(keys) == {}
    assert list(store.get_messages([msg(0).key])) == [msg(0).key]
    store.record(run, [msg(1)])  # the store is usable afterwards


def test_sigkill_while_recording_leaves_whole_batches(path):
    proc = child(
        """
        import sys
        from rescan.state import StateStore, StoredMessage
        s = StateStore(sys.argv[1])
        run = s.begin_run({}, [])
        stamp = {"rules/a.yar": "f" * 64}
        n = 0
        while True:
            s.record(run, [StoredMessage("maildir:/m", "mb", "INBOX", f"{n}-{i}", "v", 1, None,
                                         stamp, "clean", [], [], None, None) for i in range(100)])
            n += 1
            print(n, flush=True)
        """,
        str(path),
    )
    try:
        for _ in range(8):
            proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with StateStore(path) as s:
        count = s._conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert count >= 800
    assert count % 100 == 0


def test_folder_listing_forget_and_reset(store):
    run = store.begin_run({}, [])
    store.record(run, [msg(i, folder="INBOX") for i in range(5)] + [msg(9, folder="Sent")])
    assert [m.id for m in store.messages_in_folder("maildir:/srv/mail", "alice", "INBOX")] == [
        msg(i).id for i in range(5)
    ]
    store.forget([msg(1).key, msg(3).key])
    assert [m.id for m in store.messages_in_folder("maildir:/srv/mail", "alice", "INBOX")] == [
        msg(i).id for i in (0, 2, 4)
    ]
    store.forget_folder("maildir:/srv/mail", "alice", "INBOX")
    assert list(store.messages_in_folder("maildir:/srv/mail", "alice", "INBOX")) == []
    assert [m.id for m in store.messages_in_folder("maildir:/srv/mail", "alice", "Sent")] == [
        msg(9).id
    ]


def test_messages_in_folder_pages_through_large_folders(store, monkeypatch):
    monkeypatch.setattr(state_mod, "_PAGE", 7)
    run = store.begin_run({}, [])
    store.record(run, [msg(i) for i in range(30)])
    assert [m.id for m in store.messages_in_folder("maildir:/srv/mail", "alice", "INBOX")] == [
        msg(i).id for i in range(30)
    ]


def test_iter_not_clean_is_deterministic_and_complete(store, monkeypatch):
    monkeypatch.setattr(state_mod, "_PAGE", 3)
    run = store.begin_run({}, [])
    statuses = ["clean", "infected", "partial", "error", "skipped"]
    items = [
        msg(i, statuses[i % 5], mailbox=mb, folder=f)
        for mb in ("bob", "alice")
        for f in ("Sent", "INBOX")
        for i in range(10, 0, -1)
    ]
    store.record(run, items[::2])
    store.record(run, items[1::2])
    got = [m.key for m in store.iter_not_clean()]
    expected = sorted(m.key for m in items if m.status != "clean")
    assert got == expected
    assert len(got) == 32


def test_folder_tokens(store):
    assert store.folder_token("imap://h", "alice", "INBOX") is None
    store.set_folder_token("imap://h", "alice", "INBOX", "1700000000")
    store.set_folder_token("imap://h", "alice", "INBOX", "1700000001")
    assert store.folder_token("imap://h", "alice", "INBOX") == "1700000001"
    assert store.folder_token("imap://h", "bob", "INBOX") is None


# --- runs


def test_runs_history(store):
    assert store.last_run() is None and store.last_complete_run() is None
    r1 = store.begin_run({"version": "d1"}, ["maildir:/srv/mail"])
    store.end_run(r1, {"messages_seen": 3}, complete=True)
    r2 = store.begin_run({"version": "d2"}, ["maildir:/srv/mail"])
    store.end_run(r2, {"messages_seen": 1}, complete=False)
    r3 = store.begin_run({"version": "d3"}, ["imap://h"])
    last = store.last_complete_run()
    assert (last["id"], last["definitions"]) == (r1, {"version": "d1"})
    assert last["summary"] == {"messages_seen": 3}
    assert last["sources"] == ["maildir:/srv/mail"] and last["start"] and last["end"]
    cur = store.last_run()
    assert (cur["id"], cur["end"], cur["summary"], cur["complete"]) == (r3, None, None, False)
    with pytest.raises(StateError, match="no run"):
        store.end_run(999, {}, True)


def test_unused_stamps_are_dropped_at_end_of_run(store):
    run = store.begin_run({}, [])
    old = {"rules/a.yar": "0" * 64}
    store.record(run, [msg(1, stamp=old), msg(2)])
    store.record(run, [msg(1)])
    store.end_run(run, {}, True)
    assert store._conn.execute("SELECT count(*) FROM stamps").fetchone()[0] == 1
    assert store.get_messages([msg(1).key])[msg(1).key].stamp == STAMP


# --- status


def test_status_coverage_per_mailbox(store):
    run = store.begin_run({}, [])
    outdated = {**STAMP, "rules/a.yar": "00" * 32}
    store.record(
        run,
        [msg(i, "infected" if i == 0 else "clean", mailbox="alice") for i in range(3)]
        + [msg(3, stamp=outdated, mailbox="alice", status="error")]
        + [msg(i, "partial", mailbox="bob", stamp=dict(outdated)) for i in range(2)],
    )
    rows = store.status(dict(STAMP))
    assert [(r["mailbox"], r["messages"], r["current"], r["coverage"]) for r in rows] == [
        ("alice", 4, 3, 75.0),
        ("bob", 2, 0, 0.0),
    ]
    alice = rows[0]
    assert (alice["infected"], alice["partial"], alice["errors"], alice["skipped"]) == (1, 0, 1, 0)
    assert alice["last_scan_run"] == run
    assert alice["last_scan"] == store.last_run()["start"]
    assert rows[1]["partial"] == 2
    assert [r["current"] for r in store.status({"rules/a.yar": "fa" * 32})] == [0, 0]


def test_status_never_rounds_an_outdated_message_to_full_coverage(store):
    run = store.begin_run({}, [])
    store.record(run, [msg(i) for i in range(20000)] + [msg(20000, stamp={"x": "y"})])
    (row,) = store.status(STAMP)
    assert row["current"] == 20000 and row["coverage"] < 100


# --- verdict cache


def test_cache_put_and_get(store):
    store.cache_put([("aa" * 32, "fp1", [FINDING]), ("bb" * 32, "fp1", []), ("aa" * 32, "fp2", [])])
    pairs = [("aa" * 32, "fp1"), ("bb" * 32, "fp1"), ("aa" * 32, "fp2"), ("cc" * 32, "fp1")]
    assert store.cache_get(pairs) == {
        ("aa" * 32, "fp1"): [FINDING],
        ("bb" * 32, "fp1"): [],
        ("aa" * 32, "fp2"): [],
    }
    store.cache_put([("bb" * 32, "fp1", [FINDING])])
    assert store.cache_get([("bb" * 32, "fp1")]) == {("bb" * 32, "fp1"): [FINDING]}


def test_cache_get_many_pairs(store):
    rows = [(f"{i:064x}", f"fp{i % 4}", []) for i in range(2000)]
    store.cache_put(rows)
    wanted = [(sha, fp) for sha, fp, _ in rows] + [(f"{i:064x}", "fp9") for i in range(10)]
    assert set(store.cache_get(wanted)) == {(sha, fp) for sha, fp, _ in rows}


# --- lock

HOLD_LOCK = """
    import sys
    from rescan.state import StateStore
    s = StateStore(sys.argv[1])
    s.acquire_lock("scheduled")
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_lock_held_by_a_live_process(path):
    StateStore(path).close()
    proc = child(HOLD_LOCK, str(path))
    try:
        assert proc.stdout.readline() == "locked\n"
        with StateStore(path) as s:
            with pytest.raises(LockedError, match=rf"locked by pid {proc.pid} \(started .+\)"):
                s.acquire_lock("manual")
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(path):
    StateStore(path).close()
    proc = child(HOLD_LOCK, str(path))
    assert proc.stdout.readline() == "locked\n"
    proc.send_signal(signal.SIGKILL)
    # Wait for it to die without reaping it: a dead process not yet reaped still has its pid.
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    with StateStore(path) as s:
        assert s._conn.execute("SELECT pid FROM lock").fetchone() == (proc.pid,)
        s.acquire_lock("manual")
        proc.wait()
        assert s._conn.execute("SELECT pid, run_label FROM lock").fetchone() == (
            os.getpid(),
            "manual",
        )
    with StateStore(path) as s:  # close() released it
        assert s._conn.execute("SELECT count(*) FROM lock").fetchone() == (0,)


def test_lock_from_an_earlier_boot_or_reused_pid_is_taken_over(store):
    store.acquire_lock("first")
    store._conn.execute("UPDATE lock SET token = 'other', boot_id = 'an-earlier-boot'")
    store._lock_token = None
    with StateStore(store.path) as other:
        other.acquire_lock("second")
        other._conn.execute("UPDATE lock SET token = 'other', proc_start = '1'")
        other._lock_token = None
    with StateStore(store.path) as third:
        third.acquire_lock("third")


def test_lock_on_another_host_is_respected(store):
    store.acquire_lock("first")
    store._conn.execute("UPDATE lock SET token = 'other', hostname = 'elsewhere'")
    with StateStore(store.path) as other:
        with pytest.raises(LockedError, match="on host elsewhere"):
            other.acquire_lock("second")


def test_lock_release_and_reacquire_in_one_process(path):
    with StateStore(path) as a, StateStore(path) as b:
        a.acquire_lock("a")
        a.acquire_lock("a")  # already ours
        with pytest.raises(LockedError):
            b.acquire_lock("b")
        a.release_lock()
        b.acquire_lock("b")


def test_racing_processes_get_one_lock(path):
    StateStore(path).close()
    racer = """
        import sys
        from rescan.errors import LockedError
        from rescan.state import StateStore
        s = StateStore(sys.argv[1])
        sys.stdin.readline()
        try:
            s.acquire_lock("race")
            print("ok", flush=True)
        except LockedError:
            print("locked", flush=True)
        sys.stdin.read()
    """
    procs = [child(racer, str(path)) for _ in range(4)]
    try:
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
    assert answers == ["locked", "locked", "locked", "ok"]


def test_default_path_is_in_user_state_dir():
    p = StateStore.default_path()
    assert p.name == "state.sqlite" and "rescan" in p.parts
