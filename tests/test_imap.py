"""The IMAP connector: unit tests of its helpers, and behaviour against a real Dovecot."""

from __future__ import annotations

import datetime
import imaplib
import logging
import socket
import ssl
import threading

import pytest
from imapclient import exceptions as imap_exc

from connectors.base import SourceOptions, open_source
from connectors.imap import (
    ImapConnector,
    compress_uids,
    expand_uids,
    map_imap_errors,
    password_allowed,
)
from rescan.errors import AuthError, FetchError, SourceError, TransientError, UsageError
from rescan.models import MessageRef
from rescan.secret import Secret
from tests.servers.dovecot import (  # noqa: F401  (fixtures)
    MASTERS,
    USERS,
    dovecot,
    dovecot_factory,
    dovecot_tls,
    mailbox_state,
    seed_mailbox,
)
from tests.servers.tcpproxy import CuttingProxy

# Dovecot's post-login capabilities, without MOVE (and, below, without UIDPLUS too).
CAPS_NO_MOVE = ("IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT MULTIAPPEND UNSELECT "
                "CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED CONDSTORE QRESYNC ESEARCH "
                "LIST-STATUS SPECIAL-USE LITERAL+")
CAPS_NO_MOVE_NO_UIDPLUS = CAPS_NO_MOVE.replace(" UIDPLUS", "")


def connect(url: str, user: str = "alice", **options) -> ImapConnector:
    """The connector for ``url`` with ``user``'s password and fast retries."""
    options.setdefault("password", Secret(USERS[user]))
    conn = open_source(url, SourceOptions(**options))
    assert isinstance(conn, ImapConnector)
    conn.backoff = 0.05
    return conn


def all_refs(conn, mailbox=None):
    mailbox = mailbox or conn.mailboxes()[0]
    return [r for f in conn.folders(mailbox) for batch in conn.refs(mailbox, f) for r in batch]


def is_infected(raw: bytes) -> bool:
    """Whether a seeded message carries the EICAR attachment (base64 in the raw message)."""
    return b'filename="eicar.com"' in raw


def infected(conn, refs):
    bad = [r for r, raw in conn.fetch(refs) if is_infected(raw)]
    assert bad, "the seeded mailbox holds infected messages"
    return bad


def folder_bodies(server, folder, user="alice"):
    """Raw messages in ``folder``, read directly (EXAMINE), excluding \\Deleted ones."""
    client = server.client(user)
    try:
        client.select_folder(folder, readonly=True)
        uids = client.search(["NOT", "DELETED"])
        return sorted(d[b"BODY[]"] for d in client.fetch(uids, ["BODY.PEEK[]"]).values())
    finally:
        client.logout()


# -- unit tests -------------------------------------------------------------------------


def test_compress_uids_makes_ranges():
    assert compress_uids([1, 2, 3, 5, 7, 8]) == "1:3,5,7:8"
    assert compress_uids([9, 1, 2, 2, 12, 10, 11, 7]) == "1:2,7,9:12"
    assert compress_uids([4]) == "4"
    with pytest.raises(ValueError):
        compress_uids([])


def test_expand_uids_inverts_compress():
    uids = [1, 2, 3, 10, 12, 13, 14, 99]
    assert expand_uids(compress_uids(uids)) == uids
    assert expand_uids("5:3") == [5, 4, 3]


def test_password_only_over_tls_or_to_loopback():
    assert password_allowed("127.0.0.1", tls=False)
    assert password_allowed("::1", tls=False)
    assert not password_allowed("192.0.2.7", tls=False)
    assert password_allowed("192.0.2.7", tls=True)


