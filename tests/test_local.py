"""Local stores: Maildir (with Maildir++ subfolders), mbox (mboxo, mboxrd, CRLF), .eml trees,
bare-path detection, and that scanning leaves every store untouched."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import time
from pathlib import Path

import pytest

import connectors.local as local
from connectors.base import SourceOptions, open_source
from rescan.errors import ActionError, FetchError, SourceError, UsageError


def message(n: int, body: bytes = b"", eol: bytes = b"\n") -> bytes:
    lines = [
        b"From: sender%d@example.org" % n,
        b"To: rcpt@example.org",
        b"Subject: message %d" % n,
        b"Message-ID: <%d@example.org>" % n,
        b"",
        b"Body of message %d." % n,
    ]
    return eol.join(lines) + eol + body


def all_refs(conn, folder=None):
    (mailbox,) = conn.mailboxes()
    folders = [folder] if folder else conn.folders(mailbox)
    return [r for f in folders for batch in conn.refs(mailbox, f) for r in batch]


def fetch_all(conn, refs):
    return {r.id: data for r, data in conn.fetch(refs)}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every name under ``root`` with its bytes' hash, size and mtime (dirs: mtime only)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(root))] = (content, st.st_size if content else 0, st.st_mtime_ns)
    return out


# --- Maildir ------------------------------------------------------------------------------


def make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True)
    return path


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    root = make_maildir(tmp_path / "alice")
    (root / "new" / "1700000001.M1P1.host").write_bytes(message(1))
    (root / "cur" / "1700000002.M2P1.host:2,S").write_bytes(message(2, b"longer body\n"))
    (root / "tmp" / "1700000003.M3P1.host").write_bytes(message(3))  # being delivered
    (root / "dovecot-uidlist").write_bytes(b"3 V1 N4\n")
    for name, n in ((".Archive", 10), (".Archive.2024", 20), (".Junk", 30)):
        sub = make_maildir(root / name)
        (sub / "maildirfolder").write_bytes(b"")
        (sub / "cur" / f"17000000{n}.M{n}P1.host:2,").write_bytes(message(n))
    (root / ".notafolder").mkdir()  # a hidden directory without cur/new is not a folder
    return root


def test_maildir_folders_include_hidden_maildirplusplus_subfolders(maildir):
    with open_source(f"maildir:{maildir}") as conn:
        assert conn.mailboxes() == ["alice"]
        assert conn.folders("alice") == ["INBOX", "Archive", "Archive.2024", "Junk"]


def test_maildir_folder_globs(maildir):
    opts = SourceOptions(include=("Archive*", "INBOX"), exclude=("*.2024",))
    with open_source(f"maildir:{maildir}", opts) as conn:
        assert conn.folders("alice") == ["INBOX", "Archive"]
        with pytest.raises(SourceError):
            list(conn.refs("alice", "Junk"))


def test_maildir_refs_from_new_and_cur_not_tmp(maildir):
    with open_source(f"maildir:{maildir}") as conn:
        refs = all_refs(conn, "INBOX")
        assert [r.id for r in refs] == ["1700000001.M1P1.host", "1700000002.M2P1.host"]
        assert [r.size for r in refs] == [len(message(1)), len(message(2, b"longer body\n"))]
        assert refs[1].version == f"1700000002.M2P1.host/{refs[1].size}"
        assert all(r.folder == "INBOX" and r.mailbox == "alice" for r in refs)
        assert fetch_all(conn, refs) == {
            "1700000001.M1P1.host": message(1),
            "1700000002.M2P1.host": message(2, b"longer body\n"),
        }
        (archived,) = all_refs(conn, "Archive.2024")
        assert archived.id == "1700000020.M20P1.host"
        assert fetch_all(conn, [archived]) == {archived.id: message(20)}


def test_maildir_flag_change_and_move_keep_version_and_fetch_follows(maildir):
    with open_source(f"maildir:{maildir}") as conn:
        before = {r.id: r.version for r in all_refs(conn, "INBOX")}
        refs = all_refs(conn, "INBOX")
        # A mail client reads both messages: new/ -> cur/ and flags change.
        os.rename(maildir / "new" / "1700000001.M1P1.host",
                  maildir / "cur" / "1700000001.M1P1.host:2,S")
        os.rename(maildir / "cur" / "1700000002.M2P1.host:2,S",
                  maildir / "cur" / "1700000002.M2P1.host:2,RS")
        got = fetch_all(conn, refs)  # refs from before the change
        assert got["1700000001.M1P1.host"] == message(1)
        assert got["1700000002.M2P1.host"] == message(2, b"longer body\n")
        assert {r.id: r.version for r in all_refs(conn, "INBOX")} == before
    with open_source(f"maildir:{maildir}") as fresh:  # a new connector has no listing yet
        assert fetch_all(fresh, refs) == got


def test_maildir_content_size_change_changes_version(maildir):
    with open_source(f"maildir:{maildir}") as conn:
        old = {r.id: r.version for r in all_refs(conn, "INBOX")}
        (maildir / "new" / "1700000001.M1P1.host").write_bytes(message(1, b"appended\n"))
        new = {r.id: r.version for r in all_refs(conn, "INBOX")}
        assert new["1700000001.M1P1.host"] != old["1700000001.M1P1.host"]
        assert new["1700000002.M2P1.host"] == old["1700000002.M2P1.host"]


@pytest.fixture
def settled(monkeypatch):
    """Folders count as settled at once (the two-second wait is tested on its own); each
    change waits past the file system's timestamp tick so that it moves the times."""
    monkeypatch.setattr(local, "CURSOR_SETTLE_NS", 0)
    return lambda: time.sleep(0.05)


