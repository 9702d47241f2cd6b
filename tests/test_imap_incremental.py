"""Incremental IMAP runs against a real Dovecot (CONDSTORE, QRESYNC): a nightly rerun with
unchanged definitions lists only what changed, still reports every infected message, forgets
expunged ones; a new UIDVALIDITY, changed definitions, a server without QRESYNC and an
interrupted run each fall back to listing folders whole. Unit tests of the cursors."""

from __future__ import annotations

import json
import sqlite3

import pytest

from connectors.imap import ImapCursor, parse_vanished
from rescan.session import folder_token, parse_folder_token
from tests.servers.dovecot import (  # noqa: F401  (fixtures)
    USERS,
    dovecot,
    dovecot_factory,
    mailbox_state,
    make_message,
    seed_mailbox,
)
from tests.stampkit import EICAR_RULE, MARKER_RULE, cli_env, query, rescan, rules_dir
from tests.test_imap import CAPS_NO_MOVE, all_refs, connect

# Seeded by seed_mailbox: INBOX 1-6, Archive/2024 7-10, Work 11-13; every third one infected.
SEEDED = 13
INFECTED = {"<msg-3@rescan.test>", "<msg-6@rescan.test>", "<msg-9@rescan.test>", "<msg-12@rescan.test>"}


@pytest.fixture
def run(tmp_path):
    """``run(server, *extra)`` → (exit code, JSON report) of ``rescan scan`` with one state
    file and eicar rules (``rules`` is their directory)."""
    env = dict(cli_env(tmp_path), RESCAN_PASSWORD=USERS["alice"])
    rules = rules_dir(tmp_path / "rules", eicar=EICAR_RULE)
    state = tmp_path / "state.sqlite"

    def scan(server, *extra: str) -> tuple[int, dict]:
        p = rescan(env, "scan", server.url("alice"), "--rules", str(rules), "--state", str(state),
                   "--format", "json", "-q", *extra)
        assert p.stdout, p.stderr
        return p.returncode, json.loads(p.stdout)

    scan.state, scan.rules, scan.env = state, rules, env
    return scan


def append(server, folder: str, *numbers: int, infected: tuple[int, ...] = ()) -> None:
    client = server.client("alice")
    try:
        for n in numbers:
            client.append(folder, make_message(n, infected=n in infected))
    finally:
        client.logout()


def expunge(server, folder: str, uid: int) -> None:
    client = server.client("alice")
    try:
        client.select_folder(folder)
        client.delete_messages([uid])
        client.uid_expunge([uid])
    finally:
        client.logout()


def tokens(state) -> dict[str, dict]:
    """Folder → stored cursor token (as parsed JSON) of every folder that has one."""
    return {f: json.loads(t) for f, t in query(state, "SELECT folder, token FROM folders WHERE token IS NOT NULL")}


def summary(report) -> tuple[int, int, int, int]:
    s = report["run"]["summary"]
    return s["messages_seen"], s["messages_scanned"], s["up_to_date"], s["folders_incremental"]


def listed(report) -> dict[str, bool]:
    """Message-ID → ``new`` of every message the report lists."""
    return {m["message_id"]: m["new"] for m in report["messages"]}


# -- unit tests -------------------------------------------------------------------------


def test_imap_cursor_text_round_trip_and_refusals():
    assert ImapCursor.parse("1700000000:57:912") == ImapCursor(1700000000, 57, 912)
    assert ImapCursor.parse("1700000000:57") == ImapCursor(1700000000, 57, None)
    assert str(ImapCursor(5, 9, 12)) == "5:9:12" and str(ImapCursor(5, 9)) == "5:9"
    for bad in ("", "5", "5:9:12:1", "a:9:12", "5:-9:12", "0:9:12", "5:0", "5::12", " 5:9:12"):
        assert ImapCursor.parse(bad) is None, bad


def test_vanished_responses_become_uids():
    assert parse_vanished([b"(EARLIER) 2,4:6", b"9"]) == [2, 4, 5, 6, 9]
    assert parse_vanished([b"(earlier) 3"]) == [3]
    assert parse_vanished([]) == [] and parse_vanished([b"(EARLIER) "]) == []


def test_folder_token_holds_definitions_version_and_cursor():
    token = folder_token("abc123", "5:9:12")
    assert parse_folder_token(token) == ("abc123", "5:9:12")
    assert parse_folder_token("1700000000") == (None, None)  # a bare token of an older rescan
    assert parse_folder_token('{"definitions": "abc123"}') == (None, None)
    assert parse_folder_token("not json") == (None, None)


# -- the connector against Dovecot ------------------------------------------------------


