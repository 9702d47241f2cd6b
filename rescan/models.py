"""Values that flow through the pipeline, as frozen dataclasses.

A connector yields ``MessageRef``s and raw bytes; extraction yields ``Part``s; engines yield
``Finding``s; a worker returns a ``Verdict``. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping


class Status(str, enum.Enum):
    """Status of one message. Only ``CLEAN`` means fully scanned with no finding."""

    CLEAN = "clean"
    INFECTED = "infected"
    PARTIAL = "partial"  # scanned, but a limit was hit or something could not be opened
    ERROR = "error"  # the scan failed (fetch error, worker crash, timeout)
    SKIPPED = "skipped"  # not scanned (too large, excluded)


@dataclass(frozen=True)
class MessageRef:
    """A message in a store, without its content.

    ``source`` is the source URL (never with a secret), ``id`` the store-native id (Maildir
    unique name, IMAP UID, EWS ItemId), ``version`` a token that changes whenever the message
    could have changed ((UIDVALIDITY, UID), (ItemId, ChangeKey), ...), ``size`` in bytes when
    the store tells it, ``date`` as ISO 8601 text when known.
    """

    source: str
    mailbox: str
    folder: str
    id: str
    version: str
    size: int | None = None
    date: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity of the message within all stores: (source, mailbox, folder, id)."""
        return (self.source, self.mailbox, self.folder, self.id)


@dataclass(frozen=True)
class Limits:
    """Extraction and scanning limits. They change results, so they are part of the definitions
    fingerprint. Defaults are near ClamAV's (MaxFileSize, MaxScanSize, MaxFiles, MaxRecursion).
    """

    max_message_size: int = 100 * 1024 * 1024  # larger messages are skipped, not fetched
    max_filesize: int = 100 * 1024 * 1024  # one extracted part
    max_scansize: int = 400 * 1024 * 1024  # all extracted bytes of one message
    max_files: int = 10_000  # parts per message
    max_recursion: int = 17  # nesting depth of containers
    max_ratio: int = 250  # expanded / compressed size of one archive member
    timeout: float = 120.0  # seconds per message, enforced by the worker pool

    def as_dict(self) -> dict[str, Any]:
        """The limits as a plain dict (for fingerprints and reports)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Problem:
    """Why a message is not fully scanned.

    ``code`` is a short stable word: ``limit:max-files`` (and the other limit names),
    ``encrypted``, ``unsupported``, ``malformed``, ``timeout``, ``crash``, ``fetch``,
    ``too-large``, ``engine``. ``part`` is the part path when the problem belongs to one part.
    """

    code: str
    detail: str
    part: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "detail": self.detail, "part": self.part}


@dataclass(frozen=True)
class Part:
    """One scannable piece of a message: the header block, a decoded MIME leaf, a nested
    message, an archive member. ``path`` looks like ``2/invoice.zip/payload.exe``.
    ``decrypted`` marks what came out of an archive opened with a password: engines that
    unpack messages on their own (ClamAV) cannot reach it, so it is handed to them as a part.
    """

    path: str
    content_type: str
    filename: str | None
    size: int
    sha256: str
    data: bytes = field(repr=False, compare=False, default=b"")
    decrypted: bool = False


@dataclass(frozen=True)
class Finding:
    """One match of one rule on one part."""

    engine: str  # "yara", "clamav"
    rule: str
    namespace: str  # the rule file (relative path) for YARA; the database for ClamAV
    tags: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    part: str = ""
    sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "rule": self.rule,
            "namespace": self.namespace,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "part": self.part,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Finding:
        return cls(
            engine=d["engine"],
            rule=d["rule"],
            namespace=d["namespace"],
            tags=tuple(d.get("tags", ())),
            meta=dict(d.get("meta", {})),
            part=d.get("part", ""),
            sha256=d.get("sha256", ""),
        )


@dataclass(frozen=True)
class Verdict:
    """The outcome of scanning one message."""

    status: Status
    findings: tuple[Finding, ...] = ()
    problems: tuple[Problem, ...] = ()
    message_id: str | None = None
    subject: str | None = None
    bytes_scanned: int = 0

    @staticmethod
    def decide(findings: tuple[Finding, ...], problems: tuple[Problem, ...]) -> Status:
        """Status of a scanned message: infected if anything matched, partial if anything
        could not be scanned, clean only otherwise."""
        if findings:
            return Status.INFECTED
        if problems:
            return Status.PARTIAL
        return Status.CLEAN

    @property
    def fully_scanned(self) -> bool:
        """True when nothing was left unscanned (the message may still be infected)."""
        return self.status in (Status.CLEAN, Status.INFECTED) and not self.problems


def error_verdict(code: str, detail: str) -> Verdict:
    """The verdict of a message that could not be scanned at all."""
    return Verdict(Status.ERROR, problems=(Problem(code, detail),))


def too_large(size: int, limit: int) -> Verdict:
    """The verdict of a message over ``--max-message-size``: skipped, with the reason."""
    return Verdict(Status.SKIPPED, problems=(Problem("too-large", f"{size} bytes > --max-message-size {limit}"),))