def test_maildir_cursor_sees_deliveries_renames_and_removals(maildir, settled):
    inbox = maildir / "cur"
    changes = [
        lambda: (maildir / "new" / "1700000009.M9P1.host").write_bytes(message(9)),  # delivered
        lambda: os.rename(maildir / "new" / "1700000001.M1P1.host",
                          inbox / "1700000001.M1P1.host:2,S"),  # read by a client
        lambda: os.rename(inbox / "1700000002.M2P1.host:2,S", inbox / "1700000002.M2P1.host:2,RS"),
        lambda: (inbox / "1700000001.M1P1.host:2,S").unlink(),  # expunged
    ]
    with open_source(f"maildir:{maildir}") as conn:
        assert conn.cursor("alice", "INBOX") is None  # nothing listed yet
        all_refs(conn, "INBOX")
        cursor = conn.cursor("alice", "INBOX")
        assert cursor is not None and conn.cursor("alice", "Junk") is None
        for change in changes:
            same = conn.changes("alice", "INBOX", cursor)
            assert (list(same.refs), same.gone, same.cursor) == ([], (), cursor)
            settled()
            change()
            assert conn.changes("alice", "INBOX", cursor) is None  # list it whole
            settled()
            all_refs(conn, "INBOX")
            assert conn.cursor("alice", "INBOX") != cursor
            cursor = conn.cursor("alice", "INBOX")
        with pytest.raises(SourceError):
            conn.changes("alice", "Nope", cursor)


def test_maildir_cursor_is_per_folder(maildir, settled):
    with open_source(f"maildir:{maildir}") as conn:
        all_refs(conn)
        cursors = {f: conn.cursor("alice", f) for f in ("INBOX", "Archive", "Junk")}
        settled()
        (maildir / ".Junk" / "new" / "1700000031.M31P1.host").write_bytes(message(31))
        assert conn.changes("alice", "Junk", cursors["Junk"]) is None
        assert conn.changes("alice", "Archive", cursors["Archive"]) is not None
        assert conn.changes("alice", "INBOX", cursors["INBOX"]) is not None


def test_a_folder_changed_in_the_last_seconds_gets_no_cursor(maildir, tmp_path):
    # A message delivered in the same timestamp tick as the listing would leave the times as
    # they were: a folder this fresh is listed whole next time.
    (maildir / "new" / "1700000009.M9P1.host").write_bytes(message(9))  # delivered just now
    with open_source(f"maildir:{maildir}") as conn:
        all_refs(conn)
        assert conn.cursor("alice", "INBOX") is None
        box = tmp_path / "box"
        box.write_bytes(MBOXRD)
    with open_source(f"mbox:{box}") as conn:
        all_refs(conn)
        assert conn.cursor("box", "box") is None


def test_mbox_cursor_sees_appends_and_rewrites(tmp_path, settled):
    path = tmp_path / "box"
    path.write_bytes(MBOXRD)
    with open_source(f"mbox:{path}") as conn:
        all_refs(conn)
        cursor = conn.cursor("box", "box")
        assert cursor is not None and list(conn.changes("box", "box", cursor).refs) == []
        settled()
        with path.open("ab") as f:
            f.write(b"From x@y Sat Jan  1 00:00:00 2000\n" + message(7) + b"\n")
        assert conn.changes("box", "box", cursor) is None
        settled()
        all_refs(conn)
        cursor = conn.cursor("box", "box")
        settled()
        path.write_bytes(MBOXRD)  # same bytes again, written anew: the times tell
        assert conn.changes("box", "box", cursor) is None


