"""Exchange Web Services (on-premises Exchange 2016, 2019, SE) through exchangelib.

Sources: ``ews://user@host/EWS/Exchange.asmx`` (HTTPS, certificates verified; ``ca_file``,
``insecure``), ``ews://user@domain`` with ``extra["autodiscover"] == "1"``, and
``ews+http://user@127.0.0.1:PORT/EWS/Exchange.asmx`` (plain HTTP, loopback only, for tests).

``SourceOptions.extra`` keys: ``auth`` (``basic`` or ``ntlm``; default ``ntlm`` for ``ews://``,
``basic`` for ``ews+http://``), ``client_id`` + ``tenant_id`` (OAuth2 client credentials; the
client secret is ``options.password``; optional ``token_url``), ``autodiscover`` (``"1"``),
``access`` (``impersonation`` or ``delegate``; default impersonation when ``options.mailboxes``
names other mailboxes), ``page_size`` (FindItem page size). A bearer token in
``options.token`` is used as is.

Faults: exchangelib runs with a fail-fast retry policy, so nothing inside it sleeps for every
thread at once and a 401 is an ``AuthError`` at once. This module retries transient faults
itself, in the calling thread: ``ErrorServerBusy`` waits ``BackOffMilliseconds`` for that
mailbox only; dropped connections and HTTP 5xx are retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from threading import Lock
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import unquote, urlsplit

import requests
from exchangelib import (
    BASIC,
    DELEGATE,
    IMPERSONATION,
    NTLM,
    OAUTH2,
    Account,
    Build,
    Configuration,
    Credentials,
    FailFast,
    Identity,
    OAuth2AuthorizationCodeCredentials,
    OAuth2Credentials,
    Version,
)
from exchangelib import errors as ex
from exchangelib.folders import Folder, FolderCollection
from exchangelib.items import HARD_DELETE
from exchangelib.properties import ItemId
from exchangelib.protocol import BaseProtocol
from exchangelib.services.common import EWSService
from oauthlib.oauth2 import OAuth2Error, OAuth2Token

from connectors.base import ActionResult, Connector, SourceOptions, register
from rescan.errors import AuthError, FetchError, RescanError, SourceError, TransientError, UsageError
from rescan.models import MessageRef

log = logging.getLogger(__name__)
T = TypeVar("T")

RESPONSE_CHUNK = 64 * 1024  # bytes read at a time while parsing a SOAP response


class _ChunkedResponse:
    """A requests response whose ``iter_content()`` yields 64 KiB at a time.

    exchangelib parses every SOAP response through ``response.iter_content()``, which in
    requests defaults to one byte per chunk: a GetItem page of MIME content then costs about
    200 times more CPU to read than to parse (0.4 s against 2 ms for 667 kB here)."""

    def __init__(self, response: requests.Response):
        self._response = response

    def iter_content(self) -> Iterator[bytes]:
        return self._response.iter_content(RESPONSE_CHUNK)

    def __getattr__(self, name: str):
        return getattr(self._response, name)


def _read_in_chunks(parse: Callable) -> classmethod:
    def get_soap_parts(cls, response):
        if isinstance(response, requests.Response):
            response = _ChunkedResponse(response)
        return parse(cls, response)

    return classmethod(get_soap_parts)


if not getattr(EWSService._get_soap_parts, "_rescan_chunked", False):
    EWSService._get_soap_parts = _read_in_chunks(EWSService._get_soap_parts.__func__)
    EWSService._get_soap_parts.__func__._rescan_chunked = True

# Requests this module treats as "try again later" (after the fail-fast policy raised them).
_TRANSIENT = (
    ex.ErrorServerBusy,
    ex.ErrorTimeoutExpired,
    ex.ErrorInternalServerTransientError,
    ex.ErrorTooManyObjectsOpened,
    ex.ErrorMailboxStoreUnavailable,
    ex.ErrorExceededConnectionCount,
    ex.MalformedResponseError,  # a bare HTTP 5xx page instead of SOAP
    requests.ConnectionError,
    requests.Timeout,
)
_AUTH = (ex.UnauthorizedError, ex.ErrorImpersonateUserDenied, ex.ErrorAccessDenied, ex.ErrorInvalidLicense)
_GONE = (ex.ErrorItemNotFound, ex.ErrorInvalidIdMalformed, ex.ErrorInvalidIdNotAnItemAttachmentId)


@contextlib.contextmanager
def map_ews_errors(where: str) -> Iterator[None]:
    """Translate exchangelib and requests errors into ``rescan.errors``; the one boundary.

    Takes ``where`` (source URL or mailbox, never with a secret) for the message. Raises
    AuthError for refused credentials, TransientError (with ``retry_after`` from
    ``BackOffMilliseconds``) for faults worth retrying, SourceError for the rest. Messages
    carry the EWS response code and never a request or response body."""
    try:
        yield
    except RescanError:
        raise
    except (*_AUTH, OAuth2Error) as e:
        raise AuthError(f"{where}: credentials or permissions refused ({type(e).__name__})") from None
    except ex.ErrorServerBusy as e:
        # exchangelib also raises ErrorServerBusy for its own connection faults; only the
        # server's own fault carries a back-off we must honour.
        own = str(e).startswith(("Reraised from", "Caused by"))
        raise TransientError(f"{where}: server busy", None if own else e.back_off) from None
    except _TRANSIENT as e:
        raise TransientError(f"{where}: {type(e).__name__}") from None
    except ex.TransportError as e:
        raise SourceError(f"{where}: cannot reach the server ({type(e).__name__})") from None
    except ex.ResponseMessageError as e:
        raise SourceError(f"{where}: {type(e).__name__}: {e}") from None
    except (ex.EWSError, requests.RequestException, ValueError) as e:
        raise SourceError(f"{where}: {type(e).__name__}") from None


class _TLSAdapter(requests.adapters.HTTPAdapter):
    """Applies each endpoint's certificate policy (CA file, or none at all when insecure).
    exchangelib takes one adapter class for the whole process, hence the registry."""

    verify_by_host: dict[str, bool | str] = {}

    def send(self, request, **kwargs):
        host = urlsplit(request.url).netloc.lower()
        if host in self.verify_by_host:
            kwargs["verify"] = self.verify_by_host[host]
        return super().send(request, **kwargs)


class _ClientCredentials(OAuth2Credentials):
    """OAuth2 client credentials whose token endpoint can be set (ADFS, sovereign clouds)."""

    def __init__(self, *args, token_url: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._token_url = token_url

    @property
    def token_url(self) -> str:
        return self._token_url or super().token_url


def _in_order(refs: Sequence[MessageRef], results: list[ActionResult]) -> list[ActionResult]:
    position = {ref.key: n for n, ref in enumerate(refs)}
    return sorted(results, key=lambda r: position[r.ref.key])


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@register("ews", "ews+http")
class EWSConnector(Connector):
    """Connector for Exchange Web Services. See the module docstring for sources and options.

    Raises UsageError for a malformed source or missing credentials; SourceError subclasses
    when the server cannot be used. No request is made before the first listing."""

    max_connections = 4  # Exchange's default EWS throttling budget allows ~10 per user; stay well under
    PAGE_SIZE = 100  # FindItem page size: exchangelib's default, small enough for slow servers
    RETRIES = 5  # attempts after the first, for transient faults
    RETRY_BASE = 0.5  # seconds, doubled on each retry of a connection fault
    MAX_BACK_OFF = 300.0  # longest server-requested wait we accept before giving up
    EXCHANGE_BUILD = Build(15, 1)  # Exchange 2016 schema: understood by 2016, 2019 and SE

    def __init__(self, source: str, options: SourceOptions):
        super().__init__(source, options)
        url = urlsplit(source)
        scheme = url.scheme.lower()
        host = url.hostname or ""
        self.user = unquote(url.username or "")
        if not self.user or not host:
            raise UsageError(f"{source}: an EWS source needs user@host")
        if scheme == "ews+http" and not _is_loopback(host):
            raise UsageError(f"{source}: ews+http:// (no TLS) is accepted only to a loopback address")
        self.autodiscover = options.extra.get("autodiscover") == "1"
        http = "http" if scheme == "ews+http" else "https"
        netloc = host if url.port is None else f"{host}:{url.port}"
        self.endpoint = f"{http}://{netloc}{url.path or '/EWS/Exchange.asmx'}"
        self.page_size = int(options.extra.get("page_size", self.PAGE_SIZE))
        self.max_connections = max(1, options.connections)
        self._default_mailbox = self.user if "@" in self.user else ("" if "\\" in self.user else f"{self.user}@{host}")
        if not options.mailboxes and not self._default_mailbox:
            raise UsageError(f"{source}: a DOMAIN\\user login needs the mailboxes to scan")
        self._setup_tls(http, netloc.lower())
        self._config = self._configuration(http)
        self._accounts: dict[str, Account] = {}
        self._trees: dict[str, dict[str, Folder]] = {}
        self._lock = Lock()
        self._sleep = time.sleep

    # ---- connection -----------------------------------------------------------------------
    def _setup_tls(self, http: str, netloc: str) -> None:
        if http != "https" or not (self.options.insecure or self.options.ca_file):
            return
        if self.options.insecure:
            log.warning(
                "%s: TLS CERTIFICATE VERIFICATION IS DISABLED (--insecure): anyone on the path can read "
                "this mailbox and the credentials",
                self.source,
            )
        _TLSAdapter.verify_by_host[netloc] = False if self.options.insecure else self.options.ca_file
        BaseProtocol.HTTP_ADAPTER_CLS = _TLSAdapter

    def _configuration(self, http: str) -> Configuration:
        o, extra = self.options, self.options.extra
        if o.token is not None:
            creds = OAuth2AuthorizationCodeCredentials(
                access_token=OAuth2Token({"access_token": o.token.reveal(), "token_type": "Bearer"})
            )
            auth = OAUTH2
        elif extra.get("client_id"):
            if o.password is None or not extra.get("tenant_id"):
                raise UsageError(f"{self.source}: OAuth2 client credentials need tenant_id and the client secret")
            creds = _ClientCredentials(
                client_id=extra["client_id"],
                client_secret=o.password.reveal(),
                tenant_id=extra["tenant_id"],
                identity=Identity(primary_smtp_address=self._default_mailbox or None),
                token_url=extra.get("token_url"),
            )
            auth = OAUTH2
        else:
            if o.password is None:
                raise UsageError(f"{self.source}: no password given (use --password-env or --password-file)")
            kind = extra.get("auth", "basic" if http == "http" else "ntlm").lower()
            if kind not in ("basic", "ntlm"):
                raise UsageError(f"{self.source}: auth must be basic or ntlm, not {kind!r}")
            creds = Credentials(self.user, o.password.reveal())
            auth = BASIC if kind == "basic" else NTLM
        if auth == OAUTH2 and http == "http" and not os.environ.get("OAUTHLIB_INSECURE_TRANSPORT"):
            raise UsageError(
                f"{self.source}: OAuth2 needs https (for a loopback test server set OAUTHLIB_INSECURE_TRANSPORT=1)"
            )
        if self.autodiscover:
            return Configuration(credentials=creds, auth_type=auth, retry_policy=FailFast(),
                                 max_connections=self.max_connections)
        return Configuration(
            service_endpoint=self.endpoint,
            credentials=creds,
            auth_type=auth,
            version=Version(build=self.EXCHANGE_BUILD),
            retry_policy=FailFast(),
            max_connections=self.max_connections,
        )

    def _account(self, mailbox: str) -> Account:
        with self._lock:
            if mailbox not in self._accounts:
                access = self.options.extra.get("access")
                if access is None:
                    access = IMPERSONATION if mailbox.lower() != self._default_mailbox.lower() else DELEGATE
                if access not in (IMPERSONATION, DELEGATE):
                    raise UsageError(f"{self.source}: access must be impersonation or delegate")
                with map_ews_errors(mailbox):
                    self._accounts[mailbox] = Account(
                        primary_smtp_address=mailbox, config=self._config,
                        autodiscover=self.autodiscover, access_type=access,
                    )
            return self._accounts[mailbox]

    def _retrying(self, where: str, call: Callable[[], T]) -> T:
        """Run ``call`` under ``map_ews_errors``, retrying TransientError in this thread only:
        the server's back-off when it gave one, else exponential backoff from RETRY_BASE."""
        delay = self.RETRY_BASE
        for attempt in range(self.RETRIES + 1):
            try:
                with map_ews_errors(where):
                    return call()
            except TransientError as e:
                wait_for = e.retry_after if e.retry_after is not None else delay
                if attempt == self.RETRIES or wait_for > self.MAX_BACK_OFF:
                    raise
                log.info("%s: %s; retrying in %.1fs", where, e, wait_for)
                self._sleep(wait_for)
                if e.retry_after is None:
                    delay *= 2
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close every session of the shared protocol."""
        with self._lock:
            accounts, self._accounts = list(self._accounts.values()), {}
        for account in accounts[:1]:  # accounts share one protocol
            with contextlib.suppress(Exception):
                account.protocol.close()

    # ---- enumeration ---------------------------------------------------------------------
    def mailboxes(self) -> list[str]:
        """The mailboxes in ``options.mailboxes``, else the login's own mailbox."""
        return list(self.options.mailboxes) or [self._default_mailbox]

    def _tree(self, mailbox: str, refresh: bool = False) -> dict[str, Folder]:
        """Mail folders under msgfolderroot by path (``Inbox/Sub``), sorted by path."""
        if refresh or mailbox not in self._trees:
            account = self._account(mailbox)

            def walk() -> dict[str, Folder]:
                root = account.msg_folder_root
                found = list(FolderCollection(account=account, folders=[root]).find_folders(depth="Deep"))
                by_id = {f.id: f for f in found}

                def path(f: Folder) -> str:
                    parent = by_id.get(f.parent_folder_id.id) if f.parent_folder_id else None
                    return f"{path(parent)}/{f.name}" if parent else f.name

                mail = (f for f in found if f.folder_class is None or f.folder_class.startswith("IPF.Note"))
                return dict(sorted((path(f), f) for f in mail))

            self._trees[mailbox] = self._retrying(mailbox, walk)
        return self._trees[mailbox]

    def folders(self, mailbox: str) -> list[str]:
        """Paths of the mail folders of ``mailbox``, filtered by ``include``/``exclude`` globs."""
        inc, exc = self.options.include, self.options.exclude
        return [
            p for p in self._tree(mailbox)
            if (not inc or any(fnmatch.fnmatchcase(p, g) for g in inc))
            and not any(fnmatch.fnmatchcase(p, g) for g in exc)
        ]

    def _folder(self, mailbox: str, path: str) -> Folder:
        tree = self._tree(mailbox)
        if path not in tree:
            tree = self._tree(mailbox, refresh=True)
        if path not in tree:
            raise SourceError(f"{mailbox}: no folder {path!r}")
        return tree[path]

    def refs(self, mailbox: str, folder: str) -> Iterator[list[MessageRef]]:
        """The folder's messages in batches of ``batch_count``. Every id is listed (paged by
        ``page_size``) before the first batch is yielded: a snapshot, so messages that move
        while earlier batches are fetched do not shift the paging and hide others."""
        target = self._folder(mailbox, folder)

        def listing() -> list:
            qs = target.all().only("id", "changekey", "size", "datetime_received")
            qs.page_size = self.page_size
            return [(i.id, i.changekey, i.size, i.datetime_received) for i in qs]

        snapshot = self._retrying(f"{mailbox}/{folder}", listing)
        batch: list[MessageRef] = []
        for item_id, changekey, size, received in snapshot:
            date = received.isoformat() if received else None
            batch.append(MessageRef(self.source, mailbox, folder, item_id, f"{item_id}:{changekey}", size, date))
            if len(batch) >= self.options.batch_count:
                yield batch
                batch = []
        if batch:
            yield batch

    # ---- fetching ------------------------------------------------------------------------
    def _batches(self, refs: Sequence[MessageRef]) -> list[list[MessageRef]]:
        out: list[list[MessageRef]] = []
        size = 0
        for ref in refs:
            n = ref.size or 0
            if not out or len(out[-1]) >= self.options.batch_count or (out[-1] and size + n > self.options.batch_bytes):
                out.append([])
                size = 0
            out[-1].append(ref)
            size += n
        return out

    def _fetch_batch(self, mailbox: str, batch: list[MessageRef]) -> list[tuple[MessageRef, bytes | Exception]]:
        account = self._account(mailbox)
        ids = [ItemId(id=r.id) for r in batch]
        try:
            got = self._retrying(mailbox, lambda: list(account.fetch(ids=ids, only_fields=["mime_content"])))
        except AuthError:
            raise
        except SourceError as e:
            return [(r, FetchError(f"{r.id}: {e}")) for r in batch]
        out: list[tuple[MessageRef, bytes | Exception]] = []
        for ref, item in zip(batch, got):
            if isinstance(item, _GONE):
                out.append((ref, FetchError(f"{mailbox}/{ref.folder}: message gone (moved or deleted since listing)")))
            elif isinstance(item, Exception):
                out.append((ref, FetchError(f"{mailbox}/{ref.folder}: {type(item).__name__}")))
            elif item.mime_content is None:
                out.append((ref, FetchError(f"{mailbox}/{ref.folder}: the server sent no MIME content")))
            else:
                mime = item.mime_content
                out.append((ref, mime if isinstance(mime, bytes) else mime.encode()))
        return out

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes | Exception]]:
        """MIME bytes of each ref via GetItem, in batches bounded by ``batch_bytes`` and
        ``batch_count``. Mailboxes are fetched side by side (one batch in flight per mailbox,
        at most ``connections`` at once), so one throttled mailbox does not hold up the
        others. A vanished message yields a FetchError. Raises AuthError."""
        lanes: dict[str, list[list[MessageRef]]] = {}
        for ref in refs:
            lanes.setdefault(ref.mailbox, []).append(ref)
        queued = {mb: self._batches(rs) for mb, rs in lanes.items()}
        if not queued:
            return
        with ThreadPoolExecutor(max_workers=min(len(queued), self.max_connections)) as pool:
            pending = {pool.submit(self._fetch_batch, mb, q.pop(0)): mb for mb, q in queued.items()}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    mb = pending.pop(future)
                    yield from future.result()
                    if queued[mb]:
                        pending[pool.submit(self._fetch_batch, mb, queued[mb].pop(0))] = mb

    # ---- actions -------------------------------------------------------------------------
    def _current(self, mailbox: str, refs: Sequence[MessageRef], fields: list[str]) -> list:
        """The items behind ``refs`` as the server has them now (an exception when gone)."""
        account = self._account(mailbox)
        ids = [ItemId(id=r.id) for r in refs]
        return self._retrying(mailbox, lambda: list(account.fetch(ids=ids, only_fields=fields)))

    def _unchanged(self, refs: Sequence[MessageRef], fields: list[str]):
        """Per mailbox: (ref, item) for refs whose ChangeKey still matches; ActionResults
        (ok=False) for the others."""
        results: list[ActionResult] = []
        by_mailbox: dict[str, list[MessageRef]] = {}
        for r in refs:
            by_mailbox.setdefault(r.mailbox, []).append(r)
        current: dict[str, list] = {}
        for mailbox, rs in by_mailbox.items():
            current[mailbox] = []
            for ref, item in zip(rs, self._current(mailbox, rs, fields)):
                if isinstance(item, Exception):
                    results.append(ActionResult(ref, False, "message gone (moved or deleted since it was scanned)"))
                elif f"{item.id}:{item.changekey}" != ref.version:
                    results.append(ActionResult(ref, False, "message changed since it was scanned; not touched"))
                else:
                    current[mailbox].append((ref, item))
        return current, results

    def tag(self, refs: Sequence[MessageRef], keyword: str) -> list[ActionResult]:
        """Add category ``keyword`` to each unchanged message (UpdateItem, never overwriting
        a concurrent change). A message that has it already is left alone and reported ok."""
        current, results = self._unchanged(refs, ["categories"])
        for mailbox, pairs in current.items():
            todo = []
            for ref, item in pairs:
                if keyword in (item.categories or []):
                    results.append(ActionResult(ref, True, f"already tagged {keyword}"))
                else:
                    item.categories = [*(item.categories or []), keyword]
                    todo.append((ref, item))
            if not todo:
                continue
            account = self._account(mailbox)
            updated = self._retrying(mailbox, lambda: list(account.bulk_update(
                items=[(item, ["categories"]) for _, item in todo], conflict_resolution="NeverOverwrite",
            )))
            for (ref, _), res in zip(todo, updated):
                ok = not isinstance(res, Exception)
                results.append(ActionResult(ref, ok, f"tagged {keyword}" if ok else f"not tagged: {type(res).__name__}"))
        return _in_order(refs, results)

    def _ensure_folder(self, mailbox: str, path: str) -> Folder:
        """Folder ``path`` under msgfolderroot, created (with its parents) when missing."""
        tree = self._tree(mailbox, refresh=True)
        if path in tree:
            return tree[path]
        account = self._account(mailbox)
        parent, done = account.msg_folder_root, []
        for name in path.split("/"):
            done.append(name)
            sub = "/".join(done)
            if sub in tree:
                parent = tree[sub]
                continue
            folder = Folder(parent=parent, name=name, folder_class="IPF.Note")
            self._retrying(mailbox, folder.save)
            parent = folder
        self._tree(mailbox, refresh=True)
        return parent

    def _move(self, refs: Sequence[MessageRef], target_of: Callable[[str], Folder], label: str) -> list[ActionResult]:
        """Move unchanged messages, then confirm each by GetItem of its new id in the target."""
        current, results = self._unchanged(refs, ["parent_folder_id"])
        for mailbox, pairs in current.items():
            target = target_of(mailbox)
            todo = []
            for ref, item in pairs:
                if item.parent_folder_id and item.parent_folder_id.id == target.id:
                    results.append(ActionResult(ref, True, f"already in {label}", new_id=ref.id))
                else:
                    todo.append(ref)
            if not todo:
                continue
            account = self._account(mailbox)
            moved = self._retrying(mailbox, lambda: list(account.bulk_move(
                ids=[ItemId(id=r.id) for r in todo], to_folder=target,
            )))
            new_ids = [m[0] if isinstance(m, tuple) else None for m in moved]
            present = [ItemId(id=n) for n in new_ids if n]
            confirm = self._retrying(mailbox, lambda: list(account.fetch(ids=present, only_fields=["parent_folder_id"])))
            confirmed = {
                c.id for c in confirm
                if not isinstance(c, Exception) and c.parent_folder_id and c.parent_folder_id.id == target.id
            }
            for ref, res, new_id in zip(todo, moved, new_ids):
                if new_id in confirmed:
                    results.append(ActionResult(ref, True, f"moved to {label}", new_id=new_id))
                elif new_id is None:
                    results.append(ActionResult(ref, False, f"not moved: {type(res).__name__}"))
                else:
                    results.append(ActionResult(ref, False, f"move to {label} not confirmed", new_id=new_id))
        return _in_order(refs, results)

    def quarantine(self, refs: Sequence[MessageRef], folder: str) -> list[ActionResult]:
        """Move each unchanged message to ``folder`` (a path under msgfolderroot, created when
        missing) with MoveItem; ok only once GetItem finds the new id in that folder."""
        return self._move(refs, lambda mb: self._ensure_folder(mb, folder), folder)

    def delete(self, refs: Sequence[MessageRef], hard: bool = False) -> list[ActionResult]:
        """Move each unchanged message to Deleted Items (confirmed as for quarantine), or with
        ``hard`` remove it for good (DeleteItem HardDelete, confirmed by GetItem failing)."""
        if not hard:
            return self._move(refs, lambda mb: self._retrying(mb, lambda: self._account(mb).trash), "Deleted Items")
        current, results = self._unchanged(refs, ["parent_folder_id"])
        for mailbox, pairs in current.items():
            account = self._account(mailbox)
            ids = [ItemId(id=ref.id) for ref, _ in pairs]
            deleted = self._retrying(mailbox, lambda: list(account.bulk_delete(ids=ids, delete_type=HARD_DELETE)))
            after = self._current(mailbox, [ref for ref, _ in pairs], ["parent_folder_id"]) if ids else []
            for (ref, _), res, now in zip(pairs, deleted, after):
                if isinstance(res, Exception):
                    results.append(ActionResult(ref, False, f"not deleted: {type(res).__name__}"))
                elif not isinstance(now, _GONE):
                    results.append(ActionResult(ref, False, "delete not confirmed: the message is still there"))
                else:
                    results.append(ActionResult(ref, True, "deleted"))
        return _in_order(refs, results)
