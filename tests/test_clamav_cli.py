"""ClamAV through clamd as an engine of the scan command, next to YARA or alone."""

from __future__ import annotations

import io
import json

import pyzipper

from tests.mailgen import EICAR, infected_store, make_maildir, message
from tests.servers.clamd import clamd_server  # noqa: F401
from tests.test_cli import cache, rescan  # noqa: F401


def test_clamd_alone_finds_the_infected_messages(tmp_path, clamd_server):
    store = infected_store(tmp_path / "md", 40, {4, 13, 20})
    r = rescan("scan", f"maildir:{store}", "--clamd", clamd_server.unix_address, "--format", "json", "-q")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert sorted(m["message_id"] for m in rep["messages"]) == ["<m13@test.example>", "<m20@test.example>", "<m4@test.example>"]
    assert {f["engine"] for m in rep["messages"] for f in m["findings"]} == {"clamav"}
    assert [f["name"] for f in rep["run"]["definitions"]["rule_files"]] == ["clamav"]


def test_clamd_and_yara_together_over_tcp(tmp_path, clamd_server):
    store = infected_store(tmp_path / "md", 6, {0})
    r = rescan("scan", store, "--clamd", clamd_server.tcp_address, "--rules", "rescan/rules", "--format", "json", "-q")
    assert r.returncode == 1, r.stderr
    (m,) = json.loads(r.stdout)["messages"]
    assert {f["engine"] for f in m["findings"]} == {"clamav", "yara"}


def test_member_of_password_protected_zip_goes_to_clamd_as_a_part(tmp_path, clamd_server):
    buf = io.BytesIO()
    with pyzipper.AESZipFile(buf, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as z:
        z.setpassword(b"s3cret")
        z.writestr("payload.com", EICAR)
    raw = message(1, body="The password is s3cret\n", attachments=[("report.zip", buf.getvalue())])
    store = make_maildir(tmp_path / "md", {"/enc.M1P1.x": raw})
    r = rescan("scan", store, "--clamd", clamd_server.unix_address, "--format", "json", "-q")
    (m,) = json.loads(r.stdout)["messages"]
    clam = [f for f in m["findings"] if f["engine"] == "clamav"]
    assert [f["part"] for f in clam] == ["2/report.zip/payload.com"]


def test_unreachable_clamd_is_one_line_exit_2(tmp_path):
    r = rescan("scan", "examples/maildir", "--clamd", f"unix:{tmp_path / 'none.sock'}")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "unreachable" in r.stderr
