"""The scan command end to end, as a subprocess: reports, exit codes, store formats."""

from __future__ import annotations

import json
import mailbox
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mailgen import EICAR, infected_store, make_maildir, message

ROOT = Path(__file__).resolve().parent.parent


def rescan(*args, env=None, cwd=ROOT, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "rescan", *map(str, args)],
        cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESCAN_CACHE_DIR", str(tmp_path / "cache"))


def test_example_store_finds_the_three_infected_messages():
    r = rescan("scan", "examples/maildir", "--format", "json", "--quiet")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    msgs = rep["messages"]
    assert sorted(m["message_id"] for m in msgs) == ["<example-3@rescan.example>", "<example-4@rescan.example>", "<example-6@rescan.example>"]
    parts = sorted(f["part"] for m in msgs for f in m["findings"] if f["rule"] == "EICAR_Test_File")
    assert parts == ["2/invoice.com", "2/message.eml/2/advice.com", "2/photo.jpg/scan_0042.exe"]
    s = rep["run"]["summary"]
    assert (s["messages_seen"], s["messages_scanned"], s["infected"], s["errors"]) == (6, 6, 3, 0)
    assert all(m["new"] and m["status"] == "infected" for m in msgs)
    assert rep["run"]["definitions"]["rule_files"][0]["name"] == "eicar.yar"


def test_text_report_is_clamscan_like():
    r = rescan("scan", "examples/maildir", "--quiet")
    assert r.returncode == 1
    assert "EICAR_Test_File (eicar.yar) in 2/invoice.com FOUND" in r.stdout
    assert "----------- SCAN SUMMARY -----------" in r.stdout
    assert "Infected messages: 3 (3 new)" in r.stdout
    assert "Folders: 2" in r.stdout


def test_several_thousand_messages_list_exactly_the_infected(tmp_path):
    infected = {5, 777, 1500, 2222, 2999}
    store = infected_store(tmp_path / "md", 3000, infected)
    out = tmp_path / "report.json"
    r = rescan("scan", f"maildir:{store}", "--format", "json", "--output", out, "--quiet")
    assert r.returncode == 1, r.stderr
    rep = json.loads(out.read_text())
    assert sorted(m["message_id"] for m in rep["messages"]) == sorted(f"<m{n}@test.example>" for n in infected)
    assert rep["run"]["summary"]["messages_scanned"] == 3000
    assert {m["folder"] for m in rep["messages"]} == {"INBOX", "Archive"}


def test_clean_store_exits_0(tmp_path):
    store = make_maildir(tmp_path / "md", {f"/{n}.M1P1.x": message(n) for n in range(20)})
    r = rescan("scan", store, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Infected messages: 0" in r.stdout


def test_mbox_and_eml_sources(tmp_path):
    mb = mailbox.mbox(tmp_path / "box.mbox")
    for n in range(5):
        mb.add(message(n, attachments=[("x.com", EICAR)] if n == 3 else []))
    mb.flush()
    r = rescan("scan", f"mbox:{tmp_path / 'box.mbox'}", "--format", "json", "-q")
    assert r.returncode == 1
    assert [m["message_id"] for m in json.loads(r.stdout)["messages"]] == ["<m3@test.example>"]
    (tmp_path / "eml" / "sub").mkdir(parents=True)
    (tmp_path / "eml" / "a.eml").write_bytes(message(1))
    (tmp_path / "eml" / "sub" / "b.eml").write_bytes(message(2, attachments=[("y.com", EICAR)]))
    r = rescan("scan", tmp_path / "eml", "--format", "json", "-q")
    assert r.returncode == 1
    assert [m["folder"] for m in json.loads(r.stdout)["messages"]] == ["sub"]


def test_missing_store_is_one_line_exit_2(tmp_path):
    r = rescan("scan", f"maildir:{tmp_path / 'nope'}")
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr
    assert "Traceback" not in r.stderr


def test_broken_rule_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "ok.yar").write_text("rule ok { condition: true }\n")
    (tmp_path / "rules" / "broken.yar").write_text("rule a {\n condition: nonsense\n}\n")
    r = rescan("scan", "examples/maildir", "--rules", tmp_path / "rules")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.yar(2)" in lines[0]


def test_bad_arguments_exit_2():
    assert rescan("scan").returncode == 2
    assert rescan("scan", "examples/maildir", "--format", "xml").returncode == 2
    assert rescan("scan", "examples/maildir", "--action", "explode").returncode == 2
    r = rescan("scan", "imap://alice:secret@127.0.0.1/")
    assert r.returncode == 2 and "secret" not in r.stderr + r.stdout


def test_oversize_message_is_skipped_not_clean(tmp_path):
    store = make_maildir(tmp_path / "md", {"/big.M1P1.x": message(1, body="x" * 5000), "/small.M2P1.x": message(2)})
    r = rescan("scan", store, "--max-message-size", "2000", "--format", "json", "-q")
    assert r.returncode == 2
    msgs = json.loads(r.stdout)["messages"]
    assert [(m["id"], m["status"], m["problems"][0]["code"]) for m in msgs] == [("big.M1P1.x", "skipped", "too-large")]


def test_partial_message_exits_2_and_names_the_limit(tmp_path):
    store = make_maildir(tmp_path / "md", {"/a.M1P1.x": message(1, attachments=[(f"f{i}.txt", b"data %d" % i) for i in range(8)])})
    r = rescan("scan", store, "--max-files", "3", "--format", "json", "-q")
    assert r.returncode == 2
    (m,) = json.loads(r.stdout)["messages"]
    assert m["status"] == "partial"
    assert any(p["code"] == "limit:max-files" for p in m["problems"])


def test_cpython_malformed_mail_never_stops_the_run(tmp_path):
    import test.test_email as t

    data = Path(t.__file__).parent / "data"
    files = sorted(data.glob("msg_*.txt"))
    assert len(files) > 40
    store = make_maildir(tmp_path / "md", {f"/{f.stem}.M1P1.x": f.read_bytes() for f in files})
    r = rescan("scan", store, "--format", "json", "-q")
    rep = json.loads(r.stdout)
    s = rep["run"]["summary"]
    assert s["messages_seen"] == len(files)
    assert s["errors"] == 0
    assert s["messages_scanned"] == len(files)
    # whatever is not clean says why
    assert all(m["problems"] or m["findings"] for m in rep["messages"])


def test_json_report_is_deterministic(tmp_path):
    store = infected_store(tmp_path / "md", 60, {3, 10, 31, 50})
    runs = []
    for _ in range(2):
        r = rescan("scan", store, "--format", "json", "-q")
        rep = json.loads(r.stdout)
        for k in ("start", "end", "duration_seconds"):
            rep["run"].pop(k)
        runs.append(rep)
    assert runs[0] == runs[1]


def test_base64_encoded_forwarded_message_is_opened(tmp_path):
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = "Fwd"
    msg.set_content("see attached")
    # bytes given for message/rfc822 are sent base64-encoded, as some mailers do
    msg.add_attachment(message(9, attachments=[("advice.com", EICAR)]), maintype="message", subtype="rfc822")
    assert b"Content-Transfer-Encoding: base64" in msg.as_bytes()
    store = make_maildir(tmp_path / "md", {"/fwd.M1P1.x": msg.as_bytes()})
    r = rescan("scan", store, "--format", "json", "-q")
    assert r.returncode == 1, r.stdout
    (m,) = json.loads(r.stdout)["messages"]
    assert [f["part"] for f in m["findings"]] == ["2/message.eml/2/advice.com"]
