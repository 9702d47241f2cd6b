"""`rescan scan imap://...` end to end against a real Dovecot, through the command line:
exact infected list, nothing changed by a scan, quarantine that loses nothing."""

from __future__ import annotations

import json

from tests.mailgen import EICAR, message, zipped
from tests.servers.dovecot import USERS, dovecot, dovecot_factory, mailbox_state  # noqa: F401
from tests.test_cli import cache, rescan  # noqa: F401

FOLDERS = ("INBOX", "Archive/2024", "Work")


def seed(server, total, infected):
    client = server.client("alice")
    try:
        for f in FOLDERS[1:]:
            client.create_folder(f)
        for n in range(total):
            att = []
            if n in infected:
                att = [("invoice.com", EICAR)] if n % 2 else [("photo.jpg", zipped("a.exe", EICAR))]
            client.append(FOLDERS[n % 3], message(n, attachments=att), flags=[b"\\Seen"] if n % 2 else [])
    finally:
        client.logout()


def env():
    return {"RESCAN_PASSWORD": USERS["alice"]}


def counts(state):
    return {f: len(uids) for f, uids in state.items()}


def test_imap_scan_of_thousands_lists_exactly_the_infected_and_changes_nothing(dovecot):
    infected = {10, 1501, 2999}
    seed(dovecot, 3000, infected)
    before = mailbox_state(dovecot)
    r = rescan("scan", dovecot.url("alice"), "--format", "json", "-q", env=env())
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert sorted(m["message_id"] for m in rep["messages"]) == sorted(f"<m{n}@test.example>" for n in infected)
    assert rep["run"]["summary"]["messages_scanned"] == 3000
    assert mailbox_state(dovecot) == before  # same messages, same \Seen and other flags


def test_imap_quarantine_moves_exactly_the_infected(dovecot, tmp_path):
    infected = {4, 11, 30}
    seed(dovecot, 60, infected)
    before = counts(mailbox_state(dovecot))
    state = tmp_path / "s.sqlite"
    r = rescan("scan", dovecot.url("alice"), "--action", "quarantine", "--state", state, "--format", "json", "-q", env=env())
    assert r.returncode == 1, r.stderr
    acts = json.loads(r.stdout)["run"]["actions"]
    assert len(acts) == 3 and all(a["ok"] for a in acts)
    after = mailbox_state(dovecot)
    assert len(after["Quarantine"]) == 3
    assert sum(counts(after).values()) == sum(before.values())
    client = dovecot.client("alice")
    try:
        client.select_folder("Quarantine", readonly=True)
        ids = {d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].strip() for d in client.fetch(client.search(), ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values()}
    finally:
        client.logout()
    assert ids == {f"Message-ID: <m{n}@test.example>".encode() for n in infected}
    # the next run finds them in Quarantine and leaves them there
    r = rescan("scan", dovecot.url("alice"), "--action", "quarantine", "--state", state, "--format", "json", "-q", env=env())
    assert r.returncode == 1
    assert json.loads(r.stdout)["run"]["actions"] == []
    assert counts(mailbox_state(dovecot)) == counts(after)


def test_imap_tag_sets_the_keyword(dovecot):
    seed(dovecot, 9, {3})
    r = rescan("scan", dovecot.url("alice"), "--action", "tag", "-q", env=env())
    assert r.returncode == 1, r.stderr
    flags = mailbox_state(dovecot)["INBOX"]
    tagged = [uid for uid, f in flags.items() if b"$Infected" in f]
    assert len(tagged) == 1


def test_imap_wrong_password_is_one_line_exit_2(dovecot):
    r = rescan("scan", dovecot.url("alice"), env={"RESCAN_PASSWORD": "wrong-pw-123"})
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "wrong-pw-123" not in r.stderr + r.stdout


def test_imap_password_file(dovecot, tmp_path):
    seed(dovecot, 3, set())
    pw = tmp_path / "pw"
    pw.write_text(USERS["alice"] + "\n")
    r = rescan("scan", dovecot.url("alice"), "--password-file", pw, "-q", env={"RESCAN_PASSWORD": ""})
    assert r.returncode == 0, r.stdout + r.stderr


def test_imap_oauth_token_from_a_command(dovecot, tmp_path):
    helper = tmp_path / "token-helper.sh"
    helper.write_text(f"#!/bin/sh\necho {USERS['carol']}\n")
    helper.chmod(0o700)
    r = rescan("scan", dovecot.url("carol"), "--token-command", str(helper), "-q", env={"RESCAN_PASSWORD": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    assert USERS["carol"] not in r.stdout + r.stderr
    r = rescan("scan", dovecot.url("carol"), "--token-command", "false", "-q", env={"RESCAN_PASSWORD": ""})
    assert r.returncode == 2 and "token command" in r.stderr