def test_url_parsing_and_refusals():
    conn = ImapConnector("imaps://bob@mail.example.org/Archive%2F2024", SourceOptions())
    assert (conn.target.implicit_tls, conn.target.user, conn.target.port) == (True, "bob", 993)
    assert conn.folders("bob") == ["Archive/2024"]
    with pytest.raises(UsageError, match="no user"):
        ImapConnector("imap://mail.example.org", SourceOptions())
    with pytest.raises(UsageError, match="password in the source URL"):
        open_source("imap://bob:pw@mail.example.org")
    with pytest.raises(UsageError, match="master login"):
        ImapConnector("imap://admin@h", SourceOptions(extra={"master_user": "admin"}))


def test_library_errors_are_translated_at_one_boundary():
    cases = [
        (imap_exc.LoginError("[AUTHENTICATIONFAILED] failed"), AuthError),
        (imaplib.IMAP4.abort("socket error: EOF"), TransientError),
        (socket.timeout("timed out"), TransientError),
        (ConnectionResetError(104, "reset"), TransientError),
        (ssl.SSLCertVerificationError(1, "bad"), SourceError),
        (imap_exc.IMAPClientError("select failed: NO no such mailbox"), SourceError),
    ]
    for raised, expected in cases:
        with pytest.raises(expected) as info:
            with map_imap_errors("imap://x@h"):
                raise raised
        assert info.value.__cause__ is None and str(info.value).startswith("imap://x@h:")


