"""The ClamAV engine against a real clamd (tests/servers/clamd.py), plus address parsing and
the reply handling against a scripted socket peer."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import pickle
import socket
import struct
import threading
from concurrent.futures import ProcessPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pyzipper
import pytest

from rescan.engines.clamav import ClamdEngine, ClamdSpec
from rescan.engines.clamd import ClamdAddress
from rescan.errors import DefinitionsError, UsageError
from rescan.models import Finding, Part, Status, Verdict
from tests.mailgen import zipped
from tests.servers.clamd import EICAR, EICAR_SIGNATURE, ClamdServer, start_clamd
from tests.servers.clamd import clamd_server  # noqa: F401

pytestmark = pytest.mark.server


def message(*attachments: tuple[bytes, str, str]) -> bytes:
    """A raw message with a text body and (data, content type, filename) attachments."""
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "test"
    msg["Message-ID"] = "<test@example.org>"
    msg.set_content("Hello Bob,\nplease find the file attached.\n")
    for data, content_type, filename in attachments:
        maintype, subtype = content_type.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def closed_tcp_port() -> int:
    """A loopback port nobody listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(params=["unix", "tcp"])
def address(request, clamd_server: ClamdServer) -> str:
    """The session clamd's Unix and TCP addresses, one per test run."""
    return clamd_server.unix_address if request.param == "unix" else clamd_server.tcp_address


@pytest.fixture
def engine(address: str) -> ClamdEngine:
    """An engine loaded from a spec of the session clamd."""
    return ClamdSpec(address).load()


@pytest.fixture
def own_clamd(tmp_path_factory: pytest.TempPathFactory):
    """A clamd of this test's own, for tests that restart or stop it."""
    server = start_clamd(tmp_path_factory.mktemp("clamd"))
    yield server
    server.stop()


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("unix:/run/clamav/clamd.ctl", ClamdAddress(path="/run/clamav/clamd.ctl")),
        ("unix:///run/clamav/clamd.ctl", ClamdAddress(path="/run/clamav/clamd.ctl")),
        ("tcp://127.0.0.1:3310", ClamdAddress(host="127.0.0.1", port=3310)),
        ("tcp://scanner.example.org:3310/", ClamdAddress(host="scanner.example.org", port=3310)),
        ("tcp://[::1]:3310", ClamdAddress(host="::1", port=3310)),
    ],
)
def test_address_parses(text: str, expected: ClamdAddress) -> None:
    assert ClamdAddress.parse(text) == expected
    assert ClamdAddress.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/run/clamav/clamd.ctl",
        "unix:",
        "unix://clamd.sock",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:70000",
        "tcp://127.0.0.1:port",
        "tcp://:3310",
        "tcp://user@127.0.0.1:3310",
        "tcp://127.0.0.1:3310/scan",
        "tcp://127.0.0.1:3310?x=1",
        "http://127.0.0.1:3310",
    ],
)
def test_bad_address_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="clamd address"):
        ClamdSpec(text)


# --- definitions version ---------------------------------------------------------------------


def test_version_and_fingerprint(clamd_server: ClamdServer) -> None:
    unix = ClamdSpec(clamd_server.unix_address)
    tcp = ClamdSpec(clamd_server.tcp_address)
    version = unix.describe()["version"]
    assert version.startswith("ClamAV ") and "/1/" in version  # engine/db version/db date
    assert unix.describe()["address"] == clamd_server.unix_address
    assert tcp.describe()["address"] == clamd_server.tcp_address
    fingerprint = hashlib.sha256(version.encode()).hexdigest()
    assert unix.components() == {"clamav": fingerprint}
    assert tcp.components() == unix.components()
    assert ClamdSpec(clamd_server.unix_address).components() == unix.components()


def test_fingerprint_changes_with_the_signature_database(own_clamd: ClamdServer) -> None:
    before = ClamdSpec(own_clamd.tcp_address)
    old_engine = before.load()
    marker = b"rescan second test signature"
    own_clamd.restart(version=2, signatures={EICAR_SIGNATURE: EICAR, "Rescan.Test.Second": marker})

    after = ClamdSpec(own_clamd.tcp_address)
    assert after.components()["clamav"] != before.components()["clamav"]
    assert "/2/" in after.describe()["version"]
    # an engine loaded before the restart keeps working: no connection outlives a scan
    findings, problems = old_engine.scan_message(message((marker, "text/plain", "note.txt")))
    assert [f.rule.split(".UNOFFICIAL")[0] for f in findings] == ["Rescan.Test.Second"]
    assert problems == []


# --- scanning --------------------------------------------------------------------------------


