"""IMAP connector (imapclient): ``imap://user@host[:port][/folder]`` and ``imaps://...``.

Scanning changes nothing: folders are opened with EXAMINE and bodies fetched with
``BODY.PEEK[]``. UIDs are listed in windows of ``uid_window`` UIDs so a large folder never
produces one huge response line; bodies are fetched in batches bounded by bytes and count,
with UID sets compressed to ranges. Each thread has its own connection per mailbox.

Security: ``imaps://`` is implicit TLS; ``imap://`` upgrades with STARTTLS when the server
offers it, and a password or token is never sent without TLS except to a loopback address.
Certificates are verified (``options.ca_file`` adds a trust anchor); ``options.insecure``
skips verification with a warning.

Settings in ``options.extra``: ``master_user`` (Dovecot-style master login
``mailbox*master``; the password is the master's and the mailboxes come from
``options.mailboxes``), ``master_separator`` (default ``*``), ``auth`` (``login``, ``plain``,
``xoauth2``, ``oauthbearer``), ``uid_window`` and ``timeout`` (seconds per socket read).

Incremental listing (``cursor()``/``changes()``, see connectors.base): the cursor is
``UIDVALIDITY:UIDNEXT:HIGHESTMODSEQ`` (``UIDVALIDITY:UIDNEXT`` without CONDSTORE). Where the
server offers QRESYNC it is enabled on every connection; ``changes()`` then opens the folder
with ``EXAMINE folder (QRESYNC (uidvalidity modseq))``, whose ``VANISHED (EARLIER)`` response
names the UIDs expunged since, and lists only the UIDs from the old UIDNEXT up. Flag changes
do not matter (a message's body never changes under one UIDVALIDITY:UID). A new UIDVALIDITY, a
cursor without HIGHESTMODSEQ or a server without QRESYNC: ``changes()`` returns None and the
folder is listed whole.

Every library error (imaplib, imapclient, ssl, socket) is translated in ``map_imap_errors``.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import unquote, urlsplit

from imapclient import IMAPClient, SocketTimeout
from imapclient import exceptions as imap_exc
from imapclient.response_parser import parse_fetch_response

from connectors.base import ActionResult, Connector, FolderChanges, SourceOptions, register
from rescan.errors import (
    ActionError,
    AuthError,
    FetchError,
    RescanError,
    SourceError,
    TransientError,
    UsageError,
)
from rescan.models import MessageRef

log = logging.getLogger("rescan.imap")
T = TypeVar("T")

_KEYWORD = re.compile(r"^[^\s()\[\]{}%*\"\\]+$")  # an IMAP flag atom, or \System flag
_COPYUID = re.compile(rb"^\s*(\d+)\s+(\S+)\s+(\S+)")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_LISTING_LINE = re.compile(
    rb'^\d+ \((?=.*\bUID (\d+))(?=.*\bRFC822\.SIZE (\d+))(?=.*\bINTERNALDATE "([^"]+)").*\)$'
)


_MONTHS = {m: i for i, m in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"), 1)}
_DATE_TIME = re.compile(rb"^\s*(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\s*$")


def _internaldate(text: bytes) -> datetime.datetime | None:
    """An IMAP INTERNALDATE (``17-Jul-1996 02:44:25 -0700``, RFC 3501 date-time), or None
    when it is not one. (``strptime`` costs ten times more, once per message listed.)"""
    m = _DATE_TIME.match(text)
    month = _MONTHS.get(m.group(2).lower()) if m else None
    if month is None:
        return None
    day, _, year, hh, mm, ss, sign, oh, om = m.groups()
    offset = datetime.timedelta(hours=int(oh), minutes=int(om))
    try:
        return datetime.datetime(int(year), month, int(day), int(hh), int(mm), int(ss),
                                 tzinfo=datetime.timezone(-offset if sign == b"-" else offset))
    except ValueError:  # 31-Feb, 25:00 ...
        return None


def compress_uids(uids: Sequence[int]) -> str:
    """A UID set with runs as ranges: ``[1, 2, 3, 5, 7, 8]`` → ``"1:3,5,7:8"``.

    Takes UIDs in any order, duplicates allowed; raises ValueError for an empty sequence."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts = []
    start = prev = ordered[0]
    for uid in ordered[1:] + [None]:
        if uid is not None and uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        if uid is not None:
            start = prev = uid
    return ",".join(parts)


def expand_uids(uid_set: str) -> list[int]:
    """The UIDs of a set without ``*``: ``"1:3,5"`` → ``[1, 2, 3, 5]`` (in the set's order)."""
    out: list[int] = []
    for item in uid_set.split(","):
        lo, _, hi = item.partition(":")
        a, b = int(lo), int(hi or lo)
        step = 1 if b >= a else -1
        out.extend(range(a, b + step, step))
    return out


