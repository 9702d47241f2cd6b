"""Scan stamps through the real CLI: a second run fetches nothing, delta rescans after a rule
file is added, changed or removed, --full, changed messages, the verdict cache, resume after
SIGKILL, the run lock, expunged messages, ``rescan status`` and ``rescan rules``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rescan.definitions import Definitions
from tests.stampkit import (
    EICAR, EICAR_RULE, MARKER_RULE, REPO, SHARED, by_id, cli_env, copy_state, maildir, message,
    put, query, rescan, rules_dir, scan, unique,
)

BIG = 2000
INFECTED = (3, 503, 1003, 1503, 1999)
MARKED = 7  # matched by MARKER_RULE only


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A Maildir of BIG messages (a few infected, every tenth with a shared attachment), its
    eicar-only rules, and a state after one complete scan with that run's report."""
    root = tmp_path_factory.mktemp("big")
    store = maildir(root / "mail")
    for i in range(BIG):
        put(store, i, message(i, infected=i in INFECTED, marked=i == MARKED, shared=SHARED if i % 10 == 0 else None))
    rules = rules_dir(root / "rules", eicar=EICAR_RULE)
    env = cli_env(root)
    state = root / "state.sqlite"
    code, report = scan(env, store, state, rules)
    return store, rules, state, env, code, report


def test_second_run_scans_nothing_and_still_reports_the_infected(big, tmp_path):
    store, rules, state0, env, code, first = big
    assert code == 1
    assert first["run"]["summary"]["messages_scanned"] == BIG
    assert {m["id"] for m in first["messages"] if m["new"]} == {unique(i) for i in INFECTED}

    state = copy_state(state0, tmp_path / "state.sqlite")
    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert code == 1
    assert (s["messages_seen"], s["messages_scanned"], s["up_to_date"]) == (BIG, 0, BIG)
    assert s["infected"] == len(INFECTED) and s["new_infected"] == 0
    listed = by_id(report)
    assert set(listed) == {unique(i) for i in INFECTED}
    for m in listed.values():
        assert (m["status"], m["new"], m["rescanned"]) == ("infected", False, False)
        assert [f["rule"] for f in m["findings"]] == ["Eicar_Test"]
    assert report["run"]["definitions"]["changed_since_last_run"] == {"added": [], "changed": [], "removed": []}


def test_added_rule_file_is_a_delta_scan_with_that_file_only(big, tmp_path):
    store, rules0, state0, env, _, _ = big
    state = copy_state(state0, tmp_path / "state.sqlite")
    rules = rules_dir(tmp_path / "rules", eicar=EICAR_RULE, extra=MARKER_RULE)

    shown = rescan(env, "rules", "--rules", str(rules), "--state", str(state))
    assert shown.returncode == 0, shown.stderr
    assert "added: extra.yar" in shown.stdout.splitlines()

    code, report = scan(env, store, state, rules)
    run = report["run"]
    assert code == 1
    assert run["definitions"]["changed_since_last_run"] == {"added": ["extra.yar"], "changed": [], "removed": []}
    assert run["summary"]["messages_scanned"] == BIG  # every stamp lacks extra.yar
    assert run["summary"]["up_to_date"] == 0
    assert report["messages"][0]["id"] == unique(MARKED)  # newly detected first
    listed = by_id(report)
    marked = listed.pop(unique(MARKED))
    assert marked["new"] is True
    assert [(f["rule"], f["namespace"]) for f in marked["findings"]] == [("Acme_Marker", "extra.yar")]
    assert set(listed) == {unique(i) for i in INFECTED}
    for m in listed.values():  # findings of the rule file not rescanned are kept
        assert m["new"] is False
        assert [(f["rule"], f["namespace"]) for f in m["findings"]] == [("Eicar_Test", "eicar.yar")]

    # Parts were scanned with extra.yar alone: the verdict cache learned no key of the full set.
    defs = Definitions.build([str(rules)])
    keys = {k for (k,) in query(state, "SELECT DISTINCT component_fp FROM verdict_cache")}
    assert defs.fingerprint_of(["extra.yar"]) in keys
    assert defs.fingerprint_of(None) not in keys
    assert Definitions.build([str(rules0)]).fingerprint_of(None) in keys


# --- a small store for the other behaviours ------------------------------------------------