def assert_eicar(findings: list[Finding], scanned: bytes, part: str = "") -> None:
    """Exactly one EICAR finding on ``part``, hashed over the ``scanned`` bytes."""
    assert len(findings) == 1
    finding = findings[0]
    assert finding.engine == "clamav" and finding.namespace == "clamav"
    assert finding.rule.startswith(EICAR_SIGNATURE)
    assert finding.part == part
    assert finding.sha256 == hashlib.sha256(scanned).hexdigest()
    assert finding.meta["version"].startswith("ClamAV ")


def test_eicar_in_a_base64_attachment(engine: ClamdEngine) -> None:
    raw = message((EICAR, "application/octet-stream", "eicar.com"))
    assert EICAR not in raw  # only found if clamd decodes the MIME part
    findings, problems = engine.scan_message(raw)
    assert_eicar(findings, raw)
    assert problems == []


def test_eicar_in_a_zip_attachment(engine: ClamdEngine) -> None:
    raw = message((zipped("docs/eicar.com", EICAR), "application/zip", "docs.zip"))
    findings, problems = engine.scan_message(raw)
    assert_eicar(findings, raw)
    assert problems == []


def test_clean_message(engine: ClamdEngine) -> None:
    raw = message((zipped("readme.txt", b"nothing to see"), "application/zip", "docs.zip"))
    assert engine.scan_message(raw) == ([], [])


def test_scan_part_reports_the_part_path(engine: ClamdEngine) -> None:
    part = Part("2/docs.zip/eicar.com", "application/octet-stream", "eicar.com", len(EICAR),
                hashlib.sha256(EICAR).hexdigest(), EICAR)
    findings, problems = engine.scan_part(part)
    assert_eicar(findings, EICAR, part="2/docs.zip/eicar.com")
    assert problems == []


def test_components_restrict_the_scan(engine: ClamdEngine) -> None:
    raw = message((EICAR, "application/octet-stream", "eicar.com"))
    assert engine.scan_message(raw, components=["yara:local.yar"]) == ([], [])
    assert engine.scan_message(raw, components=[]) == ([], [])
    assert len(engine.scan_message(raw, components=["clamav"])[0]) == 1


def test_stream_over_the_limit_is_not_sent_and_not_clean(tmp_path: Path) -> None:
    # nobody listens at this address: a problem other than "engine" proves nothing was sent
    engine = ClamdEngine(ClamdAddress(path=str(tmp_path / "none.sock")), "ClamAV 0", 1000)
    findings, problems = engine.scan_message(b"x" * 1001)
    assert findings == []
    assert [p.code for p in problems] == ["limit:clamd-stream-max"]
    assert Verdict.decide((), tuple(problems)) is Status.PARTIAL

    part = Part("1/big.bin", "application/octet-stream", None, 1001, "", b"x" * 1001)
    assert engine.scan_part(part)[1][0].part == "1/big.bin"
    assert engine.scan_message(b"x" * 1000)[1][0].code == "engine"  # at the limit: sent


def test_clamd_refusing_a_stream_is_a_limit_problem(address: str) -> None:
    # the spec believes in 4 MiB, the server's StreamMaxLength is 1 MiB
    engine = ClamdSpec(address, stream_max_length=4 * 1024 * 1024).load()
    raw = EICAR + b"\n" + b"x" * (1024 * 1024)
    findings, problems = engine.scan_message(raw)
    assert findings == []
    assert [p.code for p in problems] == ["limit:clamd-stream-max"]
    assert "refused" in problems[0].detail


def test_clamd_limit_alert_is_a_problem_not_a_finding(engine: ClamdEngine) -> None:
    # over clamd's MaxFileSize (512 KiB), under its StreamMaxLength (1 MiB)
    findings, problems = engine.scan_message(b"y" * (600 * 1024))
    assert findings == []
    assert [p.code for p in problems] == ["limit:clamd"]
    assert "Heuristics.Limits.Exceeded" in problems[0].detail


def test_encrypted_archive_is_a_problem(engine: ClamdEngine) -> None:
    buf = io.BytesIO()
    with pyzipper.AESZipFile(buf, "w", compression=pyzipper.ZIP_DEFLATED,
                             encryption=pyzipper.WZ_AES) as archive:
        archive.setpassword(b"infected")
        archive.writestr("eicar.com", EICAR)
    findings, problems = engine.scan_message(message((buf.getvalue(), "application/zip", "x.zip")))
    assert findings == []
    assert [p.code for p in problems] == ["encrypted"]


# --- clamd unreachable -----------------------------------------------------------------------


