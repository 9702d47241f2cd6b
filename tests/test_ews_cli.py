"""`rescan scan ews+http://...` end to end: exchangelib over real HTTP against the EWS test
server, through the command line."""

from __future__ import annotations

import json

from tests.mailgen import EICAR, message, zipped
from tests.servers.ews import ews_server  # noqa: F401
from tests.test_cli import cache, rescan  # noqa: F401

FOLDERS = ("Inbox", "Archive", "Projects/2026")
INFECTED = {7, 120, 255}


def seed(server, total=300):
    ids = {}
    for n in range(total):
        attachments = []
        if n in INFECTED:
            attachments = [("invoice.com", EICAR)] if n % 2 else [("scan.jpg", zipped("x.exe", EICAR))]
        ids[n] = server.seed("alice", FOLDERS[n % 3], message(n, attachments=attachments), is_read=n % 4 == 0)
    return ids


def test_ews_scan_lists_exactly_the_infected_and_changes_nothing(ews_server):
    seed(ews_server)
    before = ews_server.snapshot("alice")
    r = rescan("scan", ews_server.source("alice"), "--format", "json", "-q", env={"RESCAN_PASSWORD": "alice-pw"})
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert sorted(m["message_id"] for m in rep["messages"]) == sorted(f"<m{n}@test.example>" for n in INFECTED)
    assert rep["run"]["summary"]["messages_scanned"] == 300
    assert {m["folder"] for m in rep["messages"]} == {FOLDERS[n % 3] for n in INFECTED}
    assert ews_server.snapshot("alice") == before
    assert "alice-pw" not in r.stdout + r.stderr


def test_ews_quarantine_through_the_cli(ews_server, tmp_path):
    seed(ews_server, 30)
    total = sum(len(ews_server.mailbox_items("alice", f)) for f in FOLDERS)
    env = {"RESCAN_PASSWORD": "alice-pw"}
    state = tmp_path / "s.sqlite"
    r = rescan("scan", ews_server.source("alice"), "--action", "quarantine", "--state", state, "--format", "json", "-q", env=env)
    assert r.returncode == 1, r.stderr
    acts = json.loads(r.stdout)["run"]["actions"]
    assert [a["ok"] for a in acts] == [True]  # message 7 is the only infected one of the first 30
    moved = ews_server.mailbox_items("alice", "Quarantine")
    assert len(moved) == 1 and b"<m7@test.example>" in moved[0].mime
    assert sum(len(ews_server.mailbox_items("alice", f)) for f in FOLDERS) == total - 1
    # a rerun acts on nothing again: the quarantined message is left where it is
    r = rescan("scan", ews_server.source("alice"), "--action", "quarantine", "--state", state, "--format", "json", "-q", env=env)
    assert json.loads(r.stdout)["run"]["actions"] == []
    assert len(ews_server.mailbox_items("alice", "Quarantine")) == 1


def test_ews_wrong_password_is_one_line_exit_2(ews_server):
    r = rescan("scan", ews_server.source("alice"), env={"RESCAN_PASSWORD": "not-it"})
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "not-it" not in r.stderr + r.stdout