@dataclass(frozen=True)
class ImapCursor:
    """Where a folder listing stopped: its UIDVALIDITY, the next UID to be given out, and the
    HIGHESTMODSEQ (None without CONDSTORE). Text form ``UIDVALIDITY:UIDNEXT[:HIGHESTMODSEQ]``."""

    uidvalidity: int
    uidnext: int
    modseq: int | None = None

    @classmethod
    def parse(cls, text: str) -> ImapCursor | None:
        """The cursor in ``text``, or None when it is not one (a cursor from another store or
        another version: the folder is then listed whole)."""
        fields = text.split(":")
        if len(fields) not in (2, 3) or not all(f.isdigit() for f in fields):
            return None
        numbers = [int(f) for f in fields]
        if numbers[0] == 0 or numbers[1] == 0:
            return None
        return cls(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None)

    def __str__(self) -> str:
        head = f"{self.uidvalidity}:{self.uidnext}"
        return head if self.modseq is None else f"{head}:{self.modseq}"


def parse_vanished(items: Sequence[bytes]) -> list[int]:
    """The UIDs of ``VANISHED [(EARLIER)] uid-set`` response data (one item per response)."""
    uids: list[int] = []
    for item in items:
        text = (item or b"").decode("ascii", "replace").strip()
        if text.upper().startswith("(EARLIER)"):
            text = text[len("(EARLIER)"):].strip()
        if text:
            uids.extend(expand_uids(text))
    return uids