def test_changes_since_a_listing_are_the_new_and_the_expunged(dovecot):
    seed_mailbox(dovecot)
    with connect(dovecot.url(), extra={"uid_window": "2"}) as conn:
        assert conn.cursor("alice", "INBOX") is None  # nothing listed yet
        before = [r for batch in conn.refs("alice", "INBOX") for r in batch]
        cursor = conn.cursor("alice", "INBOX")
        uidvalidity = before[0].version.split(":")[0]
        assert ImapCursor.parse(cursor) is not None and cursor.startswith(f"{uidvalidity}:7:")

        unchanged = conn.changes("alice", "INBOX", cursor)
        assert [r for b in unchanged.refs for r in b] == [] and unchanged.gone == ()
        assert unchanged.cursor == cursor

        append(dovecot, "INBOX", 50, 51, 52)
        expunge(dovecot, "INBOX", 2)
        expunge(dovecot, "INBOX", 8)  # the second new one
        client = dovecot.client("alice")
        client.select_folder("INBOX")
        client.add_flags([1, 3], [b"\\Flagged"])  # flag changes are not changes of content
        client.logout()
        changes = conn.changes("alice", "INBOX", cursor)
        batches = list(changes.refs)
        new = [r for b in batches for r in b]
        assert [r.id for r in new] == ["7", "9"] and [len(b) for b in batches] == [1, 1]
        assert all(r.version == f"{uidvalidity}:{r.id}" and r.size for r in new)
        assert set(changes.gone) == {"2", "8"}
        again = ImapCursor.parse(changes.cursor)
        assert (again.uidnext, again.modseq > ImapCursor.parse(cursor).modseq) == (10, True)
        fetched = {r.id: raw for r, raw in conn.fetch(new)}
        assert fetched == {"7": make_message(50), "9": make_message(52)}

        later = conn.changes("alice", "INBOX", changes.cursor)
        assert list(later.refs) == [] and later.gone == ()
        # A cursor of another UIDVALIDITY, or without HIGHESTMODSEQ: list the folder whole.
        assert conn.changes("alice", "INBOX", f"{int(uidvalidity) + 1}:7:1") is None
        assert conn.changes("alice", "INBOX", f"{uidvalidity}:7") is None
        assert conn.changes("alice", "INBOX", "garbage") is None


def test_no_changes_without_qresync(dovecot_factory):
    server = dovecot_factory(imap_capability=CAPS_NO_MOVE.replace(" QRESYNC", ""))
    seed_mailbox(server)
    with connect(server.url()) as conn:
        assert len(all_refs(conn)) == SEEDED
        cursor = conn.cursor("alice", "Work")
        assert ImapCursor.parse(cursor).modseq is None  # CONDSTORE offered but not enabled
        assert conn.changes("alice", "Work", cursor) is None
        assert conn.changes("alice", "Work", cursor + ":5") is None


# -- the CLI ----------------------------------------------------------------------------


def test_nightly_rerun_scans_only_new_mail_and_reports_everything(dovecot, run):
    seed_mailbox(dovecot)
    code, first = run(dovecot)
    assert code == 1 and summary(first) == (SEEDED, SEEDED, 0, 0)
    assert listed(first) == {m: True for m in INFECTED}
    assert set(tokens(run.state)) == {"INBOX", "Archive/2024", "Work"}

    append(dovecot, "INBOX", 100, 101, infected=(101,))
    expunge(dovecot, "Work", 2)  # msg-12, infected
    before = mailbox_state(dovecot)
    code, second = run(dovecot)
    assert code == 1, second
    # 2 new scanned; the other 12 known ones counted up to date without being listed.
    assert summary(second) == (SEEDED + 2 - 1, 2, SEEDED - 1, 3)
    s = second["run"]["summary"]
    assert (s["infected"], s["new_infected"], s["errors"]) == (4, 1, 0)
    assert listed(second) == {
        "<msg-3@rescan.test>": False, "<msg-6@rescan.test>": False, "<msg-9@rescan.test>": False,
        "<msg-101@rescan.test>": True,
    }
    assert second["messages"][0]["message_id"] == "<msg-101@rescan.test>"
    assert all(m["rescanned"] == m["new"] for m in second["messages"])
    assert mailbox_state(dovecot) == before  # nothing changed by the scan
    assert query(run.state, "SELECT id FROM messages WHERE folder = 'Work' ORDER BY id") == [("1",), ("3",)]
    p = rescan(run.env, "status", "--state", str(run.state), "--format", "json")
    (mb,) = json.loads(p.stdout)["mailboxes"]
    assert (mb["messages"], mb["infected"], mb["coverage"]) == (SEEDED + 1, 4, 100.0)

    code, third = run(dovecot)  # nothing changed since
    assert code == 1 and summary(third) == (SEEDED + 1, 0, SEEDED + 1, 3)
    assert listed(third) == {m: False for m in listed(second)}


