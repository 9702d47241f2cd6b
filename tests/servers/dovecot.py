"""A real Dovecot for tests, on an ephemeral loopback port, with a generated configuration.

``DovecotServer`` writes a config (DESIGN.md's working one, plus a master-user passdb and,
optionally, TLS with a self-signed certificate made by the ``openssl`` CLI), starts
``dovecot -c CONF`` and stops it by the pid in ``run/master.pid``. A missing ``dovecot``
binary makes the fixture fail, never skip.

Fixtures (import them into a test module or a conftest):

- ``dovecot``: a plain server (no TLS, loopback), users ``alice`` and ``bob``, master ``admin``.
- ``dovecot_tls``: STARTTLS on ``port`` and implicit TLS on ``tls_port``; ``ca_file`` is the
  self-signed certificate's path.
- ``dovecot_factory``: ``dovecot_factory(**kwargs)`` starts a server with other settings
  (``imap_capability=...`` to hide MOVE or UIDPLUS, ``address=...`` for a non-loopback address).

Every fixture stops its servers at teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

USERS = {"alice": "alice-pw-7Qx", "bob": "bob-pw-9Lk", "carol": "carol-token-5Zt"}
MASTERS = {"admin": "master-pw-3Rv"}

_CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
listen = {address}
protocols = imap
ssl = {ssl}
{ssl_files}
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_master_user_separator = *
auth_failure_delay = 0
log_path = {dir}/dovecot.log
mail_location = maildir:{dir}/mail/%u
mail_fsync = never
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
{capability}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Trash {{
    special_use = \\Trash
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {address}
    port = {port}
  }}
  inet_listener imaps {{
    address = {address}
    port = {tls_port}
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=PLAIN {dir}/masters
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={dir}/mail/%u
}}
"""


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``address`` a moment ago."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def make_certificate(directory: Path, address: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``address`` (and ``localhost``) made with ``openssl``.

    Returns (certificate path, key path)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=rescan-test",
         "-addext", f"subjectAltName=IP:{address},DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


