"""A real clamd for tests, with a private configuration and a tiny signature database.

The database directory holds only ``daily.cud``: ClamAV's unsigned database container (a CVD
header plus a tar of ``daily.info`` and ``daily.ndb``). The ``.ndb`` inside carries the test
signatures (EICAR by default). A plain ``.ndb`` file would load too, but then clamd's VERSION
answer carries no database version; the container's header sets it, so tests can see the
definitions fingerprint change. No freshclam, no downloads.

A missing ``clamd`` binary fails the tests that use it (never skips).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import pytest

# The EICAR test file, assembled so that this source file does not match it itself.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Rescan.Test.EICAR"
DEFAULT_SIGNATURES: Mapping[str, bytes] = {EICAR_SIGNATURE: EICAR}

# Loading even a one-signature database takes clamd a few seconds (engine compile).
START_TIMEOUT = 60.0
# clamd's functionality level 90 is ClamAV 0.103; any current clamd loads it.
FUNCTIONALITY_LEVEL = 90


def find_clamd() -> str:
    """Path of the clamd binary; fails the test when it is not installed."""
    found = shutil.which("clamd") or shutil.which("clamd", path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail("clamd not found: install the Debian package clamav-daemon", pytrace=False)
    return found


def write_database(db_dir: Path, version: int, signatures: Mapping[str, bytes]) -> Path:
    """Write ``db_dir/daily.cud`` holding one ``.ndb`` with a body signature (any file type,
    any offset) for each name → bytes. ``version`` becomes the database version in clamd's
    VERSION answer. Returns the file's path."""
    stime = int(time.time())
    ndb = "".join(f"{name}:0:*:{data.hex()}\n" for name, data in signatures.items()).encode()
    header = f"ClamAV-VDB:{time.strftime('%d %b %Y %H-%M %z', time.gmtime(stime))}:{version}:"
    header += f"{len(signatures)}:{FUNCTIONALITY_LEVEL}"
    info = f"{header}:X:X:rescan-tests:{stime}\n"
    info += f"daily.ndb:{len(ndb)}:{hashlib.sha256(ndb).hexdigest()}\n"
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("daily.info", info.encode()), ("daily.ndb", ndb)):
            member = tarfile.TarInfo(name)
            member.size, member.mtime = len(data), stime
            tar.addfile(member, io.BytesIO(data))
    md5 = hashlib.md5(body.getvalue()).hexdigest()
    cvd_header = f"{header}:{md5}:X:rescan-tests:{stime}".encode().ljust(512, b" ")
    db_dir.mkdir(parents=True, exist_ok=True)
    for old in db_dir.iterdir():
        old.unlink()
    path = db_dir / "daily.cud"
    path.write_bytes(cvd_header + body.getvalue())
    return path


def free_tcp_port() -> int:
    """A loopback port that was free a moment ago (clamd cannot bind port 0 itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ping(socket_path: Path) -> bool:
    """True when clamd answers PING with PONG on its Unix socket."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(socket_path))
            sock.sendall(b"zPING\0")
            return sock.recv(64).startswith(b"PONG")
    except OSError:
        return False


@dataclass
class ClamdServer:
    """One clamd process with its own directory (socket, database, log).

    ``stream_max_length`` and ``max_filesize`` are clamd's StreamMaxLength and MaxFileSize in
    bytes. ``AlertExceedsMax`` and ``AlertEncrypted`` are on, so limits show up in replies.
    """

    directory: Path
    stream_max_length: int = 1024 * 1024
    max_filesize: int = 512 * 1024
    tcp_port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def socket_path(self) -> Path:
        """The Unix socket clamd listens on."""
        return self.directory / "clamd.sock"

    @property
    def unix_address(self) -> str:
        """``unix:PATH`` of the Unix socket."""
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self) -> str:
        """``tcp://127.0.0.1:PORT`` of the TCP socket."""
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def log(self) -> str:
        """clamd's log so far (for failure messages)."""
        path = self.directory / "clamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, version: int = 1, signatures: Mapping[str, bytes] = DEFAULT_SIGNATURES) -> None:
        """Write the database and start clamd; return once it answers PING.

        Keeps the TCP port across restarts. Fails the test if clamd does not come up.
        """
        binary = find_clamd()
        write_database(self.directory / "db", version, signatures)
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.tcp_port else 3
        for _ in range(attempts):
            self.tcp_port = self.tcp_port or free_tcp_port()
            self._write_config()
            self.process = subprocess.Popen(
                [binary, "-c", str(self.directory / "clamd.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return
            self.stop()
            self.tcp_port = 0  # perhaps the port was taken meanwhile: try another one
        pytest.fail(f"clamd did not start; its log:\n{self.log[-3000:]}", pytrace=False)

    def restart(self, version: int, signatures: Mapping[str, bytes]) -> None:
        """Stop clamd, replace its database and start it again on the same addresses."""
        self.stop()
        self.start(version, signatures)

    def stop(self) -> None:
        """Stop clamd (SIGTERM, then SIGKILL after ten seconds) and remove its socket."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self.socket_path.unlink(missing_ok=True)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if ping(self.socket_path):
                return True
            time.sleep(0.1)
        return False

    def _write_config(self) -> None:
        d = self.directory
        config = f"""\
Foreground yes
LocalSocket {d / "clamd.sock"}
TCPSocket {self.tcp_port}
TCPAddr 127.0.0.1
DatabaseDirectory {d / "db"}
TemporaryDirectory {d / "tmp"}
LogFile {d / "clamd.log"}
LogTime yes
SelfCheck 0
Bytecode no
StreamMaxLength {self.stream_max_length}
MaxFileSize {self.max_filesize}
AlertExceedsMax yes
AlertEncrypted yes
"""
        (d / "clamd.conf").write_text(config)


def start_clamd(directory: Path, **settings) -> ClamdServer:
    """Start a clamd in ``directory`` (created if needed) with ``ClamdServer`` settings
    (``stream_max_length``, ``max_filesize``) and the default EICAR database."""
    directory.mkdir(parents=True, exist_ok=True)
    server = ClamdServer(directory, **settings)
    server.start()
    return server


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    """A clamd shared by the session: EICAR signature, StreamMaxLength 1 MiB, MaxFileSize
    512 KiB; has ``.unix_address``, ``.tcp_address`` and ``.stop()``."""
    server = start_clamd(tmp_path_factory.mktemp("clamd"))
    yield server
    server.stop()