@pytest.fixture
def small(tmp_path):
    """A Maildir of 30 messages in INBOX (2 infected, one marked) and 10 in ``Archive``
    (1 infected); eicar-only rules; an env; a state path."""
    store = maildir(tmp_path / "mail")
    for i in range(30):
        put(store, i, message(i, infected=i in (4, 9), marked=i == 12))
    for i in range(100, 110):
        put(store, i, message(i, infected=i == 105), folder="Archive")
    rules = rules_dir(tmp_path / "rules", eicar=EICAR_RULE)
    return store, rules, cli_env(tmp_path), tmp_path / "state.sqlite"


def test_changed_and_removed_rule_files(small, tmp_path):
    store, rules, env, state = small
    rules_dir(rules, extra=MARKER_RULE)
    code, report = scan(env, store, state, rules)
    assert code == 1 and report["run"]["summary"]["infected"] == 4

    (rules / "extra.yar").write_text(MARKER_RULE.replace("condition: $a", "condition: $a and filesize > 0"))
    shown = rescan(env, "rules", "--rules", str(rules), "--state", str(state))
    assert "changed: extra.yar" in shown.stdout.splitlines()
    code, report = scan(env, store, state, rules)
    assert report["run"]["definitions"]["changed_since_last_run"] == {"added": [], "changed": ["extra.yar"], "removed": []}
    assert report["run"]["summary"]["messages_scanned"] == 40
    assert by_id(report)[unique(12)]["new"] is False  # was infected before: not new
    assert code == 1

    (rules / "extra.yar").unlink()
    shown = rescan(env, "rules", "--rules", str(rules), "--state", str(state))
    assert "removed: extra.yar" in shown.stdout.splitlines()
    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert report["run"]["definitions"]["changed_since_last_run"] == {"added": [], "changed": [], "removed": ["extra.yar"]}
    assert (s["messages_scanned"], s["up_to_date"], s["infected"]) == (0, 40, 3)
    assert unique(12) not in by_id(report)  # its only finding came from the removed file
    assert all(f["namespace"] == "eicar.yar" for m in report["messages"] for f in m["findings"])
    assert code == 1
    # The removal was written to the state: the next run has nothing to change.
    code, report = scan(env, store, state, rules)
    assert report["run"]["summary"]["messages_scanned"] == 0 and unique(12) not in by_id(report)
    assert "unchanged since the last complete run" in rescan(env, "rules", "--rules", str(rules), "--state", str(state)).stdout


def test_full_ignores_stamps_and_a_changed_message_is_rescanned(small):
    store, rules, env, state = small
    scan(env, store, state, rules)
    code, report = scan(env, store, state, rules, "--full")
    assert report["run"]["summary"]["messages_scanned"] == 40 and code == 1
    assert not any(m["new"] for m in report["messages"])

    # A clean message rewritten with EICAR attached, the Maildir way (written in tmp/, renamed
    # over the old file): its size (version token) changes.
    path = next((store / "cur").glob(unique(20) + ":*"))
    (store / "tmp" / path.name).write_bytes(message(20, infected=True))
    os.replace(store / "tmp" / path.name, path)
    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert (s["messages_scanned"], s["up_to_date"]) == (1, 39)
    changed = by_id(report)[unique(20)]
    assert (changed["status"], changed["new"], changed["rescanned"]) == ("infected", True, True)


def test_unchanged_maildir_folders_are_not_listed_again(small):
    store, rules, env, state = small
    time.sleep(2.1)  # folders changed in the last two seconds get no cursor
    code, report = scan(env, store, state, rules)
    assert code == 1 and report["run"]["summary"]["folders_incremental"] == 0
    assert len(query(state, "SELECT folder FROM folders WHERE token IS NOT NULL")) == 2

    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert (s["folders"], s["folders_incremental"]) == (2, 2)
    assert (s["messages_seen"], s["messages_scanned"], s["up_to_date"], s["infected"]) == (40, 0, 40, 3)
    assert {m["id"] for m in report["messages"]} == {unique(4), unique(9), unique(105)}
    assert code == 1

    # Mail delivered to INBOX and one expunged from Archive: both folders are listed again.
    put(store, 40, message(40, infected=True))
    next((store / ".Archive" / "cur").glob(unique(105) + ":*")).unlink()
    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert (s["folders_incremental"], s["messages_seen"], s["messages_scanned"]) == (0, 40, 1)
    assert {m["id"]: m["new"] for m in report["messages"]} == {unique(4): False, unique(9): False, unique(40): True}

    # Changed definitions: every folder is listed whole again, whatever its cursor.
    time.sleep(2.1)
    scan(env, store, state, rules)
    rules_dir(rules, extra=MARKER_RULE)
    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert (s["folders_incremental"], s["messages_scanned"]) == (0, 40)
    assert by_id(report)[unique(12)]["new"] is True


