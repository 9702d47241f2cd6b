"""The EWS connector against the loopback EWS test server, over real HTTP through exchangelib."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.base import SourceOptions, open_source
from connectors.ews import EWSConnector, map_ews_errors
from rescan.errors import AuthError, FetchError, TransientError, UsageError
from rescan.secret import Secret
from tests.servers.ews import EWSTestServer, ews_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "alice-pw"


def message(n: int, folder: str = "Inbox") -> bytes:
    """A distinct message with CRLF line ends and 8-bit bytes (MIME must come back exact)."""
    return (
        f"From: sender{n}@example.org\r\nTo: alice@example.org\r\nSubject: {folder} message {n}\r\n"
        f"Date: Mon, 1 Jan 2024 10:{n % 60:02d}:00 +0000\r\nMessage-ID: <{folder}.{n}@example.org>\r\n"
        f"Content-Type: text/plain; charset=latin-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"body {n} \xe9t\xe9\r\n"
    ).encode("latin-1") + bytes(range(128, 256)) + b"\r\n"


def connect(server: EWSTestServer, user: str = "alice", password: str = PASSWORD, **kw) -> EWSConnector:
    conn = open_source(server.source(user), SourceOptions(password=Secret(password), **kw))
    conn.RETRY_BASE = 0.01  # keep connection-fault retries quick in tests
    return conn


def refs_of(conn: EWSConnector, mailbox: str, folder: str) -> list:
    return [r for batch in conn.refs(mailbox, folder) for r in batch]


def test_ews_enumeration_pages_and_fills_refs(ews_server):
    inbox = [ews_server.seed("alice", "Inbox", message(n)) for n in range(7)]
    ews_server.seed("alice", "Inbox/Sub", message(50, "Sub"))
    ews_server.seed("alice", "Archive", message(60, "Archive"))
    with connect(ews_server, batch_count=4, extra={"page_size": "3"}) as conn:
        assert conn.mailboxes() == ["alice@127.0.0.1"]
        folders = conn.folders("alice@127.0.0.1")
        assert folders == ["Archive", "Deleted Items", "Drafts", "Inbox", "Inbox/Sub", "Junk Email", "Sent Items"]
        before = len(ews_server.operations())
        batches = list(conn.refs("alice@127.0.0.1", "Inbox"))
    assert [len(b) for b in batches] == [4, 3]
    assert ews_server.operations()[before:] == ["FindItem"] * 3  # 7 items, pages of 3
    refs = [r for b in batches for r in b]
    assert [r.id for r in refs] == inbox
    items = {i.id: i for i in ews_server.mailbox_items("alice")}
    for r in refs:
        assert r.version == f"{r.id}:{items[r.id].ck}"
        assert r.size == len(items[r.id].mime)
        assert r.date.startswith("2024-01-01T10:")
        assert (r.mailbox, r.folder, r.source) == ("alice@127.0.0.1", "Inbox", ews_server.source("alice"))


def test_ews_folder_globs(ews_server):
    for path in ("Inbox/Sub", "Inbox/Sub/Deep", "Archive"):
        ews_server.add_folder("alice", path)
    with connect(ews_server, include=("Inbox*", "Archive"), exclude=("Inbox/Sub/*",)) as conn:
        assert conn.folders("alice@127.0.0.1") == ["Archive", "Inbox", "Inbox/Sub"]


def test_ews_fetch_exact_bytes_in_bounded_batches_and_changes_nothing(ews_server):
    raws = {ews_server.seed("alice", "Inbox", message(n)): message(n) for n in range(5)}
    ews_server.seed("alice", "Inbox", message(9), is_read=True)
    before = ews_server.snapshot("alice")
    with connect(ews_server, batch_bytes=2 * len(message(0)) + 10) as conn:
        refs = refs_of(conn, "alice@127.0.0.1", "Inbox")
        start = len(ews_server.operations())
        got = dict((r.id, raw) for r, raw in conn.fetch(refs))
    assert all(got[i] == raw for i, raw in raws.items())
    assert len(got) == 6
    assert ews_server.operations()[start:] == ["GetItem"] * 3  # two messages per batch
    assert ews_server.snapshot("alice") == before  # same ids, change keys, folders, read state


def test_ews_server_busy_backs_off_that_mailbox_only():
    server = EWSTestServer(users={"svc@example.org": "svc-pw"}).start()
    try:
        for box in ("bob@example.org", "carol@example.org"):
            server.add_mailbox(box)
            for n in range(3):
                server.seed(box, "Inbox", message(n, box))
        conn = connect(server, "svc@example.org", "svc-pw", mailboxes=("bob@example.org", "carol@example.org"))
        refs = refs_of(conn, "bob@example.org", "Inbox") + refs_of(conn, "carol@example.org", "Inbox")
        mark = len(server.requests)
        server.busy("bob@example.org", times=1, back_off_ms=400)
        results = list(conn.fetch(refs))
        conn.close()
    finally:
        server.stop()
    assert sorted(isinstance(raw, bytes) for _, raw in results) == [True] * 6
    log = [r for r in server.requests[mark:] if r.operation == "GetItem"]
    bob = [r for r in log if r.mailbox == "bob@example.org"]
    carol = [r for r in log if r.mailbox == "carol@example.org"]
    assert [r.outcome for r in bob] == ["busy", "ok"]
    assert [r.outcome for r in carol] == ["ok"]
    assert carol[0].at < bob[1].at  # carol was served while bob waited
    assert bob[1].at - bob[0].at >= 0.4  # bob waited the server's BackOffMilliseconds
    assert {r.impersonated for r in log} == {"bob@example.org", "carol@example.org"}


def test_ews_server_busy_waits_exactly_the_requested_back_off(ews_server):
    ews_server.seed("alice", "Inbox", message(1))
    conn = connect(ews_server)
    waits: list[float] = []
    conn._sleep = waits.append
    conn.folders("alice@127.0.0.1")
    ews_server.busy("alice", times=2, back_off_ms=250)
    assert len(refs_of(conn, "alice@127.0.0.1", "Inbox")) == 1
    assert waits == [0.25, 0.25]


def test_ews_401_is_an_auth_error_at_once(ews_server, caplog):
    ews_server.seed("alice", "Inbox", message(1))
    conn = connect(ews_server, password="wrong-secret-123")
    with caplog.at_level(logging.DEBUG, logger="connectors"), pytest.raises(AuthError) as info:
        conn.folders("alice@127.0.0.1")
    assert len(ews_server.requests) == 1 and ews_server.requests[0].outcome == "401"
    assert "wrong-secret-123" not in str(info.value) and "wrong-secret-123" not in caplog.text


def test_ews_dropped_connection_and_http_500_are_retried(ews_server):
    raws = [message(n) for n in range(3)]
    for raw in raws:
        ews_server.seed("alice", "Inbox", raw)
    with connect(ews_server) as conn:
        refs = refs_of(conn, "alice@127.0.0.1", "Inbox")
        ews_server.drop_connections(1)
        assert [raw for _, raw in conn.fetch(refs)] == raws
        ews_server.fail_http(2)
        assert [raw for _, raw in conn.fetch(refs)] == raws
    outcomes = [r.outcome for r in ews_server.requests if r.operation == "GetItem"]
    assert outcomes == ["dropped", "ok", "500", "500", "ok"]


def test_ews_connection_faults_give_up_after_bounded_retries(ews_server):
    ews_server.seed("alice", "Inbox", message(1))
    with connect(ews_server) as conn:
        refs = refs_of(conn, "alice@127.0.0.1", "Inbox")
        ews_server.fail_http(100)
        [(ref, err)] = list(conn.fetch(refs))
    assert isinstance(err, FetchError)
    assert ews_server.operations("500") == ["GetItem"] * (EWSConnector.RETRIES + 1)


def test_ews_item_moved_between_listing_and_fetch_is_an_error_not_skipped(ews_server):
    ids = [ews_server.seed("alice", "Inbox", message(n)) for n in range(4)]
    with connect(ews_server) as conn:
        refs = refs_of(conn, "alice@127.0.0.1", "Inbox")
        ews_server.move_before_next_getitem(ids[1], "Elsewhere")
        results = dict((r.id, raw) for r, raw in conn.fetch(refs))
    assert set(results) == set(ids)
    assert isinstance(results[ids[1]], FetchError) and "gone" in str(results[ids[1]])
    assert [results[i] for i in (ids[0], ids[2], ids[3])] == [message(0), message(2), message(3)]


def test_ews_tag_adds_a_category_once(ews_server):
    ids = [ews_server.seed("alice", "Inbox", message(n)) for n in range(2)]
    with connect(ews_server) as conn:
        refs = refs_of(conn, "alice@127.0.0.1", "Inbox")
        results = conn.tag(refs[:1], "Infected")
        assert [(r.ok, r.ref.id) for r in results] == [(True, ids[0])]
        items = {i.id: i for i in ews_server.mailbox_items("alice")}
        assert items[ids[0]].categories == ["Infected"] and items[ids[1]].categories == []
        rerun = refs_of(conn, "alice@127.0.0.1", "Inbox")[:1]
        updates = ews_server.operations().count("UpdateItem")
        again = conn.tag(rerun, "Infected")
    assert again[0].ok and "already" in again[0].detail
    assert ews_server.operations().count("UpdateItem") == updates


def test_ews_actions_refuse_a_changed_message(ews_server):
    iid = ews_server.seed("alice", "Inbox", message(1))
    with connect(ews_server) as conn:
        [ref] = refs_of(conn, "alice@127.0.0.1", "Inbox")
        item = ews_server.mailbox_items("alice")[0]
        item.changekey += 1  # someone edited it after the scan
        before = ews_server.snapshot("alice")
        for act in (lambda: conn.tag([ref], "Infected"), lambda: conn.quarantine([ref], "Quarantine"),
                    lambda: conn.delete([ref]), lambda: conn.delete([ref], hard=True)):
            [res] = act()
            assert not res.ok and "changed" in res.detail
    assert ews_server.snapshot("alice") == before
    assert [i.id for i in ews_server.mailbox_items("alice", "Inbox")] == [iid]


def test_ews_quarantine_creates_folder_moves_and_confirms(ews_server):
    ids = [ews_server.seed("alice", "Inbox", message(n)) for n in range(3)]
    with connect(ews_server) as conn:
        refs = refs_of(conn, "alice@127.0.0.1", "Inbox")
        results = conn.quarantine(refs[:2], "Quarantine")
        assert "Quarantine" in conn.folders("alice@127.0.0.1")
        moved = refs_of(conn, "alice@127.0.0.1", "Quarantine")
        again = conn.quarantine(moved, "Quarantine")
    assert [r.ok for r in results] == [True, True]
    quarantined = ews_server.mailbox_items("alice", "Quarantine")
    assert sorted(r.new_id for r in results) == sorted(i.id for i in quarantined)
    assert [i.mime for i in quarantined] == [message(0), message(1)]
    assert [i.id for i in ews_server.mailbox_items("alice", "Inbox")] == [ids[2]]
    assert [r.ok for r in again] == [True, True] and all("already" in r.detail for r in again)
    assert ews_server.operations().count("CreateFolder") == 1
    assert ews_server.operations().count("MoveItem") == 1


def test_ews_delete_moves_to_deleted_items_and_hard_delete_removes(ews_server):
    ids = [ews_server.seed("alice", "Inbox", message(n)) for n in range(3)]
    with connect(ews_server) as conn:
        refs = refs_of(conn, "alice@127.0.0.1", "Inbox")
        soft = conn.delete(refs[:1])
        hard = conn.delete(refs[1:2], hard=True)
        gone = conn.delete(refs[1:2], hard=True)
    assert soft[0].ok and [i.mime for i in ews_server.mailbox_items("alice", "Deleted Items")] == [message(0)]
    assert soft[0].new_id == ews_server.mailbox_items("alice", "Deleted Items")[0].id
    assert hard[0].ok and hard[0].detail == "deleted"
    assert not gone[0].ok and "gone" in gone[0].detail
    assert sorted(i.id for i in ews_server.mailbox_items("alice")) == sorted([soft[0].new_id, ids[2]])


def test_ews_source_rules():
    opts = SourceOptions(password=Secret("s3cret-value"))
    with pytest.raises(UsageError, match="loopback"):
        open_source("ews+http://alice@mail.example.org/EWS/Exchange.asmx", opts)
    with pytest.raises(UsageError, match="password"):
        open_source("ews+http://alice@127.0.0.1:1/EWS/Exchange.asmx", SourceOptions())
    with pytest.raises(UsageError, match="auth"):
        open_source("ews://alice@mail.example.org/EWS/Exchange.asmx", SourceOptions(password=Secret("x"), extra={"auth": "kerberos"}))
    with pytest.raises(UsageError, match="mailboxes"):
        open_source("ews://CORP%5Calice@mail.example.org/EWS/Exchange.asmx", opts)
    conn = open_source("ews://alice@example.org@mail.example.org/EWS/Exchange.asmx", opts)
    assert conn.endpoint == "https://mail.example.org/EWS/Exchange.asmx"
    assert conn.mailboxes() == ["alice@example.org"]
    assert "s3cret-value" not in repr(conn.__dict__)


def test_ews_insecure_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        open_source("ews://alice@mail.example.org/EWS/Exchange.asmx", SourceOptions(password=Secret("x"), insecure=True))
    assert "VERIFICATION IS DISABLED" in caplog.text


def test_ews_error_boundary():
    from exchangelib import errors as ex

    with pytest.raises(TransientError) as info, map_ews_errors("box"):
        raise ex.ErrorServerBusy("busy", back_off=2.5)
    assert info.value.retry_after == 2.5
    with pytest.raises(TransientError) as info, map_ews_errors("box"):
        raise ex.ErrorServerBusy("Reraised from ConnectionError", back_off=10)
    assert info.value.retry_after is None
    with pytest.raises(AuthError), map_ews_errors("box"):
        raise ex.UnauthorizedError("Invalid credentials for http://x")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ews_server_by_hand_serves_a_maildir(tmp_path):
    md = tmp_path / "mail"
    for folder, count in (("", 3), (".Archive", 2), (".Archive.2023", 1)):
        for sub in ("cur", "new", "tmp"):
            (md / folder / sub).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            (md / folder / "cur" / f"{n}.host:2,S").write_bytes(message(n, folder or "Inbox"))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.ews", "--port", str(port), "--user", "alice",
         "--password", "by-hand-pw", "--maildir", str(md)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert "serving 6 messages" in proc.stdout.readline()
        source = f"ews+http://alice@127.0.0.1:{port}/EWS/Exchange.asmx"
        with open_source(source, SourceOptions(password=Secret("by-hand-pw"))) as conn:
            [box] = conn.mailboxes()
            counts = {f: len(refs_of(conn, box, f)) for f in ("Inbox", "Archive", "Archive/2023")}
            fetched = [raw for _, raw in conn.fetch(refs_of(conn, box, "Archive/2023"))]
    finally:
        proc.terminate()
        proc.wait(10)
    assert counts == {"Inbox": 3, "Archive": 2, "Archive/2023": 1}
    assert fetched == [message(0, ".Archive.2023")]


def test_ews_bearer_token(monkeypatch):
    with pytest.raises(UsageError, match="https"):
        open_source("ews+http://alice@127.0.0.1:1/EWS/Exchange.asmx", SourceOptions(token=Secret("t")))
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # plain HTTP to the loopback test server
    server = EWSTestServer(users={"alice": "unused"}, tokens=("token-abc",)).start()
    try:
        server.seed("alice", "Inbox", message(1))
        with open_source(server.source("alice"), SourceOptions(token=Secret("token-abc"))) as conn:
            assert [raw for _, raw in conn.fetch(refs_of(conn, "alice@127.0.0.1", "Inbox"))] == [message(1)]
        with pytest.raises(AuthError):
            open_source(server.source("alice"), SourceOptions(token=Secret("expired"))).folders("alice@127.0.0.1")
    finally:
        server.stop()