def test_eml_trees_have_no_cursor(eml_tree, settled):
    with open_source(f"eml:{eml_tree}") as conn:
        all_refs(conn)
        (mailbox,) = conn.mailboxes()
        assert all(conn.cursor(mailbox, f) is None for f in conn.folders(mailbox))


def test_maildir_vanished_message_is_a_fetch_error_for_that_ref_only(maildir):
    with open_source(f"maildir:{maildir}") as conn:
        refs = all_refs(conn, "INBOX")
        (maildir / "new" / "1700000001.M1P1.host").unlink()
        got = fetch_all(conn, refs)
        assert isinstance(got["1700000001.M1P1.host"], FetchError)
        assert got["1700000002.M2P1.host"] == message(2, b"longer body\n")


def test_maildir_batches_are_bounded_and_sorted(tmp_path):
    root = make_maildir(tmp_path / "m")
    names = [f"17000{i:05d}.M{i}P9.host" for i in range(23)]
    for i, name in enumerate(reversed(names)):
        sub = "new" if i % 2 else "cur"
        suffix = "" if sub == "new" else ":2,S"
        (root / sub / (name + suffix)).write_bytes(message(i))
    (root / "cur" / ".hidden-by-a-tool").write_bytes(b"not a message")
    with open_source(f"maildir:{root}", SourceOptions(batch_count=5)) as conn:
        batches = list(conn.refs("m", "INBOX"))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [r.id for b in batches for r in b] == names


@pytest.mark.parametrize("kind", ["maildir", "eml"])
def test_enumeration_only_stats_files(kind, maildir, eml_tree, monkeypatch):
    source = f"maildir:{maildir}" if kind == "maildir" else f"eml:{eml_tree}"
    with open_source(source) as conn:
        def refuse(path):
            raise AssertionError(f"enumeration opened {path}")

        monkeypatch.setattr(local, "_open_readonly", refuse)
        assert len(all_refs(conn)) >= 4


# --- mbox ---------------------------------------------------------------------------------

MBOXRD = (
    b"From alice@example.org Mon Jan  1 00:00:00 2024\n"
    b"Subject: one\n"
    b"\n"
    b">From the start\n"
    b">>From quoted\n"
    b"From inside a paragraph is not a separator\n"
    b"\n"
    b"From bob@example.org Tue Jan  2 00:00:00 2024\n"
    b"Subject: two\n"
    b"\n"
    b"last line\n"
    b"\n"
)


@pytest.fixture(params=["default-blocks", "tiny-blocks"])
def block_size(request, monkeypatch):
    """Run with the normal read size and with one so small that lines span reads."""
    if request.param == "tiny-blocks":
        monkeypatch.setattr(local, "_MBOX_CHUNK", 16)


def test_mboxrd_unescapes_one_level_and_strips_separators(tmp_path, block_size):
    path = tmp_path / "inbox.mbox"
    path.write_bytes(MBOXRD)
    with open_source(f"mbox:{path}") as conn:
        assert conn.mailboxes() == ["inbox.mbox"]
        assert conn.folders("inbox.mbox") == ["inbox.mbox"]
        refs = all_refs(conn)
        assert [r.id for r in refs] == ["0", str(MBOXRD.index(b"From bob"))]
        got = fetch_all(conn, refs)
    first = (b"Subject: one\n\nFrom the start\n>From quoted\n"
             b"From inside a paragraph is not a separator\n")
    assert got == {"0": first, refs[1].id: b"Subject: two\n\nlast line\n"}
    assert refs[0].size == len(first)
    assert refs[0].version == hashlib.sha256(first).hexdigest()


def test_mboxo_unescapes_only_single_gt(tmp_path, block_size):
    path = tmp_path / "old"
    path.write_bytes(MBOXRD)
    with open_source(f"mbox:{path}", SourceOptions(extra={"mbox_format": "mboxo"})) as conn:
        refs = all_refs(conn)
        got = fetch_all(conn, refs)
    assert got["0"] == (b"Subject: one\n\nFrom the start\n>>From quoted\n"
                        b"From inside a paragraph is not a separator\n")
    assert refs[0].size == len(got["0"])