def test_a_store_named_by_a_relative_path_is_the_same_store(small):
    store, rules, env, state = small
    scan(env, store, state, rules)
    relative = os.path.relpath(store, REPO)  # the CLI runs from the repository root
    for named in (relative, f"maildir:{relative}", f"maildir://{store}"):
        code, report = scan(env, named, state, rules)
        s = report["run"]["summary"]
        assert (s["messages_scanned"], s["up_to_date"]) == (0, 40), named
        assert {m["source"] for m in report["messages"]} == {f"maildir:{store}"}
    assert query(state, "SELECT DISTINCT source FROM messages") == [(f"maildir:{store}",)]


def test_verdict_cache_scans_a_shared_attachment_once_per_definitions(small, tmp_path):
    store, rules, env, state = small
    shared_infected = SHARED + EICAR  # cacheable, and with a finding to carry over
    for i in range(200, 215):
        put(store, i, message(i, shared=shared_infected), folder="Shared")
    code, report = scan(env, store, state, rules, "--workers", "1")
    assert code == 1
    sha = by_id(report)[unique(200)]["findings"][0]["sha256"]
    fp = Definitions.build([str(rules)]).fingerprint_of(None)
    assert query(state, "SELECT count(*) FROM verdict_cache WHERE sha256 = ? AND component_fp = ?", sha, fp) == [(1,)]

    # New messages carrying the same attachment: answered by the cache, findings and all.
    for i in range(215, 225):
        put(store, i, message(i, shared=shared_infected), folder="Shared")
    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert (s["messages_scanned"], s["parts_from_cache"]) == (10, 10)
    for i in range(215, 225):
        m = by_id(report)[unique(i)]
        assert m["new"] is True
        assert [(f["rule"], f["part"], f["sha256"]) for f in m["findings"]] == [("Eicar_Test", "2/report.bin", sha)]

    # Same definitions, --full: every copy of the attachment comes from the cache.
    code, report = scan(env, store, state, rules, "--full")
    assert report["run"]["summary"]["parts_from_cache"] == 25
    assert len([m for m in report["messages"] if m["folder"] == "Shared"]) == 25

    # New definitions, new keys: one row per content and key (the delta scans of known
    # messages use extra.yar alone, the new message the whole new set).
    rules_dir(rules, extra=MARKER_RULE)
    put(store, 300, message(300, shared=shared_infected), folder="Shared")
    code, report = scan(env, store, state, rules)
    assert report["run"]["summary"]["messages_scanned"] == 66
    new = Definitions.build([str(rules)])
    rows = query(state, "SELECT component_fp FROM verdict_cache WHERE sha256 = ?", sha)
    assert sorted(k for (k,) in rows) == sorted([fp, new.fingerprint_of(["extra.yar"]), new.fingerprint_of(None)])


def test_expunged_messages_are_forgotten(small):
    store, rules, env, state = small
    scan(env, store, state, rules)
    next((store / "cur").glob(unique(4) + ":*")).unlink()  # infected
    next((store / "cur").glob(unique(5) + ":*")).unlink()

    # A run that does not list Archive forgets nothing there; INBOX loses its two.
    code, report = scan(env, store, state, rules, "--exclude", "Archive")
    assert report["run"]["summary"]["messages_seen"] == 28
    rows = dict(query(state, "SELECT folder, count(*) FROM messages GROUP BY folder"))
    assert rows == {"INBOX": 28, "Archive": 10}
    assert query(state, "SELECT count(*) FROM messages WHERE id IN (?, ?)", unique(4), unique(5)) == [(0,)]

    p = rescan(env, "status", "--state", str(state), "--format", "json")
    (mb,) = json.loads(p.stdout)["mailboxes"]
    assert (mb["messages"], mb["infected"]) == (38, 2)