def test_a_failed_scan_is_retried_by_an_incremental_run(dovecot, run):
    seed_mailbox(dovecot)
    assert run(dovecot)[0] == 1
    # As if the fetch of INBOX UID 1 had failed in that run.
    db = sqlite3.connect(run.state)
    db.execute("UPDATE messages SET status = 'error', problems = '[{\"code\": \"fetch\", \"detail\": \"x\", \"part\": null}]'"
               " WHERE folder = 'INBOX' AND id = '1'")
    db.commit()
    db.close()
    code, report = run(dovecot)
    assert code == 1 and summary(report) == (SEEDED, 1, SEEDED - 1, 3)
    assert query(run.state, "SELECT status FROM messages WHERE folder = 'INBOX' AND id = '1'") == [("clean",)]


def test_new_uidvalidity_lists_that_folder_whole(dovecot, run):
    seed_mailbox(dovecot)
    assert run(dovecot)[0] == 1
    old = ImapCursor.parse(tokens(run.state)["Work"]["cursor"])
    client = dovecot.client("alice")
    try:
        client.delete_folder("Work")
        client.create_folder("Work")
    finally:
        client.logout()
    append(dovecot, "Work", 200, 201, infected=(201,))
    code, report = run(dovecot)
    assert code == 1
    # Work listed whole (2 scanned), INBOX and Archive/2024 incremental (10 up to date).
    assert summary(report) == (12, 2, 10, 2)
    assert listed(report) == {
        "<msg-3@rescan.test>": False, "<msg-6@rescan.test>": False, "<msg-9@rescan.test>": False,
        "<msg-201@rescan.test>": True,
    }
    new = ImapCursor.parse(tokens(run.state)["Work"]["cursor"])
    assert new.uidvalidity != old.uidvalidity
    rows = query(run.state, "SELECT id, version FROM messages WHERE folder = 'Work' ORDER BY id")
    assert rows == [("1", f"{new.uidvalidity}:1"), ("2", f"{new.uidvalidity}:2")]  # msg-12's row is gone


def test_changed_definitions_list_every_folder_whole(dovecot, run):
    seed_mailbox(dovecot)
    assert run(dovecot)[0] == 1
    version = next(iter(tokens(run.state).values()))["definitions"]
    rules_dir(run.rules, extra=MARKER_RULE)
    append(dovecot, "Archive/2024", 300)
    code, report = run(dovecot)
    assert code == 1
    assert summary(report) == (SEEDED + 1, SEEDED + 1, 0, 0)  # a delta scan of every message
    assert report["run"]["definitions"]["changed_since_last_run"]["added"] == ["extra.yar"]
    assert listed(report) == {m: False for m in INFECTED}
    stored = tokens(run.state)
    assert len(stored) == 3 and all(t["definitions"] not in (None, version) for t in stored.values())
    code, report = run(dovecot)
    assert summary(report) == (SEEDED + 1, 0, SEEDED + 1, 3)  # incremental again
    code, report = run(dovecot, "--full")
    assert summary(report) == (SEEDED + 1, SEEDED + 1, 0, 0)


def test_an_interrupted_run_stores_no_cursor_for_unfinished_folders(dovecot, run):
    seed_mailbox(dovecot)
    # Stopped after its first record: no folder was finished.
    code, report = run(dovecot, "--max-duration", "0.000001", "--workers", "1")
    assert code == 2 and report["run"]["complete"] is False
    assert tokens(run.state) == {}
    code, report = run(dovecot)
    assert code == 1 and report["run"]["complete"] is True
    assert set(tokens(run.state)) == {"INBOX", "Archive/2024", "Work"}
    # Changed definitions clear a folder's cursor as soon as the folder is taken up, so a
    # run interrupted with them leaves no cursor of the old definitions over new stamps.
    rules_dir(run.rules, extra=MARKER_RULE)
    code, report = run(dovecot, "--max-duration", "0.000001", "--workers", "1")
    assert code == 2
    (last,) = query(run.state, "SELECT max(id) FROM runs")[0]
    touched = {f for (f,) in query(run.state, "SELECT DISTINCT folder FROM messages WHERE last_scan_run = ?", last)}
    assert touched and not touched & set(tokens(run.state))
    code, report = run(dovecot)
    assert code == 1 and summary(report)[3] == 0
    assert len(tokens(run.state)) == 3
