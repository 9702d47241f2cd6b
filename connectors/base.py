"""The connector contract and the source URL registry.

A connector knows one kind of mail store. It lists mailboxes and folders, enumerates
``MessageRef``s in batches, fetches raw RFC 5322 bytes in batches, and offers action
primitives. It never parses MIME, never prints, and never imports the CLI.

Sources are URLs: ``maildir:PATH``, ``mbox:PATH``, ``eml:PATH``, a bare path (auto-detected),
``imap://user@host[:port][/folder]``, ``imaps://...``, ``ews://user@host/EWS/Exchange.asmx``,
``ews+http://...`` (loopback only). ``open_source(url, options)`` returns the connector.
Connector modules are imported lazily, so a Maildir scan never imports imapclient.

Incremental listing (optional). A connector that can tell what changed in a folder since an
earlier listing implements two methods; the base class's defaults say "cannot":

- ``cursor(mailbox, folder) -> str | None``: after a ``refs()`` listing of the folder ran to its
  end (in the same thread), an opaque cursor describing the folder as that listing saw it
  (IMAP: ``UIDVALIDITY:UIDNEXT:HIGHESTMODSEQ``); None when the store has none.
- ``changes(mailbox, folder, cursor) -> FolderChanges | None``: what changed since ``cursor``:
  the new or changed messages (``refs``, in batches as ``refs()`` gives them), the native ids
  expunged since (``gone``) and the cursor to store once all of it has been processed. None
  means "cannot say incrementally" (unsupported, or the cursor is no longer valid: a new
  UIDVALIDITY, no HIGHESTMODSEQ...): the caller then lists the whole folder with ``refs()``.

A cursor is captured when the listing starts, so a message that arrives during the listing is
found by the next ``changes()``, never lost.

Reading in the workers (optional). A store on this machine's file system (Maildir, .eml trees)
implements ``readers(refs)``: one small picklable reader per ref whose ``read()`` a worker
process calls, so the bytes do not travel through the main process (its reading and
forwarding took a core's share that the scans need). Remote stores use ``fetch()``.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from rescan.errors import ActionError, UsageError
from rescan.models import MessageRef
from rescan.secret import Secret


@dataclass(frozen=True)
class SourceOptions:
    """How to reach a store. ``password`` is a ``Secret``; nothing here is ever printed whole."""

    password: Secret | None = None
    token: Secret | None = None  # OAuth2 access token, when the store uses one
    ca_file: str | None = None
    insecure: bool = False
    connections: int = 4
    mailboxes: tuple[str, ...] = ()  # for admin accounts reaching many mailboxes
    include: tuple[str, ...] = ()  # folder globs
    exclude: tuple[str, ...] = ()
    batch_bytes: int = 16 * 1024 * 1024  # fetch batches are bounded by bytes ...
    batch_count: int = 100  # ... and by message count
    extra: dict[str, str] = field(default_factory=dict)  # connector-specific settings


@dataclass(frozen=True)
class FolderChanges:
    """What changed in a folder since a cursor (see the module docstring).

    ``refs`` yields batches of the new or changed messages only (lazily: consume it once);
    ``gone`` holds the native ids expunged since the cursor (it may name ids the caller never
    knew); ``cursor`` is the folder's new cursor, valid once ``refs`` has been consumed."""

    refs: Iterator[list[MessageRef]]
    gone: tuple[str, ...]
    cursor: str


@dataclass(frozen=True)
class ActionResult:
    """Outcome of an action on one message: ``ok`` and, after a move, the new location."""

    ref: MessageRef
    ok: bool
    detail: str = ""
    new_id: str | None = None