def test_status_per_mailbox(small, tmp_path):
    store, rules, env, state = small
    other = maildir(tmp_path / "other")
    for i in range(5):
        put(other, i, message(i, infected=i == 0))
    missing = rescan(env, "status", "--state", str(state))
    assert missing.returncode == 2 and "no state store" in missing.stderr
    scan(env, store, state, rules)
    p = rescan(env, "scan", str(store), str(other), "--rules", str(rules), "--state", str(state), "-q")
    assert p.returncode == 1

    p = rescan(env, "status", "--state", str(state), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    rows = {(r["source"], r["mailbox"]): r for r in doc["mailboxes"]}
    assert set(rows) == {(f"maildir:{store}", "mail"), (f"maildir:{other}", "other")}
    a, b = rows[(f"maildir:{store}", "mail")], rows[(f"maildir:{other}", "other")]
    assert (a["messages"], a["coverage"], a["infected"]) == (40, 100.0, 3)
    assert (b["messages"], b["coverage"], b["infected"]) == (5, 100.0, 1)
    assert a["last_scan_run"] == 1 and b["last_scan_run"] == 2  # the second run skipped `mail`
    assert a["last_scan"] and doc["last_run"]["complete"] is True

    # Against new rules, nothing is current yet.
    rules_dir(rules, extra=MARKER_RULE)
    p = rescan(env, "status", "--state", str(state), "--rules", str(rules), "--format", "json")
    assert [r["coverage"] for r in json.loads(p.stdout)["mailboxes"]] == [0.0, 0.0]
    text = rescan(env, "status", "--state", str(state)).stdout
    assert f"maildir:{store} mail: 40 messages, 100.0% scanned with current definitions, 3 infected, last scanned " in text
    assert "last scanned -" not in text


# --- the run lock ---------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from rescan.state import StateStore
    store = StateStore(sys.argv[1])
    store.acquire_lock("test holder")
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_lock_held_by_a_live_process_then_a_dead_one(small):
    store, rules, env, state = small
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = rescan(env, "scan", str(store), "--rules", str(rules), "--state", str(state), "--format", "json")
        assert p.returncode == 2
        assert p.stdout == ""
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "locked by pid" in lines[0] and str(holder.pid) in lines[0]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, report = scan(env, store, state, rules)  # the dead holder's lock is taken over
    assert code == 1 and report["run"]["summary"]["messages_scanned"] == 40
    assert query(state, "SELECT count(*) FROM lock") == [(0,)]


# --- SIGKILL at several moments --------------------------------------------------------------


def _stamped(state: Path) -> int:
    """Messages with a stamp in ``state`` (0 before its schema exists)."""
    if not state.exists() or not query(state, "SELECT 1 FROM sqlite_master WHERE name = 'messages'"):
        return 0
    return query(state, "SELECT count(*) FROM messages WHERE status <> 'error'")[0][0]


def test_sigkill_at_several_moments_then_resume(big, tmp_path):
    store, rules, _, env, _, _ = big
    state = tmp_path / "state.sqlite"
    args = [sys.executable, "-m", "rescan", "scan", str(store), "--rules", str(rules), "--state", str(state),
            "--workers", "1", "--format", "json", "-q"]
    before = runs = 0
    # A fixed moment (start-up or planning), then just after a batch was committed, three
    # times: each resumed run is killed after its first commit, so the store never finishes.
    for delay in (0.5, "after a commit", "after a commit", "after a commit"):
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if delay == "after a commit":
            deadline = time.monotonic() + 120
            while _stamped(state) == before and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.05)
        else:
            time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be killed: make the store bigger"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its workers
        except ProcessLookupError:
            pass
        after = _stamped(state)
        try:
            run_id = query(state, "SELECT max(id) FROM runs")[0][0]
        except sqlite3.OperationalError:  # killed before the state file had its schema
            run_id = None
        if run_id is None or run_id == runs:  # killed before its run began
            assert after == before
            continue
        runs = run_id
        # Whole batches only, and nothing committed earlier was scanned again.
        written = query(state, "SELECT count(*) FROM messages WHERE last_scan_run = ?", run_id)[0][0]
        assert written == after - before
        assert query(state, 'SELECT "end" FROM runs WHERE id = ?', run_id) == [(None,)]
        before = after
    assert 0 < before < BIG

    code, report = scan(env, store, state, rules)
    s = report["run"]["summary"]
    assert code == 1 and report["run"]["complete"] is True
    assert (s["messages_scanned"], s["up_to_date"]) == (BIG - before, before)
    assert {m["id"] for m in report["messages"]} == {unique(i) for i in INFECTED}

    code, report = scan(env, store, state, rules)
    assert report["run"]["summary"]["messages_scanned"] == 0 and code == 1
    assert _stamped(state) == BIG