def test_unreachable_unix_socket_at_construction(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'missing.sock'}"
    with pytest.raises(DefinitionsError) as raised:
        ClamdSpec(address)
    text = str(raised.value)
    assert text.startswith(f"clamd at {address} is unreachable: ") and "\n" not in text


def test_unreachable_tcp_port_at_construction() -> None:
    address = f"tcp://127.0.0.1:{closed_tcp_port()}"
    with pytest.raises(DefinitionsError, match=f"clamd at {address} is unreachable"):
        ClamdSpec(address)


def test_clamd_gone_at_scan_time_is_an_engine_problem(own_clamd: ClamdServer) -> None:
    engine = ClamdSpec(own_clamd.unix_address).load()
    own_clamd.stop()
    findings, problems = engine.scan_message(message((EICAR, "application/octet-stream", "e.com")))
    assert findings == []
    assert [p.code for p in problems] == ["engine"]
    assert own_clamd.unix_address in problems[0].detail
    assert Verdict.decide((), tuple(problems)) is Status.PARTIAL


# --- across processes ------------------------------------------------------------------------


def scan_in_worker(spec: ClamdSpec, raw: bytes) -> list[Finding]:
    """Runs in a spawned process: load the engine from the unpickled spec and scan."""
    return spec.load().scan_message(raw)[0]


def test_spec_pickles_and_loads_in_a_fresh_process(clamd_server: ClamdServer) -> None:
    spec = ClamdSpec(clamd_server.unix_address)
    copy = pickle.loads(pickle.dumps(spec))
    assert copy.components() == spec.components() and copy.describe() == spec.describe()

    raw = message((zipped("eicar.com", EICAR), "application/zip", "docs.zip"))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        findings = pool.submit(scan_in_worker, spec, raw).result(timeout=120)
    assert_eicar(findings, raw)


# --- replies, against a scripted peer --------------------------------------------------------


class ScriptedClamd:
    """A Unix-socket peer that answers each connection with the next scripted reply
    (``None``: close the connection without answering)."""

    def __init__(self, path: Path, replies: list[bytes | None]):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.replies = replies
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for reply in self.replies:
            conn, _ = self.listener.accept()
            with conn:
                self.connections += 1
                if reply is None:
                    continue
                self._read_request(conn)
                conn.sendall(reply)

    @staticmethod
    def _read_request(conn: socket.socket) -> None:
        stream = conn.makefile("rb")
        command = b""
        while not command.endswith(b"\0"):
            command += stream.read(1)
        if command == b"zINSTREAM\0":
            while size := struct.unpack(">I", stream.read(4))[0]:
                stream.read(size)

    def close(self) -> None:
        """Wait for the scripted connections to finish and close the listener."""
        self.thread.join(timeout=10)
        self.listener.close()


def test_one_reconnect_after_a_dropped_connection(tmp_path: Path) -> None:
    peer = ScriptedClamd(tmp_path / "s", [None, b"stream: OK\0"])
    engine = ClamdEngine(ClamdAddress(path=str(tmp_path / "s")), "ClamAV 0")
    assert engine.scan_message(b"data") == ([], [])
    peer.close()
    assert peer.connections == 2


def test_two_dropped_connections_are_an_engine_problem(tmp_path: Path) -> None:
    peer = ScriptedClamd(tmp_path / "s", [None, None])
    engine = ClamdEngine(ClamdAddress(path=str(tmp_path / "s")), "ClamAV 0")
    findings, problems = engine.scan_message(b"data")
    peer.close()
    assert findings == [] and [p.code for p in problems] == ["engine"]
    assert problems[0].detail.startswith(f"clamd at unix:{tmp_path / 's'} is unreachable: ")


def test_error_reply_is_an_engine_problem(tmp_path: Path) -> None:
    peer = ScriptedClamd(tmp_path / "s", [b"Can't allocate memory ERROR\0"])
    engine = ClamdEngine(ClamdAddress(path=str(tmp_path / "s")), "ClamAV 0")
    part = Part("1", "text/plain", None, 4, "", b"data")
    findings, problems = engine.scan_part(part)
    peer.close()
    assert findings == []
    assert [(p.code, p.part) for p in problems] == [("engine", "1")]
    assert "Can't allocate memory ERROR" in problems[0].detail


def test_a_peer_that_is_not_clamd_is_refused(tmp_path: Path) -> None:
    peer = ScriptedClamd(tmp_path / "s", [b"HTTP/1.0 400 Bad Request\r\n\r\n"])
    with pytest.raises(DefinitionsError, match="answered VERSION"):
        ClamdSpec(f"unix:{tmp_path / 's'}")
    peer.close()