class DovecotServer:
    """One Dovecot process with its own directory, users and ports.

    ``tls`` adds STARTTLS and an implicit-TLS listener (``tls_port``) with a self-signed
    certificate (``ca_file``). ``imap_capability`` overrides the post-login CAPABILITY list
    (to hide MOVE or UIDPLUS). ``address`` is the listening address (loopback by default).
    """

    def __init__(self, tls: bool = False, imap_capability: str | None = None,
                 address: str = "127.0.0.1"):
        if shutil.which("dovecot") is None:
            pytest.fail("dovecot is not installed (Debian package dovecot-imapd); "
                        "the IMAP tests need a real Dovecot", pytrace=False)
        self.address = address
        self.tls = tls
        self.imap_capability = imap_capability
        self.dir = Path(tempfile.mkdtemp(prefix="rescan-dovecot-"))
        self.dir.chmod(0o755)
        self.port = free_port(address)
        self.tls_port = free_port(address) if tls else 0
        self.ca_file: str | None = None
        self._write_config()

    def _write_config(self) -> None:
        ssl_files = ""
        if self.tls:
            cert, key = make_certificate(self.dir, self.address)
            self.ca_file = str(cert)
            ssl_files = f"ssl_cert = <{cert}\nssl_key = <{key}"
        capability = f"imap_capability = {self.imap_capability}" if self.imap_capability else ""
        (self.dir / "dovecot.conf").write_text(_CONFIG.format(
            dir=self.dir, address=self.address, port=self.port, tls_port=self.tls_port,
            ssl="yes" if self.tls else "no", ssl_files=ssl_files, capability=capability,
        ))
        (self.dir / "users").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()))
        (self.dir / "masters").write_text(
            "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in MASTERS.items()))
        mail = self.dir / "mail"
        mail.mkdir(exist_ok=True)
        shutil.chown(mail, "nobody", "nogroup")

    def start(self) -> None:
        """Start Dovecot and wait until it accepts connections. Fails the test on error."""
        # The daemon keeps inherited descriptors open: send its output to a file, not a pipe.
        with open(self.dir / "start.err", "w+") as err:
            code = subprocess.call(["dovecot", "-c", str(self.dir / "dovecot.conf")],
                                   stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            if code != 0:
                err.seek(0)
                pytest.fail(f"dovecot did not start: {err.read().strip()}", pytrace=False)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"dovecot did not listen on {self.port}: {self.log()}",
                                pytrace=False)
                time.sleep(0.05)

    def stop(self, wait: bool = True) -> None:
        """Stop Dovecot (SIGTERM to the master's pid); with ``wait``, until it is gone
        (Dovecot takes a few seconds to shut down)."""
        pidfile = self.dir / "run" / "master.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().split()[0])
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            return
        if not wait:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        pidfile.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop and start again on the same ports with the same mail."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop (without waiting) and remove the server's directory."""
        self.stop(wait=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        """The server's log so far."""
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, user: str = "alice", folder: str | None = None, implicit_tls: bool = False,
            host: str | None = None) -> str:
        """The source URL for ``user`` (``imaps://`` on ``tls_port`` with ``implicit_tls``)."""
        scheme, port = ("imaps", self.tls_port) if implicit_tls else ("imap", self.port)
        url = f"{scheme}://{user}@{host or self.address}:{port}"
        return f"{url}/{folder}" if folder else url

    def client(self, user: str = "alice"):
        """An IMAPClient logged in as ``user`` for seeding and inspection (plain or STARTTLS)."""
        import ssl

        from imapclient import IMAPClient

        c = IMAPClient(self.address, self.port, ssl=False, timeout=10)
        if self.tls:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            c.starttls(ctx)
        c.login(user, USERS[user])
        return c


@pytest.fixture
def dovecot_factory():
    """``dovecot_factory(**kwargs)`` → a started ``DovecotServer``; all stopped at teardown."""
    servers: list[DovecotServer] = []

    def make(**kwargs) -> DovecotServer:
        server = DovecotServer(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.cleanup()


@pytest.fixture
def dovecot(dovecot_factory) -> DovecotServer:
    """A started plain Dovecot on loopback (users in ``USERS``, masters in ``MASTERS``)."""
    return dovecot_factory()


@pytest.fixture
def dovecot_tls(dovecot_factory) -> DovecotServer:
    """A started Dovecot with STARTTLS on ``port`` and implicit TLS on ``tls_port``."""
    return dovecot_factory(tls=True)


from tests.mailgen import EICAR  # noqa: E402

# folder -> number of messages; "Archive" itself is \Noselect (only Archive/2024 is created).
LAYOUT = {"INBOX": 6, "Archive/2024": 4, "Work": 3}


def make_message(n: int, infected: bool = False, body_size: int = 200) -> bytes:
    """A deterministic RFC 5322 message with CRLF line ends; ``infected`` attaches EICAR."""
    from email.message import EmailMessage
    from email.policy import SMTP

    msg = EmailMessage(policy=SMTP)
    msg["From"] = "sender@example.org"
    msg["To"] = "alice@example.org"
    msg["Subject"] = f"message {n}" + (" (eicar)" if infected else "")
    msg["Message-ID"] = f"<msg-{n}@rescan.test>"
    msg["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    msg.set_content(("line %d of the body\n" % n) * max(1, body_size // 20))
    if infected:
        msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                           filename="eicar.com")
    return msg.as_bytes()


def seed_mailbox(server: DovecotServer, user: str = "alice", layout: dict[str, int] = LAYOUT,
                 body_size: int = 200) -> dict[str, list[bytes]]:
    """APPEND messages into ``user``'s folders: every third one carries EICAR, every
    other one is ``\\Seen``. Returns folder → raw messages in UID order."""
    out: dict[str, list[bytes]] = {}
    n = 0
    client = server.client(user)
    try:
        for folder, count in layout.items():
            if folder != "INBOX":
                client.create_folder(folder)
            for _ in range(count):
                n += 1
                raw = make_message(n, infected=n % 3 == 0, body_size=body_size)
                client.append(folder, raw, flags=[b"\\Seen"] if n % 2 else [])
                out.setdefault(folder, []).append(raw)
    finally:
        client.logout()
    return out


def mailbox_state(server: DovecotServer, user: str = "alice") -> dict[str, dict[int, tuple]]:
    """Folder → {UID: sorted flags (without the session flag \\Recent)}, read with EXAMINE."""
    client = server.client(user)
    try:
        state = {}
        for flags, _, name in client.list_folders():
            if b"\\Noselect" in flags:
                continue
            client.select_folder(name, readonly=True)
            fetched = client.fetch(client.search(), ["FLAGS"])
            state[name] = {uid: tuple(sorted(f for f in d[b"FLAGS"] if f != b"\\Recent"))
                           for uid, d in fetched.items()}
        return state
    finally:
        client.logout()
