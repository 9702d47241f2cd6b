"""Scanning engines.

An engine comes in two halves:

- an ``EngineSpec``, built in the main process: picklable, cheap, knows the engine's
  *components* (for YARA each rule file, for ClamAV its signature databases) and their
  fingerprints (what changes the answers). The definitions version is derived from them.
- an ``Engine``, built from the spec by ``spec.load()`` once per worker process (in the pool's
  initializer). It scans parts, or whole raw messages, into findings.

``components`` restricts a scan to some components (a delta rescan after adding one rule
file); ``None`` means all of them. No per-scan state is kept on an ``Engine``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Collection

from rescan.models import Finding, Part, Problem

ScanOutput = tuple[list[Finding], list[Problem]]


class Engine(ABC):
    """A loaded engine, living inside one worker process."""

    name: ClassVar[str]
    # True for engines that unpack whole messages themselves (ClamAV): they get the raw
    # message, and of the parts only those they cannot reach (``Part.decrypted``).
    unpacks_messages: ClassVar[bool] = False

    @abstractmethod
    def scan_part(self, part: Part, components: Collection[str] | None = None) -> ScanOutput:
        """Findings (and problems, e.g. a size limit) for one extracted part."""

    def scan_message(self, raw: bytes, components: Collection[str] | None = None) -> ScanOutput:
        """Findings for a whole raw message, for engines that unpack on their own (ClamAV).
        The default scans nothing here."""
        return [], []

    def close(self) -> None:
        """Release sockets or handles."""


class EngineSpec(ABC):
    """Picklable description of an engine; ``load()`` builds the ``Engine`` in a worker."""

    name: ClassVar[str]

    @abstractmethod
    def components(self) -> dict[str, str]:
        """Component name → fingerprint (hex). A changed fingerprint means changed answers."""

    @abstractmethod
    def load(self) -> Engine:
        """Build the engine. Called once per worker process."""

    def describe(self) -> dict[str, object]:
        """Engine version and settings for reports (e.g. rule counts, clamd VERSION)."""
        return {}
