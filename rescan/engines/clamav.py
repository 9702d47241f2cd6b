"""The ClamAV engine: scans through a running clamd over its socket (INSTREAM).

clamd loads the signatures; the worker only streams bytes to it. The definitions version is
clamd's VERSION answer (``ClamAV 1.4.6/27000/Thu Jan  1 ...``: engine, signature database
version and date), queried once in the main process when the spec is built.

Replies become findings or problems:

- ``stream: OK`` → nothing;
- ``stream: NAME FOUND`` → a ``Finding``, except ClamAV's own limit and encryption alerts
  (``Heuristics.Limits.Exceeded.*``, ``Heuristics.Encrypted.*``, raised only when clamd runs
  with ``AlertExceedsMax``/``AlertEncrypted``), which mean "not fully scanned", so problems;
- ``INSTREAM size limit exceeded. ERROR`` → ``limit:clamd-stream-max``; any other ``ERROR``
  or an unreachable clamd → ``engine``.
"""

from __future__ import annotations

import hashlib
from typing import Collection

from rescan.engines import Engine, EngineSpec, ScanOutput
from rescan.engines.clamd import ClamdAddress, ClamdClient
from rescan.errors import DefinitionsError
from rescan.models import Finding, Part, Problem

COMPONENT = "clamav"
# ClamAV's own default StreamMaxLength (25M): streams above it are refused by a stock clamd.
DEFAULT_STREAM_MAX_LENGTH = 25 * 1024 * 1024
# Seconds for connecting and for each read or write; clamd answers INSTREAM only after the
# whole scan, so this also bounds the scan time of one stream.
DEFAULT_TIMEOUT = 60.0

_LIMIT_ALERT = "Heuristics.Limits.Exceeded"
_ENCRYPTED_ALERT = "Heuristics.Encrypted."
_SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"


def _stream_too_large(size: int, limit: int, part: str | None) -> Problem:
    return Problem(
        code="limit:clamd-stream-max",
        detail=f"{size} bytes exceed clamd's StreamMaxLength of {limit}; not scanned by clamd",
        part=part,
    )


class ClamdEngine(Engine):
    """Streams messages or parts to clamd, one fresh connection per scan.

    Takes the clamd ``address``, the ``version`` text the definitions fingerprint was taken
    from (it goes into each finding's meta), ``stream_max_length`` in bytes (larger streams
    are not sent; they become a ``limit:clamd-stream-max`` problem) and a socket ``timeout``.
    Keeps no per-scan state; never raises for a scan, it reports problems instead.
    """

    name = COMPONENT
    unpacks_messages = True

    def __init__(
        self,
        address: ClamdAddress,
        version: str,
        stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.client = ClamdClient(address, timeout)
        self.version = version
        self.stream_max_length = stream_max_length

    def scan_message(self, raw: bytes, components: Collection[str] | None = None) -> ScanOutput:
        """Scan a whole raw RFC 5322 message (clamd unpacks MIME and archives itself).

        Returns findings with ``part=""`` and problems with ``part=None``.
        """
        return self._scan(raw, "", components)

    def scan_part(self, part: Part, components: Collection[str] | None = None) -> ScanOutput:
        """Scan one extracted part's bytes; findings and problems carry ``part.path``."""
        return self._scan(part.data, part.path, components)

    def _scan(self, data: bytes, path: str, components: Collection[str] | None) -> ScanOutput:
        if components is not None and COMPONENT not in components:
            return [], []
        problem_part = path or None
        if len(data) > self.stream_max_length:
            return [], [_stream_too_large(len(data), self.stream_max_length, problem_part)]
        try:
            reply = self._instream_with_one_retry(data)
        except DefinitionsError as exc:
            return [], [Problem(code="engine", detail=str(exc), part=problem_part)]
        return self._interpret(reply, data, path, problem_part)

    def _instream_with_one_retry(self, data: bytes) -> str:
        try:
            return self.client.instream(data)
        except DefinitionsError:
            return self.client.instream(data)

    def _interpret(
        self, reply: str, data: bytes, path: str, problem_part: str | None
    ) -> ScanOutput:
        if reply.endswith(" FOUND"):
            name = reply.removeprefix("stream:").removesuffix(" FOUND").strip()
            if name.startswith(_LIMIT_ALERT):
                return [], [Problem(code="limit:clamd", detail=f"clamd: {name}", part=problem_part)]
            if name.startswith(_ENCRYPTED_ALERT):
                return [], [Problem(code="encrypted", detail=f"clamd: {name}", part=problem_part)]
            finding = Finding(
                engine=COMPONENT,
                rule=name,
                namespace=COMPONENT,
                meta={"version": self.version},
                part=path,
                sha256=hashlib.sha256(data).hexdigest(),
            )
            return [finding], []
        if reply.endswith(" OK"):
            return [], []
        if reply.startswith(_SIZE_LIMIT_REPLY):
            detail = (
                f"clamd refused {len(data)} bytes (its StreamMaxLength is below the configured "
                f"{self.stream_max_length}); not scanned by clamd"
            )
            return [], [Problem(code="limit:clamd-stream-max", detail=detail, part=problem_part)]
        detail = f"clamd at {self.client.address}: {reply}"
        return [], [Problem(code="engine", detail=detail, part=problem_part)]


class ClamdSpec(EngineSpec):
    """Picklable description of a clamd to scan with.

    Takes ``address`` as ``unix:/path/to/clamd.sock`` or ``tcp://host:port``,
    ``stream_max_length`` (set it to clamd's StreamMaxLength; clamd does not tell it over the
    socket) and a socket ``timeout`` in seconds. Asks clamd for its VERSION once, here.

    Raises ``UsageError`` on a malformed address and ``DefinitionsError`` when clamd is
    unreachable or does not answer VERSION.
    """

    name = COMPONENT

    def __init__(
        self,
        address: str,
        stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.address = ClamdAddress.parse(address)
        self.stream_max_length = stream_max_length
        self.timeout = timeout
        self.version = ClamdClient(self.address, timeout).command("VERSION")
        if not self.version.startswith("ClamAV "):
            raise DefinitionsError(
                f"clamd at {self.address} answered VERSION with {self.version[:80]!r}"
            )

    def components(self) -> dict[str, str]:
        """``{"clamav": sha256 of clamd's VERSION answer}``: changes with the engine version
        and with the signature database version."""
        return {COMPONENT: hashlib.sha256(self.version.encode("utf-8")).hexdigest()}

    def describe(self) -> dict[str, object]:
        """clamd's VERSION answer, its address and the stream size limit in use."""
        return {
            "version": self.version,
            "address": str(self.address),
            "stream_max_length": self.stream_max_length,
        }

    def load(self) -> ClamdEngine:
        """A ``ClamdEngine`` talking to the same clamd (opens no connection yet)."""
        return ClamdEngine(self.address, self.version, self.stream_max_length, self.timeout)