def password_allowed(peer_address: str, tls: bool) -> bool:
    """Whether a password or token may be sent: over TLS always, in clear only to loopback."""
    if tls:
        return True
    try:
        return ipaddress.ip_address(peer_address.split("%")[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def map_imap_errors(context: str) -> Iterator[None]:
    """Translate imaplib/imapclient/ssl/socket errors raised inside into rescan errors.

    ``context`` prefixes the message (the source URL and folder; never a secret).
    LoginError → AuthError; certificate failures → SourceError; drops, BYE and timeouts →
    TransientError; any other protocol error → SourceError. RescanErrors pass through."""
    try:
        yield
    except RescanError:
        raise
    except imap_exc.LoginError as exc:
        raise AuthError(f"{context}: the server refused the credentials ({_server_text(exc)})") from None
    except ssl.SSLCertVerificationError as exc:
        raise SourceError(
            f"{context}: TLS certificate not trusted ({getattr(exc, 'verify_message', None) or exc}); "
            "give the CA certificate with ca_file, or skip verification with insecure"
        ) from None
    except ssl.SSLError as exc:
        raise SourceError(f"{context}: TLS failed ({exc.reason or exc})") from None
    except imap_exc.IMAPClientAbortError as exc:
        raise TransientError(f"{context}: connection lost ({_server_text(exc)})") from None
    except (socket.timeout, TimeoutError):
        raise TransientError(f"{context}: the server did not answer in time") from None
    except (ConnectionError, EOFError) as exc:
        raise TransientError(f"{context}: connection lost ({exc.__class__.__name__})") from None
    except socket.gaierror as exc:
        raise SourceError(f"{context}: cannot resolve the host ({exc.strerror})") from None
    except OSError as exc:
        raise TransientError(f"{context}: network error ({exc.strerror or exc})") from None
    except imap_exc.IMAPClientError as exc:
        raise SourceError(f"{context}: {_server_text(exc)}") from None


def _server_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text[:300] or exc.__class__.__name__


@dataclass(frozen=True)
class _Target:
    """What the URL names: scheme, user, host, port and an optional single folder."""

    implicit_tls: bool
    user: str
    host: str
    port: int
    folder: str | None

    @classmethod
    def parse(cls, source: str) -> _Target:
        parts = urlsplit(source)
        scheme = parts.scheme.lower()
        if scheme not in ("imap", "imaps") or not parts.hostname:
            raise UsageError(f"{source}: expected imap://user@host[:port][/folder] or imaps://...")
        if not parts.username:
            raise UsageError(f"{source}: the URL names no user (imap://user@host)")
        try:
            port = parts.port or (993 if scheme == "imaps" else 143)
        except ValueError:
            raise UsageError(f"{source}: bad port") from None
        folder = unquote(parts.path.lstrip("/")) or None
        return cls(scheme == "imaps", unquote(parts.username), parts.hostname, port, folder)


class _Session:
    """One logged-in IMAPClient for one mailbox, and what it has selected."""

    def __init__(self, client: IMAPClient, mailbox: str):
        self.client = client
        self.mailbox = mailbox
        self.folder: str | None = None
        self.readonly = True
        self.uidvalidity = 0
        self.uidnext: int | None = None
        self.highestmodseq: int | None = None
        self.exists = 0
        self.qresync = False  # QRESYNC enabled on this connection

    def select(self, folder: str, readonly: bool = True) -> int:
        """Open ``folder`` (EXAMINE when ``readonly``) unless already open so; its UIDVALIDITY."""
        if self.folder != folder or self.readonly != readonly:
            self.folder = None
            self._opened(folder, readonly, self.client.select_folder(folder, readonly=readonly))
        return self.uidvalidity

    def examine_since(self, folder: str, uidvalidity: int, modseq: int) -> list[int]:
        """``EXAMINE folder (QRESYNC (uidvalidity modseq))`` (QRESYNC must be enabled): opens
        the folder read-only and returns the UIDs reported expunged since ``modseq`` (none when
        the UIDVALIDITY differs: check ``self.uidvalidity``). imapclient has no QRESYNC
        parameter for EXAMINE, so this goes through its imaplib connection."""
        self.folder = None
        imap = self.client._imap
        arg = self.client._normalise_folder(folder) + f" (QRESYNC ({uidvalidity} {modseq}))".encode()
        typ, data = imap.select(arg, True)
        if typ != "OK":
            raise imap_exc.IMAPClientError(f"EXAMINE failed: {data[0]!r}")
        untagged = imap.untagged_responses
        vanished = untagged.pop("VANISHED", [])
        untagged.pop("FETCH", None)  # flag changes since modseq: not needed, possibly many
        self._opened(folder, True, self.client._process_select_response(untagged))
        return parse_vanished(vanished)

    def _opened(self, folder: str, readonly: bool, info: dict) -> None:
        self.folder, self.readonly = folder, readonly
        self.uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        self.uidnext = info.get(b"UIDNEXT")
        self.highestmodseq = info.get(b"HIGHESTMODSEQ")
        self.exists = int(info.get(b"EXISTS", 0))

    def uid_fetch(self, uid_set: str, items: str) -> dict[int, dict]:
        """``UID FETCH uid_set items`` parsed by UID. imapclient's fetch() cannot take a
        compressed set, so this goes through its imaplib connection."""
        typ, data = self.client._imap.uid("FETCH", uid_set, items)
        if typ != "OK":
            raise imap_exc.IMAPClientError(f"FETCH failed: {data[0]!r}")
        return dict(parse_fetch_response(data, normalise_times=False, uid_is_key=True))

    def uid_fetch_listing(self, uid_set: str) -> dict[int, dict]:
        """``UID FETCH uid_set (UID RFC822.SIZE INTERNALDATE)`` parsed by UID, in the shape of
        ``uid_fetch``. The usual one-line answers are read with one regular expression (the
        token parser costs a third of an IMAP scan's main-process CPU); any other line goes
        through imapclient's parser."""
        typ, data = self.client._imap.uid("FETCH", uid_set, "(UID RFC822.SIZE INTERNALDATE)")
        if typ != "OK":
            raise imap_exc.IMAPClientError(f"FETCH failed: {data[0]!r}")
        found: dict[int, dict] = {}
        odd = []
        for item in data:
            m = _LISTING_LINE.match(item) if isinstance(item, bytes) else None
            date = _internaldate(m.group(3)) if m else None
            if m is None or date is None:
                odd.append(item)
                continue
            found[int(m.group(1))] = {b"RFC822.SIZE": int(m.group(2)), b"INTERNALDATE": date}
        if odd:
            for uid, fields in parse_fetch_response(odd, normalise_times=False, uid_is_key=True).items():
                found.setdefault(uid, fields)
        return found

    def uid_fetch_bodies(self, uid_set: str) -> dict[int, bytes]:
        """``UID FETCH uid_set (UID BODY.PEEK[])`` → UID: raw message. Reads imaplib's own
        literal handling directly: imapclient's token-by-token parser costs more CPU than the
        rest of a scan's main process on large fetches. Entries that are not a body with its
        UID (unsolicited FETCH responses, odd orderings) are left out; the caller fetches
        missing UIDs again."""
        typ, data = self.client._imap.uid("FETCH", uid_set, "(UID BODY.PEEK[])")
        if typ != "OK":
            raise imap_exc.IMAPClientError(f"FETCH failed: {data[0]!r}")
        bodies: dict[int, bytes] = {}
        for i, item in enumerate(data):
            if not isinstance(item, tuple) or b"BODY[]" not in item[0]:
                continue
            m = _FETCH_UID.search(item[0])
            if m is None and i + 1 < len(data) and isinstance(data[i + 1], bytes):
                m = _FETCH_UID.search(data[i + 1])  # UID after the literal
            if m is not None:
                bodies[int(m.group(1))] = item[1]
        return bodies

    def pop_copyuid(self) -> dict[int, int]:
        """Source UID → target UID from the last COPYUID response code (UIDPLUS), if any."""
        _, data = self.client._imap.response("COPYUID")
        mapping: dict[int, int] = {}
        for item in data or ():
            m = _COPYUID.match(item or b"")
            if m:
                src, dst = expand_uids(m.group(2).decode()), expand_uids(m.group(3).decode())
                mapping.update(zip(src, dst))
        return mapping

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.logout()
        with contextlib.suppress(Exception):
            self.client.shutdown()


@register("imap", "imaps")
class ImapConnector(Connector):
    """An IMAP account (or, with a master login, many mailboxes) reached over imapclient.

    Takes the source URL and ``SourceOptions``; raises UsageError for a malformed URL or
    unusable options. Connections open lazily, one per thread and mailbox."""

    max_connections = 4
    # UIDs per enumeration window: a UID FETCH of 5,000 (UID RFC822.SIZE INTERNALDATE) lines
    # is ~400 kB, far below imaplib's 1 MB line limit and cheap to hold in memory.
    uid_window = 5000
    # Reconnect attempts after a drop, waiting backoff * 2**n seconds before attempt n.
    retries = 3
    backoff = 0.5
    connect_timeout = 15.0
    read_timeout = 120.0

    def __init__(self, source: str, options: SourceOptions):
        super().__init__(source, options)
        self.target = _Target.parse(source)
        self.max_connections = max(1, options.connections)
        extra = options.extra
        self.master_user = extra.get("master_user")
        self.master_separator = extra.get("master_separator", "*")
        self.auth = extra.get("auth", "").lower() or ("oauth" if options.token else "login")
        if self.auth not in ("login", "plain", "xoauth2", "oauthbearer", "oauth"):
            raise UsageError(f"{source}: unknown auth {self.auth!r} (login, plain, xoauth2, oauthbearer)")
        if self.auth.startswith(("oauth", "xoauth")) and options.token is None:
            raise UsageError(f"{source}: OAuth2 login needs a token")
        if self.master_user and not options.mailboxes:
            raise UsageError(f"{source}: a master login needs the list of mailboxes")
        try:
            self.uid_window = int(extra.get("uid_window", self.uid_window))
            self.read_timeout = float(extra.get("timeout", self.read_timeout))
        except ValueError:
            raise UsageError(f"{source}: uid_window and timeout must be numbers") from None
        self._ssl_context = self._make_ssl_context()
        self._local = threading.local()
        self._sessions: list[_Session] = []
        self._lock = threading.Lock()
        self._cursors: dict[tuple[str, str], str] = {}  # (mailbox, folder) -> cursor

    # -- connections ---------------------------------------------------------------------

    def _make_ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.options.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"{self.source}: cannot load ca_file {self.options.ca_file}: {exc}") from None
        if self.options.insecure:
            log.warning("%s: TLS certificate verification is OFF (insecure); the connection "
                        "can be intercepted", self.source)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _context(self, mailbox: str | None = None, folder: str | None = None) -> str:
        where = self.source
        if mailbox and mailbox != self.target.user:
            where += f" mailbox {mailbox}"
        return f"{where} folder {folder}" if folder else where

    def _connect(self, mailbox: str) -> _Session:
        t = self.target
        with map_imap_errors(self._context(mailbox)):
            client = IMAPClient(
                t.host, t.port, ssl=t.implicit_tls, ssl_context=self._ssl_context,
                timeout=SocketTimeout(self.connect_timeout, self.read_timeout),
            )
            # imapclient turns on imaplib's protocol trace (debug level 5) and sends it to a
            # logger: every response, message bodies included, is formatted into a string
            # that is then dropped, and a LOGIN line would carry the password. Off.
            client._imap.debug = 0
            try:
                client.normalise_times = False
                tls = t.implicit_tls
                if not tls and client.has_capability("STARTTLS"):
                    client.starttls(self._ssl_context)
                    tls = True
                if not password_allowed(client.socket().getpeername()[0], tls):
                    raise SourceError(
                        f"{self._context(mailbox)}: the server offers no TLS; refusing to send "
                        "credentials in clear text to a non-loopback address (use imaps://)")
                self._login(client, mailbox)
                # Enabled at once: ENABLE is only valid before a folder is selected (RFC 5161).
                qresync = (client.has_capability("QRESYNC") and client.has_capability("ENABLE")
                           and b"QRESYNC" in {c.upper() for c in client.enable("QRESYNC")})
            except BaseException:
                with contextlib.suppress(Exception):
                    client.shutdown()
                raise
        session = _Session(client, mailbox)
        session.qresync = qresync
        with self._lock:
            self._sessions.append(session)
        return session

    def _login(self, client: IMAPClient, mailbox: str) -> None:
        opts = self.options
        user = mailbox
        if self.master_user:
            user = f"{mailbox}{self.master_separator}{self.master_user}"
        auth = self.auth
        if auth == "oauth":
            auth = "oauthbearer" if client.has_capability("AUTH=OAUTHBEARER") else "xoauth2"
        if auth in ("xoauth2", "oauthbearer"):
            if auth == "xoauth2":
                client.oauth2_login(user, opts.token.reveal())
            else:
                client.oauthbearer_login(user, opts.token.reveal())
            return
        if opts.password is None:
            raise UsageError(f"{self.source}: no password given")
        if auth == "plain":
            client.plain_login(user, opts.password.reveal())
        else:
            client.login(user, opts.password.reveal())

    def _session(self, mailbox: str) -> _Session:
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        if mailbox not in sessions:
            sessions[mailbox] = self._connect(mailbox)
        return sessions[mailbox]

    def _drop(self, mailbox: str) -> None:
        session = getattr(self._local, "sessions", {}).pop(mailbox, None)
        if session is not None:
            with self._lock:
                if session in self._sessions:
                    self._sessions.remove(session)
            session.close()

    def _retrying(self, mailbox: str, folder: str | None, op: Callable[[_Session], T]) -> T:
        """``op(session)``; after a TransientError, reconnect with backoff and run it again.
        Raises the last TransientError when every attempt failed; other errors at once."""
        context = self._context(mailbox, folder)
        for attempt in range(self.retries + 1):
            try:
                session = self._session(mailbox)
                with map_imap_errors(context):
                    return op(session)
            except TransientError as exc:
                self._drop(mailbox)
                if attempt == self.retries:
                    raise
                delay = self.backoff * 2**attempt
                log.info("%s; reconnecting in %.1f s", exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Log out of every connection (of every thread). Idempotent."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    # -- enumeration ---------------------------------------------------------------------

    def mailboxes(self) -> list[str]:
        """The login user, or ``options.mailboxes`` for a master login."""
        if self.master_user:
            return list(self.options.mailboxes)
        return [self.target.user]

    def folders(self, mailbox: str) -> list[str]:
        """Selectable folders (no ``\\Noselect``), filtered by include/exclude globs, sorted
        with INBOX first; only the URL's folder when it names one. Raises SourceError."""
        if self.target.folder:
            return [self.target.folder]
        listing = self._retrying(mailbox, None, lambda s: s.client.list_folders())
        names = [name for flags, _, name in listing
                 if not {f.lower() for f in flags} & {b"\\noselect", b"\\nonexistent"}]
        inc, exc = self.options.include, self.options.exclude
        names = [n for n in names
                 if (not inc or any(fnmatch.fnmatchcase(n, g) for g in inc))
                 and not any(fnmatch.fnmatchcase(n, g) for g in exc)]
        return sorted(set(names), key=lambda n: (n.upper() != "INBOX", n))

    def refs(self, mailbox: str, folder: str) -> Iterator[list[MessageRef]]:
        """Every message of ``folder`` in UID order, one batch per UID window.

        ``version`` is ``"UIDVALIDITY:UID"``, ``size`` RFC822.SIZE, ``date`` INTERNALDATE.
        Once the listing ran to its end, ``cursor(mailbox, folder)`` gives the folder's cursor
        as it was when the listing began. Raises SourceError when the folder cannot be listed
        (after reconnect attempts) or its UIDVALIDITY changes during the listing."""
        key = (mailbox, folder)
        with self._lock:
            self._cursors.pop(key, None)
        uidvalidity, top, cursor = self._retrying(mailbox, folder, lambda s: self._open_for_listing(s, folder))
        yield from self._listing(mailbox, folder, uidvalidity, 1, top)
        with self._lock:
            self._cursors[key] = str(cursor)

    def cursor(self, mailbox: str, folder: str) -> str | None:
        """``UIDVALIDITY:UIDNEXT[:HIGHESTMODSEQ]`` of ``folder`` when the last ``refs()``
        listing of it began, or None when that listing did not run to its end."""
        with self._lock:
            return self._cursors.get((mailbox, folder))

    def changes(self, mailbox: str, folder: str, cursor: str) -> FolderChanges | None:
        """New messages (UIDs from the cursor's UIDNEXT up) and UIDs expunged since
        ``cursor`` (QRESYNC ``VANISHED (EARLIER)``), or None when this cannot be told: a
        malformed cursor or one without HIGHESTMODSEQ, a server without QRESYNC, a new
        UIDVALIDITY, a folder without HIGHESTMODSEQ. Raises SourceError when the folder cannot
        be opened."""
        old = ImapCursor.parse(cursor)
        if old is None or old.modseq is None:
            return None

        def probe(s: _Session) -> tuple[ImapCursor, int, list[int]] | None:
            if not s.qresync:
                return None
            gone = s.examine_since(folder, old.uidvalidity, old.modseq)
            if s.uidvalidity != old.uidvalidity or s.highestmodseq is None or not s.uidnext:
                return None
            new = ImapCursor(s.uidvalidity, int(s.uidnext), int(s.highestmodseq))
            return new, (int(s.uidnext) - 1 if s.exists else 0), gone

        found = self._retrying(mailbox, folder, probe)
        if found is None:
            return None
        new, top, gone = found
        return FolderChanges(
            self._listing(mailbox, folder, new.uidvalidity, old.uidnext, top),
            tuple(str(uid) for uid in gone),
            str(new),
        )

    def _listing(self, mailbox: str, folder: str, uidvalidity: int, lo: int,
                 top: int) -> Iterator[list[MessageRef]]:
        """The messages with UIDs ``lo..top`` in windows of ``uid_window`` UIDs."""
        while lo <= top:
            hi = min(top, lo + self.uid_window - 1)

            def window(s: _Session, lo=lo, hi=hi) -> dict[int, dict]:
                if s.select(folder) != uidvalidity:
                    raise SourceError(f"{self._context(mailbox, folder)}: UIDVALIDITY changed "
                                      "during the listing; list the folder again")
                return s.uid_fetch_listing(f"{lo}:{hi}")

            found = self._retrying(mailbox, folder, window)
            batch = []
            # lo:hi may answer with the last message even when every UID in it is gone.
            for uid in sorted(u for u in found if lo <= u <= hi and b"RFC822.SIZE" in found[u]):
                data = found[uid]
                date = data.get(b"INTERNALDATE")
                batch.append(MessageRef(
                    self.source, mailbox, folder, str(uid), f"{uidvalidity}:{uid}",
                    int(data[b"RFC822.SIZE"]), date.isoformat() if date else None))
            if batch:
                yield batch
            lo = hi + 1

    def _open_for_listing(self, s: _Session, folder: str) -> tuple[int, int, ImapCursor]:
        """EXAMINE ``folder``; (UIDVALIDITY, highest UID to list, the folder's cursor)."""
        s.folder = None  # always re-examine: a fresh UIDNEXT and EXISTS
        uidvalidity = s.select(folder)
        modseq = int(s.highestmodseq) if s.highestmodseq is not None else None
        if not s.exists:
            top = 0
        elif s.uidnext:
            top = int(s.uidnext) - 1
        else:
            top = max(s.uid_fetch("*", "(UID)"), default=0)
        uidnext = int(s.uidnext) if s.uidnext else top + 1
        return uidvalidity, top, ImapCursor(uidvalidity, uidnext, modseq)

    # -- fetching ------------------------------------------------------------------------

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes | Exception]]:
        """Raw bytes of each ref with ``BODY.PEEK[]``, in batches bounded by
        ``options.batch_bytes`` and ``options.batch_count``. A ref whose message is gone, whose
        UIDVALIDITY changed or whose folder keeps failing is yielded with a FetchError.
        Raises AuthError when a reconnect is refused."""
        groups: dict[tuple[str, str], list[MessageRef]] = {}
        for ref in refs:
            groups.setdefault((ref.mailbox, ref.folder), []).append(ref)
        for (mailbox, folder), group in groups.items():
            for batch in self._batches(group):
                yield from self._fetch_batch(mailbox, folder, batch)

    def _batches(self, refs: list[MessageRef]) -> Iterator[list[MessageRef]]:
        batch: list[MessageRef] = []
        size = 0
        for ref in refs:
            ref_size = ref.size or 0
            if batch and (len(batch) >= self.options.batch_count
                          or size + ref_size > self.options.batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(ref)
            size += ref_size
        if batch:
            yield batch

    def _fetch_batch(self, mailbox: str, folder: str, batch: list[MessageRef]):
        pending: dict[int, list[MessageRef]] = {}
        out: list[tuple[MessageRef, bytes | Exception]] = []
        for ref in batch:
            uid = _parse_version(ref)[1]
            if uid is None:
                out.append((ref, FetchError(f"{ref.id}: not an IMAP version token")))
            else:
                pending.setdefault(uid, []).append(ref)

        def run(s: _Session) -> None:
            uidvalidity = s.select(folder)
            for uid, refs in list(pending.items()):
                for ref in [r for r in refs if _parse_version(r)[0] != uidvalidity]:
                    out.append((ref, FetchError(f"{folder} UID {uid}: UIDVALIDITY changed")))
                    refs.remove(ref)
                if not refs:
                    del pending[uid]
            for _ in range(2):  # the second pass picks up UIDs an odd response left out
                if not pending:
                    return
                got = s.uid_fetch_bodies(compress_uids(list(pending)))
                for uid in list(pending):
                    body = got.get(uid)
                    if isinstance(body, bytes):
                        out.extend((ref, body) for ref in pending.pop(uid))

        try:
            self._retrying(mailbox, folder, run)
        except AuthError:
            raise
        except SourceError as exc:
            out.extend((ref, FetchError(str(exc))) for refs in pending.values() for ref in refs)
            pending.clear()
        out.extend((ref, FetchError(f"{folder} UID {uid}: message not found (expunged?)"))
                   for uid, refs in pending.items() for ref in refs)
        return out

    # -- actions -------------------------------------------------------------------------

    def tag(self, refs: Sequence[MessageRef], keyword: str) -> list[ActionResult]:
        """Add ``keyword`` to each message (``UID STORE +FLAGS.SILENT``). Raises ActionError
        for a keyword that is not an IMAP atom."""
        if not _KEYWORD.match(keyword.lstrip("\\")):
            raise ActionError(f"{keyword!r} is not a valid IMAP keyword")

        def act(s: _Session, present: dict[int, MessageRef], folder: str) -> list[ActionResult]:
            s.client.add_flags(compress_uids(list(present)), [keyword], silent=True)
            return [ActionResult(r, True, f"tagged {keyword}", new_id=r.id) for r in present.values()]

        return self._act(refs, act)

    def quarantine(self, refs: Sequence[MessageRef], folder: str) -> list[ActionResult]:
        """Move each message to ``folder`` (created if missing): MOVE where offered, else
        COPY, verify the copy (COPYUID, or Message-ID and size in the target), flag
        ``\\Deleted`` and UID EXPUNGE only those UIDs (not expunged without UIDPLUS).
        ``new_id`` is the UID in ``folder`` when known. The original stays on any failure."""

        def act(s: _Session, present: dict[int, MessageRef], source: str) -> list[ActionResult]:
            return self._move(s, present, source, folder)

        return self._act(refs, act)

    def delete(self, refs: Sequence[MessageRef], hard: bool = False) -> list[ActionResult]:
        """Move each message to the trash (SPECIAL-USE ``\\Trash``, else ``Trash``), or with
        ``hard`` flag it ``\\Deleted`` and UID EXPUNGE it (needs UIDPLUS)."""
        if not hard:
            results: list[ActionResult] = []
            for mailbox in dict.fromkeys(r.mailbox for r in refs):
                mine = [r for r in refs if r.mailbox == mailbox]
                trash = self._retrying(mailbox, None, _trash_folder)
                results += self._act(mine, lambda s, p, src: self._move(s, p, src, trash))
            return results

        def act(s: _Session, present: dict[int, MessageRef], folder: str) -> list[ActionResult]:
            uids = compress_uids(list(present))
            s.client.add_flags(uids, [b"\\Deleted"], silent=True)
            if not s.client.has_capability("UIDPLUS"):
                return [ActionResult(r, False, "flagged \\Deleted but not expunged: the server "
                                     "lacks UIDPLUS") for r in present.values()]
            s.client.uid_expunge(uids)
            return [ActionResult(r, True, "deleted") for r in present.values()]

        return self._act(refs, act)

    def _act(self, refs: Sequence[MessageRef],
             act: Callable[[_Session, dict[int, MessageRef], str], list[ActionResult]]
             ) -> list[ActionResult]:
        """Group refs by folder, SELECT it read-write, keep the refs whose UID still exists
        under the same UIDVALIDITY, and run ``act`` on them. Failures become ok=False."""
        results: list[ActionResult] = []
        groups: dict[tuple[str, str], list[MessageRef]] = {}
        for ref in refs:
            groups.setdefault((ref.mailbox, ref.folder), []).append(ref)
        for (mailbox, folder), group in groups.items():
            try:
                results += self._retrying(mailbox, folder, lambda s: self._act_on(s, folder, group, act))
            except AuthError:
                raise
            except SourceError as exc:
                results += [ActionResult(r, False, f"nothing done: {exc}") for r in group]
        return results

    def _act_on(self, s: _Session, folder: str, group: list[MessageRef], act) -> list[ActionResult]:
        uidvalidity = s.select(folder, readonly=False)
        results: list[ActionResult] = []
        wanted: dict[int, MessageRef] = {}
        for ref in group:
            uv, uid = _parse_version(ref)
            if uid is None or uv != uidvalidity:
                results.append(ActionResult(ref, False, "nothing done: the folder's UIDVALIDITY "
                                            "changed since the scan"))
            else:
                wanted[uid] = ref
        if wanted:
            exists = s.uid_fetch(compress_uids(list(wanted)), "(UID)")
            present = {u: r for u, r in wanted.items() if u in exists}
            results += [ActionResult(r, False, "nothing done: the message is no longer there")
                        for u, r in wanted.items() if u not in exists]
            if present:
                results += act(s, present, folder)
        s.select(folder)  # back to read-only for scanning on this connection
        return results

    def _move(self, s: _Session, present: dict[int, MessageRef], source: str,
              target: str) -> list[ActionResult]:
        """Move ``present`` from the selected ``source`` to ``target``: copy, verify, delete."""
        if target == source:
            return [ActionResult(r, False, f"nothing done: already in {target}") for r in present.values()]
        client = s.client
        if not client.folder_exists(target):
            client.create_folder(target)
        uids = compress_uids(list(present))
        idents = s.uid_fetch(uids, "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        self._copyuid(s)  # forget stale response codes
        if client.has_capability("MOVE"):
            client.move(uids, target)
            moved = self._copyuid(s)
            missing = {u: r for u, r in present.items() if u not in moved}
            found = self._find_copies(s, missing, idents, target, source) if missing else {}
            out = []
            for uid, ref in present.items():
                new = moved.get(uid) or found.get(uid)
                detail = f"moved to {target}" if new else f"moved to {target}; the copy was not found there"
                out.append(ActionResult(ref, bool(new), detail, new_id=str(new) if new else None))
            return out
        client.copy(uids, target)
        copies = self._copyuid(s)
        missing = {u: r for u, r in present.items() if u not in copies}
        if missing:
            copies.update(self._find_copies(s, missing, idents, target, source))
        out = [ActionResult(r, False, f"copy to {target} not confirmed; original left in place")
               for u, r in present.items() if u not in copies]
        verified = [u for u in present if u in copies]
        if not verified:
            return out
        vset = compress_uids(verified)
        client.add_flags(vset, [b"\\Deleted"], silent=True)
        if client.has_capability("UIDPLUS"):
            client.uid_expunge(vset)
            detail = f"moved to {target}"
        else:
            detail = (f"copied to {target}; original flagged \\Deleted, not expunged "
                      "(the server lacks UIDPLUS)")
        return out + [ActionResult(present[u], True, detail, new_id=str(copies[u])) for u in verified]

    def _copyuid(self, s: _Session) -> dict[int, int]:
        """Source UID → target UID from the last COPYUID response code (UIDPLUS), if any."""
        return s.pop_copyuid()

    def _find_copies(self, s: _Session, refs: dict[int, MessageRef], idents: dict[int, dict],
                     target: str, source: str) -> dict[int, int]:
        """Source UID → UID in ``target`` of a message with the same Message-ID and size."""
        client = s.client
        found: dict[int, int] = {}
        s.select(target)
        try:
            for uid in refs:
                data = idents.get(uid, {})
                header = data.get(b"BODY[HEADER.FIELDS (MESSAGE-ID)]") or b""
                m = re.search(rb"(?im)^message-id:\s*(\S+)", header)
                size = data.get(b"RFC822.SIZE")
                if not m or size is None:
                    continue
                hits = client.search(["HEADER", "Message-ID", m.group(1).decode("ascii", "replace"),
                                      "LARGER", str(int(size) - 1), "SMALLER", str(int(size) + 1)])
                if hits:
                    found[uid] = max(hits)
        finally:
            s.select(source, readonly=False)
        return found


def _trash_folder(s: _Session) -> str:
    """The folder flagged SPECIAL-USE ``\\Trash``, else ``Trash``."""
    for flags, _, name in s.client.list_folders():
        if b"\\Trash" in flags:
            return name
    return "Trash"


def _parse_version(ref: MessageRef) -> tuple[int | None, int | None]:
    uv, _, uid = ref.version.partition(":")
    try:
        return int(uv), int(uid)
    except ValueError:
        return None, None