class Connector(ABC):
    """One open mail store. Use as a context manager; ``close()`` is idempotent.

    Subclasses set ``max_connections`` (politeness: parallel connections or requests per
    mailbox that the store tolerates) and implement the abstract methods.
    """

    max_connections: int = 1

    def __init__(self, source: str, options: SourceOptions):
        self.source = source
        self.options = options

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release connections and files."""

    def readers(self, refs: Sequence[MessageRef]) -> list | None:
        """For stores on this machine's file system: one picklable reader per ref, with
        ``size`` and ``read()`` (the bytes, or FetchError), so that worker processes read the
        bytes themselves instead of receiving them through the main process. None (the
        default): the bytes are fetched here with ``fetch()``."""
        return None

    @abstractmethod
    def mailboxes(self) -> list[str]:
        """Names of the mailboxes this source reaches (one for Maildir, mbox, a user login)."""

    @abstractmethod
    def folders(self, mailbox: str) -> list[str]:
        """Names of the scannable folders of ``mailbox``, in a stable order."""

    @abstractmethod
    def refs(self, mailbox: str, folder: str) -> Iterator[list[MessageRef]]:
        """Every message of ``folder`` as batches of ``MessageRef``s, in a stable order.

        Raises SourceError when the folder cannot be listed."""

    @abstractmethod
    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes | Exception]]:
        """Raw RFC 5322 bytes for each ref, in any order, each ref exactly once. A message
        that cannot be fetched is yielded with a ``FetchError`` instead of bytes; the
        others go on. Never changes the message (no read flag, no move)."""

    def cursor(self, mailbox: str, folder: str) -> str | None:
        """The cursor of ``folder`` as the last complete ``refs()`` listing of it in this thread
        saw it, or None (the default: this store has no incremental listing)."""
        return None

    def changes(self, mailbox: str, folder: str, cursor: str) -> FolderChanges | None:
        """What changed in ``folder`` since ``cursor``, or None when that cannot be told
        incrementally (the default) and the caller must list the folder with ``refs()``.

        Raises SourceError when the folder cannot be read."""
        return None

    # Action primitives. A connector that cannot act raises ActionError.
    def tag(self, refs: Sequence[MessageRef], keyword: str) -> list[ActionResult]:
        """Mark each message with ``keyword`` (IMAP keyword, EWS category)."""
        raise ActionError(f"{self.source}: this store cannot tag messages")

    def quarantine(self, refs: Sequence[MessageRef], folder: str) -> list[ActionResult]:
        """Move each message to ``folder``: copy, verify the copy, only then remove."""
        raise ActionError(f"{self.source}: this store cannot quarantine messages")

    def delete(self, refs: Sequence[MessageRef], hard: bool = False) -> list[ActionResult]:
        """Move each message to the trash, or remove it for good with ``hard``."""
        raise ActionError(f"{self.source}: this store cannot delete messages")


ConnectorFactory = Callable[[str, SourceOptions], Connector]

# scheme -> module that registers it; imported on first use only.
_MODULES = {
    "maildir": "connectors.local",
    "mbox": "connectors.local",
    "eml": "connectors.local",
    "imap": "connectors.imap",
    "imaps": "connectors.imap",
    "ews": "connectors.ews",
    "ews+http": "connectors.ews",
    "memory": "connectors.memory",
}
_FACTORIES: dict[str, ConnectorFactory] = {}
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):", re.I)


def register(*schemes: str) -> Callable[[ConnectorFactory], ConnectorFactory]:
    """Class decorator: register a connector for URL ``schemes``."""

    def deco(factory: ConnectorFactory) -> ConnectorFactory:
        for s in schemes:
            _FACTORIES[s] = factory
        return factory

    return deco


def scheme_of(source: str) -> str | None:
    """The URL scheme of ``source``, or None for a bare path (also ``C:\\...`` paths)."""
    m = _SCHEME.match(source)
    if not m or len(m.group(1)) == 1:  # a Windows drive letter is not a scheme
        return None
    return m.group(1).lower()


def check_no_inline_secret(source: str) -> None:
    """Refuse a URL with a password in it: it would be in argv and in every report."""
    if scheme_of(source) in ("imap", "imaps", "ews", "ews+http"):
        if urlsplit(source).password is not None:
            raise UsageError(
                "a password in the source URL is not accepted; use --password-env or --password-file"
            )


def open_source(source: str, options: SourceOptions | None = None) -> Connector:
    """The connector for ``source``. Raises UsageError for an unknown scheme and SourceError
    when the store cannot be opened."""
    options = options or SourceOptions()
    check_no_inline_secret(source)
    scheme = scheme_of(source)
    if scheme is None:
        scheme = "local"
        module = "connectors.local"
    else:
        module = _MODULES.get(scheme)
        if module is None:
            known = ", ".join(sorted(_MODULES))
            raise UsageError(f"unknown source scheme {scheme!r} in {source!r} (known: {known})")
    if scheme not in _FACTORIES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(
                f"source {scheme}: needs a package that is not installed ({exc.name}); "
                f"install rescan[all]"
            ) from None
    return _FACTORIES[scheme](source, options)