def test_mbox_unknown_format_is_a_usage_error(tmp_path):
    path = tmp_path / "box"
    path.write_bytes(MBOXRD)
    with pytest.raises(UsageError, match="mbox_format"):
        open_source(f"mbox:{path}", SourceOptions(extra={"mbox_format": "mboxcl2"}))


def test_mbox_crlf(tmp_path, block_size):
    path = tmp_path / "crlf.mbox"
    msgs = [message(i, b">From escaped\r\n", eol=b"\r\n") for i in range(3)]
    path.write_bytes(b"".join(b"From x@y Sat Jan  1 00:00:00 2000\r\n" + m + b"\r\n" for m in msgs))
    with open_source(f"mbox:{path}") as conn:
        refs = all_refs(conn)
        got = [data for _, data in conn.fetch(refs)]
    expected = [m.replace(b">From", b"From") for m in msgs]
    assert sorted(got) == sorted(expected)
    assert [r.size for r in refs] == [len(m) for m in expected]


class ReadRecorder:
    """A file wrapper recording the largest single read, to prove the mbox is streamed."""

    largest = 0

    def __init__(self, f):
        self.f = f

    def _note(self, data):
        ReadRecorder.largest = max(ReadRecorder.largest, len(data))
        return data

    def read(self, *a):
        return self._note(self.f.read(*a))

    def readline(self, *a):
        return self._note(self.f.readline(*a))

    def seek(self, *a):
        return self.f.seek(*a)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_large_mbox_is_streamed_and_fetch_returns_exact_bytes(tmp_path, monkeypatch):
    path = tmp_path / "big.mbox"
    msgs = [message(i, (b"x" * 70 + b"\n") * (i % 40)) for i in range(3000)]
    offsets = []
    with open(path, "wb") as f:
        for m in msgs:
            offsets.append(f.tell())
            f.write(b"From someone Thu Jan  1 00:00:00 1970\n" + m + b"\n")
    assert path.stat().st_size > 8 * local._MBOX_CHUNK
    real_open = local._open_readonly
    monkeypatch.setattr(local, "_open_readonly", lambda p: ReadRecorder(real_open(p)))
    ReadRecorder.largest = 0
    with open_source(f"mbox:{path}", SourceOptions(batch_count=1000)) as conn:
        batches = list(conn.refs(*[conn.mailboxes()[0]] * 2))
        assert [len(b) for b in batches] == [1000, 1000, 1000]
        refs = [r for b in batches for r in b]
        assert [int(r.id) for r in refs] == offsets
        assert [(r.version, r.size) for r in refs] == [
            (hashlib.sha256(m).hexdigest(), len(m)) for m in msgs
        ]
        picked = [refs[0], refs[1234], refs[2999]]
        got = fetch_all(conn, picked)
    assert got == {str(offsets[i]): msgs[i] for i in (0, 1234, 2999)}
    assert ReadRecorder.largest <= local._MBOX_CHUNK


def test_mbox_with_a_line_longer_than_a_read_chunk(tmp_path, block_size):
    path = tmp_path / "long"
    body = b"A" * (3 * local._MBOX_CHUNK + 17) + b"\n>From x\n"
    path.write_bytes(b"From a\n" + message(1, body) + b"\nFrom b\n" + message(2))
    with open_source(f"mbox:{path}") as conn:
        refs = all_refs(conn)
        got = [d for _, d in conn.fetch(refs)]
    assert got == [message(1, body.replace(b">From", b"From")), message(2)]


def test_rewritten_mbox_is_detected(tmp_path, block_size):
    path = tmp_path / "box"
    path.write_bytes(MBOXRD)
    with open_source(f"mbox:{path}") as conn:
        refs = all_refs(conn)
        path.write_bytes(MBOXRD.replace(b"Subject: one", b"Subject: 1"))  # message 2 moves
        got = fetch_all(conn, refs)
        assert all(isinstance(v, FetchError) for v in got.values())
        new = all_refs(conn)
    assert new[0].version != refs[0].version


def test_mbox_not_starting_with_from_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello\n")
    with pytest.raises(SourceError, match="notes.txt"):
        open_source(f"mbox:{path}")


# --- .eml trees ---------------------------------------------------------------------------