class _FakeSession:
    """Answers UID FETCH from a script: each call returns the next dict or raises it."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.asked: list[str] = []

    def select(self, folder, readonly=True):
        return 7

    def uid_fetch(self, uid_set, items):
        self.asked.append(uid_set)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def uid_fetch_bodies(self, uid_set):
        answer = self.uid_fetch(uid_set, "(UID BODY.PEEK[])")
        return {uid: d[b"BODY[]"] for uid, d in answer.items() if b"BODY[]" in d}


def test_body_fetch_reads_imaplib_literals_and_skips_unsolicited_responses():
    from types import SimpleNamespace

    from connectors.imap import _Session

    data = [
        (b"1 (UID 11 BODY[] {3}", b"one"), b")",
        b"2 (FLAGS (\\Seen))",  # unsolicited: no body
        (b"3 (BODY[] {3}", b"two"), b" UID 13)",  # UID after the literal
        (b"4 (UID 14 FLAGS (\\Seen) BODY[] {5}", b"three"), b")",
    ]
    imap = SimpleNamespace(uid=lambda *args: ("OK", data))
    session = _Session(SimpleNamespace(_imap=imap), "alice")
    assert session.uid_fetch_bodies("11:14") == {11: b"one", 13: b"two", 14: b"three"}


def _with_session(session) -> ImapConnector:
    conn = ImapConnector("imap://alice@127.0.0.1", SourceOptions(password=Secret("x")))
    conn._session = lambda mailbox: session
    conn.backoff = 0
    return conn


def _ref(uid: int) -> MessageRef:
    return MessageRef("imap://alice@127.0.0.1", "alice", "INBOX", str(uid), f"7:{uid}", 10)


def test_fetch_refetches_uids_an_unsolicited_response_left_out():
    session = _FakeSession([
        {1: {b"BODY[]": b"one"}, 2: {b"FLAGS": (b"\\Seen",)}, 99: {b"FLAGS": ()}},
        {2: {b"BODY[]": b"two"}},
    ])
    got = dict((r.id, v) for r, v in _with_session(session).fetch([_ref(1), _ref(2)]))
    assert got == {"1": b"one", "2": b"two"} and session.asked == ["1:2", "2"]


def test_fetch_gives_up_on_a_uid_that_never_comes():
    session = _FakeSession([{1: {b"BODY[]": b"one"}}, {}])
    got = dict((r.id, v) for r, v in _with_session(session).fetch([_ref(1), _ref(2)]))
    assert got["1"] == b"one" and isinstance(got["2"], FetchError)


def test_fetch_retries_a_dropped_connection_then_reports_the_batch():
    drop = imaplib.IMAP4.abort("socket error: EOF")
    session = _FakeSession([drop, {1: {b"BODY[]": b"one"}, 2: {b"BODY[]": b"two"}}])
    got = dict((r.id, v) for r, v in _with_session(session).fetch([_ref(1), _ref(2)]))
    assert got == {"1": b"one", "2": b"two"}
    session = _FakeSession([drop] * 4)
    got = dict((r.id, v) for r, v in _with_session(session).fetch([_ref(1), _ref(2)]))
    assert all(isinstance(v, FetchError) and "connection lost" in str(v) for v in got.values())
    assert len(session.asked) == 4  # one try and three reconnects


# -- against a real Dovecot -------------------------------------------------------------


def test_enumerates_selectable_folders_with_globs(dovecot):
    seed_mailbox(dovecot)
    with connect(dovecot.url()) as conn:
        assert conn.mailboxes() == ["alice"]
        assert conn.folders("alice") == ["INBOX", "Archive/2024", "Work"]  # Archive: \Noselect
    with connect(dovecot.url(), include=("Archive*", "Work")) as conn:
        assert conn.folders("alice") == ["Archive/2024", "Work"]
    with connect(dovecot.url(), exclude=("Archive/*",)) as conn:
        assert conn.folders("alice") == ["INBOX", "Work"]
    with connect(dovecot.url(folder="Work")) as conn:
        assert conn.folders("alice") == ["Work"]
        assert len(all_refs(conn)) == 3


def test_refs_in_windows_and_fetch_returns_exact_bytes(dovecot):
    seeded = seed_mailbox(dovecot)
    with connect(dovecot.url(), extra={"uid_window": "2"}, batch_count=2) as conn:
        windows = list(conn.refs("alice", "INBOX"))
        assert [len(w) for w in windows] == [2, 2, 2]  # 6 messages, windows of 2 UIDs
        refs = all_refs(conn)
        assert len(refs) == sum(len(v) for v in seeded.values())
        inbox = [r for r in refs if r.folder == "INBOX"]
        uidvalidity = inbox[0].version.split(":")[0]
        assert [r.id for r in inbox] == ["1", "2", "3", "4", "5", "6"]
        assert all(r.version == f"{uidvalidity}:{r.id}" and r.date for r in inbox)
        got = {r.key: raw for r, raw in conn.fetch(refs)}
    assert len(got) == len(refs)
    for r in refs:
        expected = seeded[r.folder][int(r.id) - 1]
        assert got[r.key] == expected and r.size == len(expected)


def test_a_missing_folder_is_a_source_error(dovecot):
    with connect(dovecot.url()) as conn:
        with pytest.raises(SourceError, match="Nope"):
            list(conn.refs("alice", "Nope"))
        assert conn.folders("alice") == ["INBOX"]  # the connection is still usable


def test_scanning_changes_no_flag_and_no_count(dovecot):
    seed_mailbox(dovecot)
    before = mailbox_state(dovecot)
    assert any(b"\\Seen" not in flags for f in before.values() for flags in f.values())
    with connect(dovecot.url(), batch_bytes=1000) as conn:
        refs = all_refs(conn)
        assert all(isinstance(raw, bytes) for _, raw in conn.fetch(refs))
    assert mailbox_state(dovecot) == before


def test_fetch_reports_missing_and_stale_refs(dovecot):
    seed_mailbox(dovecot)
    with connect(dovecot.url()) as conn:
        ref = all_refs(conn)[0]
        uidvalidity = ref.version.split(":")[0]
        gone = ref.__class__(**{**ref.__dict__, "id": "999", "version": f"{uidvalidity}:999"})
        stale = ref.__class__(**{**ref.__dict__, "version": f"{int(uidvalidity) + 1}:1"})
        out = dict((r.version, v) for r, v in conn.fetch([ref, gone, stale]))
    assert isinstance(out[ref.version], bytes)
    assert "not found" in str(out[gone.version])
    assert "UIDVALIDITY" in str(out[stale.version])


def test_quarantine_with_move(dovecot):
    seeded = seed_mailbox(dovecot)
    with connect(dovecot.url()) as conn:
        bad = infected(conn, all_refs(conn))
        results = conn.quarantine(bad, "Quarantine")
        assert all(r.ok and r.new_id for r in results), results
        assert len(all_refs(conn)) == sum(len(v) for v in seeded.values())
    assert folder_bodies(dovecot, "Quarantine") == sorted(
        raw for msgs in seeded.values() for raw in msgs if is_infected(raw))
    assert all(not is_infected(raw) for raw in folder_bodies(dovecot, "INBOX"))


def test_quarantine_with_copy_when_move_is_missing(dovecot_factory):
    server = dovecot_factory(imap_capability=CAPS_NO_MOVE)
    seeded = seed_mailbox(server)
    with connect(server.url()) as conn:
        assert not conn._session("alice").client.has_capability("MOVE")
        bad = infected(conn, all_refs(conn))
        results = conn.quarantine(bad, "Quarantine")
        assert all(r.ok and r.new_id for r in results) and len(results) == len(bad)
    state = mailbox_state(server)
    assert sum(len(v) for v in state.values()) == sum(len(v) for v in seeded.values())
    assert not any(b"\\Deleted" in f for v in state.values() for f in v.values())
    assert folder_bodies(server, "Quarantine") == sorted(
        raw for msgs in seeded.values() for raw in msgs if is_infected(raw))


class _NoCopyUid(ImapConnector):
    """A connector that does not see COPYUID, so it must verify copies by searching."""

    def _copyuid(self, s):
        super()._copyuid(s)
        return {}


def test_copy_verified_by_search_and_not_expunged_without_uidplus(dovecot_factory):
    server = dovecot_factory(imap_capability=CAPS_NO_MOVE_NO_UIDPLUS)
    seed_mailbox(server, layout={"INBOX": 3})
    conn = _NoCopyUid(server.url(), SourceOptions(password=Secret(USERS["alice"])))
    with conn:
        refs = all_refs(conn)
        results = conn.quarantine(refs[:2], "Quarantine")
    assert all(r.ok and "not expunged" in r.detail and r.new_id for r in results)
    state = mailbox_state(server)
    assert [b"\\Deleted" in state["INBOX"][uid] for uid in (1, 2, 3)] == [True, True, False]
    assert len(state["Quarantine"]) == 2


def test_quarantine_leaves_original_when_copy_cannot_be_confirmed(dovecot_factory):
    server = dovecot_factory(imap_capability=CAPS_NO_MOVE)
    seed_mailbox(server, layout={"INBOX": 2})
    conn = _NoCopyUid(server.url(), SourceOptions(password=Secret(USERS["alice"])))
    conn._find_copies = lambda *a: {}  # nothing found in the target
    with conn:
        results = conn.quarantine(all_refs(conn), "Quarantine")
    assert [r.ok for r in results] == [False, False]
    state = mailbox_state(server)
    assert len(state["INBOX"]) == 2 and not any(b"\\Deleted" in f for f in state["INBOX"].values())


def test_tag_sets_keyword_only(dovecot):
    seed_mailbox(dovecot)
    before = mailbox_state(dovecot)
    with connect(dovecot.url(folder="INBOX")) as conn:
        refs = all_refs(conn)
        results = conn.tag(refs[:2], "$Infected")
    assert all(r.ok for r in results)
    after = mailbox_state(dovecot)
    for uid in (1, 2):
        assert set(after["INBOX"][uid]) == set(before["INBOX"][uid]) | {b"$Infected"}
    assert after["INBOX"][3] == before["INBOX"][3]


def test_delete_moves_to_trash_and_hard_delete_expunges(dovecot):
    seeded = seed_mailbox(dovecot)
    with connect(dovecot.url(folder="INBOX")) as conn:
        refs = all_refs(conn)
        soft = conn.delete(refs[:2])
        hard = conn.delete(refs[2:3], hard=True)
        again = conn.delete(refs[2:3], hard=True)
    assert all(r.ok for r in soft + hard)
    assert not again[0].ok and "no longer there" in again[0].detail
    assert folder_bodies(dovecot, "Trash") == sorted(seeded["INBOX"][:2])
    assert folder_bodies(dovecot, "INBOX") == sorted(seeded["INBOX"][3:])


def test_action_on_a_changed_folder_does_nothing(dovecot):
    seed_mailbox(dovecot)
    before = mailbox_state(dovecot)
    with connect(dovecot.url(folder="INBOX")) as conn:
        ref = all_refs(conn)[0]
        stale = ref.__class__(**{**ref.__dict__, "version": "1:1"})
        results = conn.quarantine([stale], "Quarantine") + conn.tag([stale], "$X")
    assert [r.ok for r in results] == [False, False]
    assert "UIDVALIDITY" in results[0].detail
    assert mailbox_state(dovecot) == before


def test_wrong_password_is_auth_error_without_retry_or_leak(dovecot, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-Secret-Value"
    with CuttingProxy("127.0.0.1", dovecot.port) as proxy:
        conn = connect(f"imap://alice@127.0.0.1:{proxy.port}", password=Secret(wrong))
        with pytest.raises(AuthError) as info:
            conn.folders("alice")
        assert proxy.connections == 1
    assert "refused the credentials" in str(info.value)
    assert wrong not in str(info.value) and wrong not in repr(info.value)
    assert wrong not in caplog.text
    # a successful login does not log the password either
    caplog.clear()
    with connect(dovecot.url()) as conn:
        conn.folders("alice")
    assert caplog.text and USERS["alice"] not in caplog.text


def test_tls_verification_needs_ca_file(dovecot_tls):
    seed_mailbox(dovecot_tls)
    with pytest.raises(SourceError, match="certificate not trusted"):
        connect(dovecot_tls.url()).folders("alice")
    with connect(dovecot_tls.url(), ca_file=dovecot_tls.ca_file) as conn:  # STARTTLS
        assert conn.folders("alice") == ["INBOX", "Archive/2024", "Work"]
        assert isinstance(conn._session("alice").client.socket(), ssl.SSLSocket)
    with connect(dovecot_tls.url(implicit_tls=True), ca_file=dovecot_tls.ca_file) as conn:
        assert len(all_refs(conn)) == 13


def test_insecure_skips_verification_with_a_warning(dovecot_tls, caplog):
    with connect(dovecot_tls.url(implicit_tls=True), insecure=True) as conn:
        assert conn.folders("alice") == ["INBOX"]
    assert any(r.levelno == logging.WARNING and r.name == "rescan.imap" for r in caplog.records)


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_no_password_in_clear_to_a_remote_address(dovecot_factory):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = dovecot_factory(address=address)
    with pytest.raises(SourceError, match="refusing to send credentials"):
        connect(server.url()).folders("alice")
    assert "Login:" not in server.log()


def test_connection_cut_during_fetch_is_resumed(dovecot):
    seeded = seed_mailbox(dovecot, layout={"INBOX": 12}, body_size=4000)
    with CuttingProxy("127.0.0.1", dovecot.port) as proxy:
        with connect(f"imap://alice@127.0.0.1:{proxy.port}", batch_count=4) as conn:
            refs = all_refs(conn)
            proxy.cut_after(9000)  # inside the first batch's bodies
            got = {r.id: raw for r, raw in conn.fetch(refs)}
        assert proxy.cuts == 1 and proxy.connections == 2
    assert [got[str(i + 1)] for i in range(12)] == seeded["INBOX"]


def test_server_restart_between_listing_and_fetch(dovecot):
    seeded = seed_mailbox(dovecot)
    with connect(dovecot.url()) as conn:
        refs = all_refs(conn)
        dovecot.restart()
        got = {r.key: raw for r, raw in conn.fetch(refs)}
    assert sorted(got.values()) == sorted(raw for v in seeded.values() for raw in v)


def test_master_login_reaches_several_mailboxes(dovecot):
    seed_mailbox(dovecot, "alice")
    seed_mailbox(dovecot, "bob", layout={"INBOX": 2})
    options = dict(password=Secret(MASTERS["admin"]), mailboxes=("alice", "bob"),
                   extra={"master_user": "admin"})
    with connect(dovecot.url("admin"), **options) as conn:
        assert conn.mailboxes() == ["alice", "bob"]
        assert len(all_refs(conn, "alice")) == 13
        bob = all_refs(conn, "bob")
        assert [r.mailbox for r in bob] == ["bob", "bob"]
        assert all(isinstance(raw, bytes) for _, raw in conn.fetch(bob))


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_oauth2_login(dovecot, auth):
    # the test Dovecot checks the bearer token like a password
    with connect(dovecot.url("carol"), password=None, token=Secret(USERS["carol"]),
                 extra={"auth": auth}) as conn:
        assert conn.folders("carol") == ["INBOX"]


def test_one_connection_per_thread(dovecot):
    seed_mailbox(dovecot)
    with connect(dovecot.url(), connections=2) as conn:
        assert conn.max_connections == 2
        refs = all_refs(conn)
        results: list = []
        threads = [threading.Thread(target=lambda: results.extend(conn.fetch(refs)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(conn._sessions) == 3  # the main thread's and one per worker thread
        assert len(results) == 2 * len(refs) and all(isinstance(v, bytes) for _, v in results)


def test_listing_reads_plain_lines_fast_and_odd_ones_through_the_parser():
    from types import SimpleNamespace

    from connectors.imap import _Session

    data = [
        b'1 (UID 5 RFC822.SIZE 1234 INTERNALDATE "17-Jul-1996 02:44:25 -0700")',
        b'2 (RFC822.SIZE 99 UID 6 INTERNALDATE " 7-Jul-1996 02:44:25 +0000")',  # other order
        b"3 (FLAGS (\\Seen))",  # unsolicited, no UID
    ]
    imap = SimpleNamespace(uid=lambda *args: ("OK", data))
    found = _Session(SimpleNamespace(_imap=imap), "alice").uid_fetch_listing("5:6")
    assert found[5][b"RFC822.SIZE"] == 1234 and found[6][b"RFC822.SIZE"] == 99
    assert found[5][b"INTERNALDATE"].isoformat() == "1996-07-17T02:44:25-07:00"
    assert b"RFC822.SIZE" not in found.get(3, {})


def test_no_protocol_trace_even_at_debug_level(dovecot, caplog):
    # imapclient would have imaplib trace every line to a logger: a LOGIN line with the
    # password, every message body formatted and dropped. The connector turns it off.
    seed_mailbox(dovecot)
    caplog.set_level(logging.DEBUG)
    with connect(dovecot.url()) as conn:
        refs = all_refs(conn)
        assert len(dict(conn.fetch(refs))) == len(refs) > 0
    assert USERS["alice"] not in caplog.text
    assert "BODY[]" not in caplog.text and "EICAR" not in caplog.text


def test_internaldate_parsing():
    from connectors.imap import _internaldate

    tz = datetime.timezone
    assert _internaldate(b"17-Jul-1996 02:44:25 -0700") == datetime.datetime(
        1996, 7, 17, 2, 44, 25, tzinfo=tz(-datetime.timedelta(hours=7)))
    assert _internaldate(b" 1-jan-2024 00:00:00 +0530") == datetime.datetime(
        2024, 1, 1, tzinfo=tz(datetime.timedelta(hours=5, minutes=30)))
    for bad in (b"31-Feb-2024 00:00:00 +0000", b"17-Jux-1996 02:44:25 -0700", b"", b"17-Jul-1996"):
        assert _internaldate(bad) is None, bad
