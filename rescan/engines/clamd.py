"""A small client for clamd's socket protocol: PING, VERSION and INSTREAM.

Every command opens a fresh connection (clamd closes it after one ``z``-command anyway), so
nothing is shared between scans. Socket failures are translated into ``DefinitionsError`` in
one place, ``_map_socket_errors``; what clamd *answers* is returned as text for the caller to
interpret.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from rescan.errors import DefinitionsError, UsageError

# Chunk size for INSTREAM: large enough to keep system calls few, small enough that no
# chunk comes near clamd's StreamMaxLength in any sane configuration.
CHUNK_SIZE = 64 * 1024
# clamd's replies are one line; anything longer than this is not clamd.
MAX_REPLY = 64 * 1024


@dataclass(frozen=True)
class ClamdAddress:
    """Where clamd listens: a Unix socket path, or a TCP host and port.

    Build it with ``ClamdAddress.parse("unix:/run/clamav/clamd.ctl")`` or
    ``ClamdAddress.parse("tcp://127.0.0.1:3310")``; ``str()`` gives that text back.
    """

    path: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> ClamdAddress:
        """Parse ``unix:PATH`` (also ``unix:///ABSOLUTE/PATH``) or ``tcp://HOST:PORT``.

        Raises ``UsageError`` on anything else (missing path, missing or invalid port, a
        user, path or query in the TCP form).
        """
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if path.startswith("//"):
                path = path[2:]
                if not path.startswith("/"):
                    raise UsageError(f"clamd address {text!r}: expected unix:///ABSOLUTE/PATH")
            if not path:
                raise UsageError(f"clamd address {text!r}: no socket path after 'unix:'")
            return cls(path=path)
        if text.startswith("tcp://"):
            parts = urlsplit(text)
            try:
                port = parts.port
            except ValueError:
                raise UsageError(f"clamd address {text!r}: invalid port") from None
            if not parts.hostname or port is None or port == 0:
                raise UsageError(f"clamd address {text!r}: expected tcp://HOST:PORT")
            if parts.username or parts.password or parts.path not in ("", "/"):
                raise UsageError(f"clamd address {text!r}: expected tcp://HOST:PORT only")
            if parts.query or parts.fragment:
                raise UsageError(f"clamd address {text!r}: expected tcp://HOST:PORT only")
            return cls(host=parts.hostname, port=port)
        raise UsageError(
            f"clamd address {text!r}: expected unix:/path/to/clamd.sock or tcp://host:port"
        )

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or ""
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        return f"tcp://{host}:{self.port}"

    def connect(self, timeout: float) -> socket.socket:
        """Open a connection with ``timeout`` seconds for connecting and each read or write.

        Raises ``OSError`` (the caller maps it).
        """
        if self.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.host, self.port), timeout=timeout)


@contextlib.contextmanager
def _map_socket_errors(address: ClamdAddress, timeout: float) -> Iterator[None]:
    """The one boundary where socket errors become ``DefinitionsError``."""
    try:
        yield
    except TimeoutError:
        raise DefinitionsError(f"clamd at {address} did not answer within {timeout:g}s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise DefinitionsError(f"clamd at {address} is unreachable: {reason}") from None


def _read_reply(sock: socket.socket) -> bytes:
    """Read one null-terminated reply (or up to EOF); raises ``ConnectionError`` if empty."""
    reply = bytearray()
    while len(reply) < MAX_REPLY:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
        if b"\0" in chunk:
            break
    if not reply:
        raise ConnectionError("connection closed without a reply")
    return bytes(reply.split(b"\0", 1)[0])


def _decode(reply: bytes) -> str:
    return reply.decode("utf-8", errors="replace").strip()


@dataclass(frozen=True)
class ClamdClient:
    """Runs one clamd command per connection.

    ``timeout`` (seconds) bounds connecting and every single read or write. Every method
    raises ``DefinitionsError`` when clamd cannot be reached or stops answering.
    """

    address: ClamdAddress
    timeout: float = 60.0

    def command(self, name: str) -> str:
        """Send a simple command (``PING``, ``VERSION``) and return clamd's reply text."""
        with _map_socket_errors(self.address, self.timeout):
            with self.address.connect(self.timeout) as sock:
                sock.sendall(b"z" + name.encode("ascii") + b"\0")
                return _decode(_read_reply(sock))

    def instream(self, data: bytes) -> str:
        """Stream ``data`` to clamd with INSTREAM and return its reply, e.g.
        ``stream: OK``, ``stream: Name FOUND`` or ``INSTREAM size limit exceeded. ERROR``.

        clamd may close the connection before all data is sent (its size limit): the reply it
        wrote first is still returned.
        """
        with _map_socket_errors(self.address, self.timeout):
            with self.address.connect(self.timeout) as sock:
                try:
                    sock.sendall(b"zINSTREAM\0")
                    view = memoryview(data)
                    for start in range(0, len(view), CHUNK_SIZE):
                        chunk = view[start : start + CHUNK_SIZE]
                        sock.sendall(struct.pack(">I", len(chunk)))
                        sock.sendall(chunk)
                    sock.sendall(struct.pack(">I", 0))
                except (BrokenPipeError, ConnectionResetError) as send_error:
                    try:
                        return _decode(_read_reply(sock))
                    except OSError:
                        raise send_error from None
                return _decode(_read_reply(sock))