@pytest.fixture
def eml_tree(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    (root / "projects" / "2024").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.eml").write_bytes(message(1))
    (root / "B.EML").write_bytes(message(2))
    (root / "readme.txt").write_bytes(b"not a message")
    (root / "projects" / "c.eml").write_bytes(message(3))
    (root / "projects" / "2024" / "d.eml").write_bytes(message(4))
    return root


def test_eml_tree(eml_tree):
    with open_source(f"eml:{eml_tree}", SourceOptions(batch_count=1)) as conn:
        assert conn.mailboxes() == ["export"]
        assert conn.folders("export") == ["INBOX", "projects", "projects/2024"]
        refs = all_refs(conn)
        assert [(r.folder, r.id) for r in refs] == [
            ("INBOX", "B.EML"), ("INBOX", "a.eml"),
            ("projects", "projects/c.eml"), ("projects/2024", "projects/2024/d.eml"),
        ]
        st = (eml_tree / "a.eml").stat()
        assert refs[1].version == f"{st.st_size}:{st.st_mtime_ns}"
        assert refs[1].size == st.st_size
        assert fetch_all(conn, refs) == {
            "B.EML": message(2), "a.eml": message(1),
            "projects/c.eml": message(3), "projects/2024/d.eml": message(4),
        }
        (eml_tree / "a.eml").unlink()
        got = fetch_all(conn, refs)
        assert isinstance(got["a.eml"], FetchError)
        assert got["B.EML"] == message(2)


def test_eml_globs_and_escaping_ids(eml_tree):
    with open_source(f"eml:{eml_tree}", SourceOptions(exclude=("projects*",))) as conn:
        assert conn.folders("export") == ["INBOX"]
        (ref,) = [r for r in all_refs(conn) if r.id == "a.eml"]
        outside = type(ref)(ref.source, ref.mailbox, ref.folder, "../x.eml", ref.version)
        ((_, err),) = conn.fetch([outside])
        assert isinstance(err, FetchError)


def test_single_eml_file(eml_tree):
    with open_source(f"eml:{eml_tree / 'projects' / 'c.eml'}") as conn:
        assert conn.mailboxes() == ["c.eml"]
        assert conn.folders("c.eml") == ["INBOX"]
        refs = all_refs(conn)
        assert [r.id for r in refs] == ["c.eml"]
        assert fetch_all(conn, refs) == {"c.eml": message(3)}


# --- detection, errors, read-only ---------------------------------------------------------


def test_bare_paths_are_detected(maildir, eml_tree, tmp_path):
    mbox = tmp_path / "box"
    mbox.write_bytes(MBOXRD)
    single = tmp_path / "one.msg"
    single.write_bytes(message(9))
    assert isinstance(open_source(str(maildir)), local.MaildirConnector)
    assert isinstance(open_source(str(eml_tree)), local.EmlConnector)
    assert isinstance(open_source(str(mbox)), local.MboxConnector)
    conn = open_source(str(single))
    assert isinstance(conn, local.EmlConnector)
    assert fetch_all(conn, all_refs(conn)) == {"one.msg": message(9)}


@pytest.mark.parametrize("scheme", ["", "maildir:", "mbox:", "eml:"])
def test_missing_path_is_a_source_error_naming_it(scheme, tmp_path):
    missing = tmp_path / "no-such-store"
    with pytest.raises(SourceError) as info:
        open_source(f"{scheme}{missing}")
    text = str(info.value)
    assert str(missing) in text and "\n" not in text


def test_not_a_store_is_a_source_error(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_bytes(b"hello")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    for path in (tmp_path / "dir", tmp_path / "blob.bin"):
        with pytest.raises(SourceError, match="not a mail store"):
            open_source(str(path))
    with pytest.raises(SourceError, match="not a Maildir"):
        open_source(f"maildir:{tmp_path / 'dir'}")


def test_scanning_changes_nothing(maildir, eml_tree, tmp_path):
    mbox = tmp_path / "box.mbox"
    mbox.write_bytes(MBOXRD)
    before = snapshot(tmp_path)
    for source in (f"maildir:{maildir}", f"eml:{eml_tree}", f"mbox:{mbox}", str(maildir)):
        with open_source(source) as conn:
            refs = all_refs(conn)
            got = fetch_all(conn, refs)
            assert refs and all(isinstance(v, bytes) for v in got.values())
    assert snapshot(tmp_path) == before


def reference_split(raw: bytes, mboxrd: bool) -> list[tuple[int, bytes]]:
    """A plain line-by-line mbox splitter to check the block splitter against."""
    escaped = re.compile(rb">+From " if mboxrd else rb">From ")
    out: list[tuple[int, list[bytes]]] = []
    pos, prev_blank = 0, True
    for line in raw.splitlines(keepends=True):
        if prev_blank and line.startswith(b"From "):
            if out and out[-1][1] and out[-1][1][-1] in (b"\n", b"\r\n"):
                out[-1][1].pop()
            out.append((pos, []))
        elif out:
            out[-1][1].append(line[1:] if escaped.match(line) else line)
        prev_blank = line in (b"\n", b"\r\n")
        pos += len(line)
    if out and out[-1][1] and out[-1][1][-1] in (b"\n", b"\r\n"):
        out[-1][1].pop()
    return [(offset, b"".join(lines)) for offset, lines in out]


@pytest.mark.parametrize("chunk", [8, 13, 32, 100, 4096])
def test_block_splitter_agrees_with_a_line_splitter(chunk, monkeypatch):
    rng = random.Random(chunk)
    pieces = [b"\n", b"\r\n", b"From x\n", b">From y\n", b">>From z\r\n", b"text line\n",
              b"A" * 40 + b"\n", b"From ", b">", b"x", b"\n\n", b"From a b\n"]
    raw = b"From start\n" + b"".join(rng.choice(pieces) for _ in range(3000))
    monkeypatch.setattr(local, "_MBOX_CHUNK", chunk)
    for fmt, mboxrd in (("mboxrd", True), ("mboxo", False)):
        got = list(local.mbox_messages(io.BytesIO(raw), fmt, keep=True))
        assert [(m.offset, m.data) for m in got] == reference_split(raw, mboxrd)
        assert all(m.digest == hashlib.sha256(m.data).hexdigest() for m in got)


# --- Maildir actions ----------------------------------------------------------------------


def test_maildir_quarantine_copies_verifies_then_removes(maildir):
    with open_source(f"maildir:{maildir}") as conn:
        refs = all_refs(conn, "INBOX")
        results = conn.quarantine(refs[:1], "Quarantine")
        assert [(r.ok, r.new_id) for r in results] == [(True, refs[0].id)]
        assert not (maildir / "new" / refs[0].id).exists()
        assert (maildir / ".Quarantine" / "maildirfolder").exists()
        assert "Quarantine" in conn.folders("alice")
        (moved,) = all_refs(conn, "Quarantine")
        assert moved.id == refs[0].id and moved.version == refs[0].version
        assert fetch_all(conn, [moved]) == {moved.id: message(1)}
        assert not list((maildir / ".Quarantine" / "tmp").iterdir())
        assert [r.id for r in all_refs(conn, "INBOX")] == [refs[1].id]


@pytest.mark.parametrize("failure", ["link", "verify"])
def test_maildir_quarantine_failure_keeps_the_original(failure, maildir, monkeypatch):
    with open_source(f"maildir:{maildir}") as conn:
        refs = all_refs(conn, "INBOX")
        if failure == "link":
            def refuse(*a):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(local.os, "link", refuse)
        else:
            real = local._write_synced
            monkeypatch.setattr(local, "_write_synced", lambda p, d: real(p, d[:-1]))
        results = conn.quarantine(refs, "Quarantine")
        assert [r.ok for r in results] == [False, False]
        assert all("original kept" in r.detail for r in results)
        monkeypatch.undo()
        assert fetch_all(conn, all_refs(conn, "INBOX")) == fetch_all(conn, refs)
        assert len(fetch_all(conn, refs)) == 2
        assert not list((maildir / ".Quarantine" / "cur").iterdir())
        assert not list((maildir / ".Quarantine" / "tmp").iterdir())


def test_maildir_delete_soft_and_hard(maildir):
    with open_source(f"maildir:{maildir}") as conn:
        first, second = all_refs(conn, "INBOX")
        assert [r.ok for r in conn.delete([first])] == [True]
        assert [r.id for r in all_refs(conn, "Trash")] == [first.id]
        assert [r.ok for r in conn.delete([second], hard=True)] == [True]
        assert all_refs(conn, "INBOX") == []
        assert [r.ok for r in conn.delete([second], hard=True)] == [False]
        with pytest.raises(ActionError):
            conn.quarantine([first], "../elsewhere")


def test_other_local_stores_cannot_act(eml_tree):
    with open_source(f"eml:{eml_tree}") as conn:
        with pytest.raises(ActionError):
            conn.quarantine(all_refs(conn), "Quarantine")
