"""A loopback Exchange Web Services test server that exchangelib talks to over real HTTP.

It speaks the SOAP schema of the operations the EWS connector uses (GetFolder, FindFolder,
FindItem with IndexedPageItemView paging, GetItem with MimeContent, CreateFolder, MoveItem,
UpdateItem, DeleteItem, CreateItem for seeding), with responses shaped as in
Microsoft's EWS reference examples. Mailboxes live in memory; basic auth (and bearer tokens)
guard them. Switches inject faults: ``ErrorServerBusy`` with ``BackOffMilliseconds`` for one
mailbox, HTTP 500, dropped connections, and an item moved just before the next GetItem.

In-process use::

    server = EWSTestServer(users={"alice": "pw"}).start()
    server.seed("alice", "Inbox", raw_bytes)
    ... server.url ...
    server.stop()

By hand, serving a Maildir (Maildir++ ``.Name`` subfolders become folders under
``msgfolderroot``; the Maildir root becomes Inbox)::

    python -m tests.servers.ews --port 8443 --user alice --password pw --maildir PATH
"""

from __future__ import annotations

import argparse
import base64
import datetime
import itertools
import socket
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from xml.sax.saxutils import escape

import pytest

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"

# Distinguished folders every mailbox has: id name -> (display name, class, parent id name).
DISTINGUISHED = {
    "root": ("Top of Information Store", None, None),
    "msgfolderroot": ("Top of Information Store", "IPF.Note", "root"),
    "inbox": ("Inbox", "IPF.Note", "msgfolderroot"),
    "deleteditems": ("Deleted Items", "IPF.Note", "msgfolderroot"),
    "sentitems": ("Sent Items", "IPF.Note", "msgfolderroot"),
    "drafts": ("Drafts", "IPF.Note", "msgfolderroot"),
    "junkemail": ("Junk Email", "IPF.Note", "msgfolderroot"),
    "calendar": ("Calendar", "IPF.Appointment", "msgfolderroot"),
    "contacts": ("Contacts", "IPF.Contact", "msgfolderroot"),
}
FOLDER_TAGS = {"IPF.Appointment": "CalendarFolder", "IPF.Contact": "ContactsFolder"}


@dataclass
class Folder:
    """A folder of one mailbox."""

    id: str
    mailbox: str
    name: str
    folder_class: str | None
    parent_id: str | None
    distinguished: str | None = None
    changekey: int = 1


@dataclass
class Item:
    """A message of one mailbox: its MIME bytes and the properties EWS exposes."""

    id: str
    mailbox: str
    folder_id: str
    mime: bytes
    received: datetime.datetime
    subject: str = ""
    categories: list[str] = field(default_factory=list)
    is_read: bool = False
    changekey: int = 1

    @property
    def ck(self) -> str:
        return f"CQAAAB{self.changekey:08d}"


class _Fault(Exception):
    """An EWS error returned to the client as a SOAP fault (HTTP 500)."""

    def __init__(self, code: str, text: str, back_off_ms: int | None = None):
        super().__init__(text)
        self.code, self.text, self.back_off_ms = code, text, back_off_ms


class _ItemError(Exception):
    """An error for one element of a request (ResponseClass="Error" in its response message)."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


@dataclass
class Request:
    """One HTTP request as the server saw it (for assertions in tests)."""

    at: float
    operation: str
    mailbox: str | None
    outcome: str  # "ok", "401", "busy", "500", "dropped"
    impersonated: str | None = None


class EWSTestServer:
    """The server and its in-memory mailboxes. ``users`` maps login names to passwords; every
    login owns a mailbox of the same name. ``tokens`` are accepted as bearer tokens and act as
    the first user.

    Test helpers: ``seed``, ``add_mailbox``, ``add_folder``, ``items``, ``folder_names``,
    ``busy``, ``fail_http``, ``drop_connections``, ``move_before_next_getitem``, ``requests``.
    """

    def __init__(self, users: dict[str, str], tokens: tuple[str, ...] = (), host: str = "127.0.0.1", port: int = 0):
        self.users = dict(users)
        self.tokens = set(tokens)
        self.host, self.port = host, port
        self.lock = threading.RLock()
        self.folders: dict[str, Folder] = {}
        self.items: dict[str, Item] = {}  # insertion order is the store order
        self.requests: list[Request] = []
        self._ids = itertools.count(1)
        self._busy: dict[str, list[int]] = {}  # mailbox -> [times left, back off ms]
        self._http_errors = 0
        self._drops = 0
        self._pending_move: tuple[str, str] | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self.mailbox_names: set[str] = set()
        for user in users:
            self.add_mailbox(user)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> EWSTestServer:
        """Serve in a background thread; returns self (``host``, ``port``, ``url`` are set)."""
        server = self

        class Handler(_Handler):
            ews = server

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        """The EWS endpoint, ``http://127.0.0.1:PORT/EWS/Exchange.asmx``."""
        return f"http://{self.host}:{self.port}/EWS/Exchange.asmx"

    def source(self, user: str) -> str:
        """The ``ews+http://`` source URL for login ``user``."""
        return f"ews+http://{user}@{self.host}:{self.port}/EWS/Exchange.asmx"

    # ---- content ------------------------------------------------------------------------
    def _new_id(self, kind: str, mailbox: str) -> str:
        raw = f"{kind}:{mailbox}:{next(self._ids)}".encode()
        return "AAMk" + base64.b64encode(raw).decode()

    def canonical(self, address: str | None) -> str | None:
        """The mailbox an address names: itself, or its local part when only that is a login
        (``alice@127.0.0.1`` is the mailbox of login ``alice``)."""
        if address is None or address.lower() in self.mailbox_names:
            return address and address.lower()
        local = address.partition("@")[0].lower()
        return local if local in self.mailbox_names else address.lower()

    def add_mailbox(self, mailbox: str) -> None:
        """Create ``mailbox`` with the distinguished folders."""
        with self.lock:
            mailbox = mailbox.lower()
            self.mailbox_names.add(mailbox)
            ids: dict[str, str] = {}
            for dist, (name, cls, parent) in DISTINGUISHED.items():
                ids[dist] = self._new_id("F", mailbox)
                self.folders[ids[dist]] = Folder(ids[dist], mailbox, name, cls, ids.get(parent), dist)

    def _folder(self, mailbox: str, path: str, create: bool = False) -> Folder:
        """The folder at ``path`` (``Inbox/Sub``) under msgfolderroot."""
        with self.lock:
            parent = self._distinguished(mailbox, "msgfolderroot")
            for name in path.split("/"):
                kids = [f for f in self.folders.values() if f.parent_id == parent.id and f.name == name]
                if kids:
                    parent = kids[0]
                elif create:
                    fid = self._new_id("F", mailbox)
                    parent = self.folders[fid] = Folder(fid, mailbox, name, "IPF.Note", parent.id)
                else:
                    raise KeyError(path)
            return parent

    def add_folder(self, mailbox: str, path: str) -> str:
        """Create folder ``path`` (and its parents) under msgfolderroot; returns its id."""
        return self._folder(mailbox, path, create=True).id

    def seed(self, mailbox: str, folder: str, mime: bytes, *, is_read: bool = False) -> str:
        """Store a message in ``folder`` (a path, created if missing); returns its ItemId."""
        with self.lock:
            return self._store(self._folder(mailbox, folder, create=True), mime, is_read)

    def _store(self, folder: Folder, mime: bytes, is_read: bool) -> str:
        headers = BytesHeaderParser().parsebytes(mime)
        try:
            received = parsedate_to_datetime(headers["Date"]).astimezone(datetime.timezone.utc)
        except (TypeError, ValueError):
            received = datetime.datetime.now(datetime.timezone.utc)
        iid = self._new_id("I", folder.mailbox)
        self.items[iid] = Item(iid, folder.mailbox, folder.id, mime, received, str(headers["Subject"] or ""), is_read=is_read)
        return iid

    def mailbox_items(self, mailbox: str, folder: str | None = None) -> list[Item]:
        """The items of ``mailbox`` (in ``folder`` path when given), in store order."""
        with self.lock:
            fid = self._folder(mailbox, folder).id if folder else None
            mailbox = self.canonical(mailbox)
            return [i for i in self.items.values() if i.mailbox == mailbox and (fid is None or i.folder_id == fid)]

    def folder_path(self, folder_id: str) -> str:
        """The path of a folder under msgfolderroot (``Inbox/Sub``)."""
        parts = []
        f = self.folders[folder_id]
        while f.distinguished not in ("msgfolderroot", "root"):
            parts.append(f.name)
            f = self.folders[f.parent_id]
        return "/".join(reversed(parts))

    def snapshot(self, mailbox: str) -> list[tuple]:
        """Everything a scan must not change: (id, changekey, folder, read state, categories)."""
        with self.lock:
            mailbox = self.canonical(mailbox)
            return [
                (i.id, i.ck, self.folder_path(i.folder_id), i.is_read, tuple(i.categories))
                for i in self.items.values()
                if i.mailbox == mailbox
            ]

    # ---- fault switches -----------------------------------------------------------------
    def busy(self, mailbox: str, times: int, back_off_ms: int) -> None:
        """Answer the next ``times`` requests for ``mailbox`` with ErrorServerBusy."""
        with self.lock:
            self._busy[self.canonical(mailbox)] = [times, back_off_ms]

    def fail_http(self, times: int) -> None:
        """Answer the next ``times`` requests with a bare HTTP 500 (no SOAP body)."""
        with self.lock:
            self._http_errors = times

    def drop_connections(self, times: int) -> None:
        """Close the connection without answering the next ``times`` requests."""
        with self.lock:
            self._drops = times

    def move_before_next_getitem(self, item_id: str, to_folder: str) -> None:
        """Move item ``item_id`` to folder path ``to_folder`` when the next GetItem arrives
        (as if a user moved it between enumeration and fetch)."""
        with self.lock:
            self._pending_move = (item_id, to_folder)

    def operations(self, outcome: str | None = None) -> list[str]:
        """Names of the operations received so far, optionally only with ``outcome``."""
        with self.lock:
            return [r.operation for r in self.requests if outcome is None or r.outcome == outcome]

    # ---- operations ---------------------------------------------------------------------
    def _distinguished(self, mailbox: str, name: str) -> Folder:
        mailbox = self.canonical(mailbox)
        for f in self.folders.values():
            if f.mailbox == mailbox and f.distinguished == name:
                return f
        if mailbox in self.mailbox_names:
            raise _ItemError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
        raise _ItemError("ErrorNonExistentMailbox", "No mailbox with such guid.")

    def _resolve_folder(self, elem: ET.Element, mailbox: str) -> Folder:
        if elem.tag == f"{{{T}}}DistinguishedFolderId":
            box = elem.find(f"{{{T}}}Mailbox/{{{T}}}EmailAddress")
            return self._distinguished(box.text if box is not None else mailbox, elem.get("Id"))
        folder = self.folders.get(elem.get("Id"))
        if folder is None:
            raise _ItemError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
        return folder

    def _item(self, elem: ET.Element) -> Item:
        item = self.items.get(elem.get("Id"))
        if item is None:
            raise _ItemError(
                "ErrorItemNotFound", "The specified object was not found in the store., The process failed to get the correct properties."
            )
        return item

    def _move(self, item: Item, folder: Folder) -> Item:
        """Exchange gives a moved item a new ItemId."""
        del self.items[item.id]
        moved = Item(
            self._new_id("I", item.mailbox), item.mailbox, folder.id, item.mime, item.received,
            item.subject, list(item.categories), item.is_read, item.changekey + 1,
        )
        self.items[moved.id] = moved
        return moved

    def handle(self, op: str, body: ET.Element, mailbox: str) -> str:
        """The response XML (inside soap:Body) for operation ``op``."""
        method = getattr(self, f"_op_{op}", None)
        if method is None:
            raise _Fault("ErrorInvalidRequest", f"The request is invalid: {op} is not supported here")
        with self.lock:
            return method(body, mailbox)

    def _messages(self, op: str, parts: list) -> str:
        out = [f'<m:{op}Response xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>']
        for part in parts:
            if isinstance(part, _ItemError):
                out.append(
                    f'<m:{op}ResponseMessage ResponseClass="Error"><m:MessageText>{escape(part.text)}</m:MessageText>'
                    f"<m:ResponseCode>{part.code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
                    f"{'<m:Items/>' if op in ('GetItem', 'MoveItem') else ''}</m:{op}ResponseMessage>"
                )
            else:
                out.append(
                    f'<m:{op}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
                    f"{part}</m:{op}ResponseMessage>"
                )
        out.append(f"</m:ResponseMessages></m:{op}Response>")
        return "".join(out)

    def _each(self, elems, fn) -> list:
        out = []
        for e in elems:
            try:
                out.append(fn(e))
            except _ItemError as err:
                out.append(err)
        return out

    def _folder_xml(self, f: Folder) -> str:
        tag = FOLDER_TAGS.get(f.folder_class or "", "Folder")
        total = sum(1 for i in self.items.values() if i.folder_id == f.id)
        unread = sum(1 for i in self.items.values() if i.folder_id == f.id and not i.is_read)
        kids = sum(1 for k in self.folders.values() if k.parent_id == f.id)
        parent = f'<t:ParentFolderId Id="{f.parent_id}" ChangeKey="AQAAAA=="/>' if f.parent_id else ""
        cls = f"<t:FolderClass>{f.folder_class}</t:FolderClass>" if f.folder_class else ""
        unread_xml = f"<t:UnreadCount>{unread}</t:UnreadCount>" if tag == "Folder" else ""
        return (
            f'<t:{tag}><t:FolderId Id="{f.id}" ChangeKey="AQAAAB{f.changekey:06d}"/>{parent}{cls}'
            f"<t:DisplayName>{escape(f.name)}</t:DisplayName><t:TotalCount>{total}</t:TotalCount>"
            f"<t:ChildFolderCount>{kids}</t:ChildFolderCount>{unread_xml}</t:{tag}>"
        )

    def _item_xml(self, item: Item, mime: bool) -> str:
        cats = "".join(f"<t:String>{escape(c)}</t:String>" for c in item.categories)
        mime_xml = (
            f'<t:MimeContent CharacterSet="UTF-8">{base64.b64encode(item.mime).decode()}</t:MimeContent>' if mime else ""
        )
        return (
            f"<t:Message>{mime_xml}"
            f'<t:ItemId Id="{item.id}" ChangeKey="{item.ck}"/>'
            f'<t:ParentFolderId Id="{item.folder_id}" ChangeKey="AQAAAA=="/>'
            f"<t:ItemClass>IPM.Note</t:ItemClass><t:Subject>{escape(item.subject)}</t:Subject>"
            f"<t:DateTimeReceived>{item.received.strftime('%Y-%m-%dT%H:%M:%SZ')}</t:DateTimeReceived>"
            f"<t:Size>{len(item.mime)}</t:Size>"
            f"{'<t:Categories>' + cats + '</t:Categories>' if cats else ''}"
            f"<t:IsRead>{'true' if item.is_read else 'false'}</t:IsRead></t:Message>"
        )

    def _op_GetFolder(self, body: ET.Element, mailbox: str) -> str:
        ids = list(body.find(f"{{{M}}}FolderIds"))
        return self._messages(
            "GetFolder",
            self._each(ids, lambda e: f"<m:Folders>{self._folder_xml(self._resolve_folder(e, mailbox))}</m:Folders>"),
        )

    def _page(self, body: ET.Element, entries: list) -> tuple[list, str]:
        view = body.find(f"{{{M}}}IndexedPageItemView")
        if view is None:
            view = body.find(f"{{{M}}}IndexedPageFolderView")
        offset, limit = 0, len(entries)
        if view is not None:
            offset = int(view.get("Offset", "0"))
            limit = int(view.get("MaxEntriesReturned", str(len(entries))))
        page = entries[offset : offset + limit]
        last = offset + len(page) >= len(entries)
        attrs = (
            f'IndexedPagingOffset="{offset + len(page)}" TotalItemsInView="{len(entries)}" '
            f'IncludesLastItemInRange="{"true" if last else "false"}"'
        )
        return page, attrs

    def _op_FindFolder(self, body: ET.Element, mailbox: str) -> str:
        deep = body.get("Traversal") == "Deep"

        def find(elem: ET.Element) -> str:
            parent = self._resolve_folder(elem, mailbox)
            found, todo = [], [parent.id]
            while todo:
                pid = todo.pop(0)
                kids = [f for f in self.folders.values() if f.parent_id == pid]
                found.extend(kids)
                if deep:
                    todo.extend(k.id for k in kids)
            page, attrs = self._page(body, found)
            folders = "".join(self._folder_xml(f) for f in page)
            return f"<m:RootFolder {attrs}><t:Folders>{folders}</t:Folders></m:RootFolder>"

        return self._messages("FindFolder", self._each(list(body.find(f"{{{M}}}ParentFolderIds")), find))

    def _op_FindItem(self, body: ET.Element, mailbox: str) -> str:
        def find(elem: ET.Element) -> str:
            folder = self._resolve_folder(elem, mailbox)
            entries = [i for i in self.items.values() if i.folder_id == folder.id]
            page, attrs = self._page(body, entries)
            items = "".join(self._item_xml(i, mime=False) for i in page)
            return f"<m:RootFolder {attrs}><t:Items>{items}</t:Items></m:RootFolder>"

        return self._messages("FindItem", self._each(list(body.find(f"{{{M}}}ParentFolderIds")), find))

    def _op_GetItem(self, body: ET.Element, mailbox: str) -> str:
        if self._pending_move:
            item_id, to = self._pending_move
            self._pending_move = None
            if item_id in self.items:
                item = self.items[item_id]
                self._move(item, self._folder(item.mailbox, to, create=True))
        wants_mime = any(
            e.get("FieldURI") == "item:MimeContent" for e in body.iter(f"{{{T}}}FieldURI")
        )
        ids = list(body.find(f"{{{M}}}ItemIds"))
        return self._messages(
            "GetItem", self._each(ids, lambda e: f"<m:Items>{self._item_xml(self._item(e), wants_mime)}</m:Items>")
        )

    def _op_MoveItem(self, body: ET.Element, mailbox: str) -> str:
        target = self._resolve_folder(list(body.find(f"{{{M}}}ToFolderId"))[0], mailbox)

        def move(elem: ET.Element) -> str:
            moved = self._move(self._item(elem), target)
            return f'<m:Items><t:Message><t:ItemId Id="{moved.id}" ChangeKey="{moved.ck}"/></t:Message></m:Items>'

        return self._messages("MoveItem", self._each(list(body.find(f"{{{M}}}ItemIds")), move))

    def _op_DeleteItem(self, body: ET.Element, mailbox: str) -> str:
        how = body.get("DeleteType")

        def delete(elem: ET.Element) -> str:
            item = self._item(elem)
            if how == "MoveToDeletedItems":
                self._move(item, self._distinguished(item.mailbox, "deleteditems"))
            else:
                del self.items[item.id]
            return ""

        return self._messages("DeleteItem", self._each(list(body.find(f"{{{M}}}ItemIds")), delete))

    def _op_UpdateItem(self, body: ET.Element, mailbox: str) -> str:
        def update(change: ET.Element) -> str:
            id_elem = change.find(f"{{{T}}}ItemId")
            item = self._item(id_elem)
            sent_ck = id_elem.get("ChangeKey")
            if body.get("ConflictResolution") == "NeverOverwrite" and sent_ck and sent_ck != item.ck:
                raise _ItemError("ErrorIrresolvableConflict", "The send or update operation could not be performed because the change key passed in the request does not match the current change key for the item.")
            for upd in change.find(f"{{{T}}}Updates"):
                uri = upd.find(f"{{{T}}}FieldURI").get("FieldURI")
                kind = upd.tag.split("}")[1]
                if uri == "item:Categories":
                    values = [s.text or "" for s in upd.iter(f"{{{T}}}String")]
                    if kind == "DeleteItemField":
                        item.categories = []
                    elif kind == "AppendToItemField":
                        item.categories += [v for v in values if v not in item.categories]
                    else:
                        item.categories = values
                elif uri == "message:IsRead":
                    value = upd.find(f".//{{{T}}}IsRead")
                    item.is_read = kind != "DeleteItemField" and value is not None and value.text == "true"
                else:
                    raise _ItemError("ErrorInvalidPropertySet", f"{uri} cannot be updated here")
            item.changekey += 1
            return (
                f'<m:Items><t:Message><t:ItemId Id="{item.id}" ChangeKey="{item.ck}"/></t:Message></m:Items>'
                "<m:ConflictResults><t:Count>0</t:Count></m:ConflictResults>"
            )

        return self._messages("UpdateItem", self._each(list(body.find(f"{{{M}}}ItemChanges")), update))

    def _op_CreateItem(self, body: ET.Element, mailbox: str) -> str:
        saved = body.find(f"{{{M}}}SavedItemFolderId")
        folder = self._resolve_folder(list(saved)[0], mailbox) if saved is not None else self._distinguished(mailbox, "drafts")

        def create(msg: ET.Element) -> str:
            mime = msg.find(f"{{{T}}}MimeContent")
            if mime is None:
                raise _ItemError("ErrorInvalidRequest", "only MimeContent items are accepted here")
            read = msg.find(f"{{{T}}}IsRead")
            iid = self._store(folder, base64.b64decode(mime.text or ""), read is not None and read.text == "true")
            ck = self.items[iid].ck
            return f'<m:Items><t:Message><t:ItemId Id="{iid}" ChangeKey="{ck}"/></t:Message></m:Items>'

        return self._messages("CreateItem", self._each(list(body.find(f"{{{M}}}Items")), create))

    def _op_CreateFolder(self, body: ET.Element, mailbox: str) -> str:
        parent = self._resolve_folder(list(body.find(f"{{{M}}}ParentFolderId"))[0], mailbox)

        def create(elem: ET.Element) -> str:
            name = elem.findtext(f"{{{T}}}DisplayName") or ""
            if any(f.parent_id == parent.id and f.name == name for f in self.folders.values()):
                raise _ItemError("ErrorFolderExists", "A folder with the specified name already exists.")
            fid = self._new_id("F", parent.mailbox)
            self.folders[fid] = Folder(fid, parent.mailbox, name, elem.findtext(f"{{{T}}}FolderClass") or "IPF.Note", parent.id)
            return f'<m:Folders><t:Folder><t:FolderId Id="{fid}" ChangeKey="AQAAAB000001"/></t:Folder></m:Folders>'

        return self._messages("CreateFolder", self._each(list(body.find(f"{{{M}}}Folders")), create))


def _envelope(body: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Header>'
        f'<h:ServerVersionInfo xmlns:h="{T}" MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" '
        f'MinorBuildNumber="6" Version="V2017_07_11"/></s:Header><s:Body>{body}</s:Body></s:Envelope>'
    ).encode()


def _fault(f: _Fault) -> bytes:
    extra = (
        f'<t:MessageXml xmlns:t="{T}"><t:Value Name="BackOffMilliseconds">{f.back_off_ms}</t:Value></t:MessageXml>'
        if f.back_off_ms is not None
        else ""
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Body><s:Fault>'
        f'<faultcode xmlns:a="{T}">a:{f.code}</faultcode><faultstring xml:lang="en-US">{escape(f.text)}</faultstring>'
        f'<detail><e:ResponseCode xmlns:e="{E}">{f.code}</e:ResponseCode>'
        f'<e:Message xmlns:e="{E}">{escape(f.text)}</e:Message>{extra}</detail>'
        f"</s:Fault></s:Body></s:Envelope>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ews: EWSTestServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body are written separately; without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/xml; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _login(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, pw = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return None
            return user if self.ews.users.get(user) == pw else None
        if scheme.lower() == "bearer" and value in self.ews.tokens:
            return next(iter(self.ews.users))
        return None

    def do_POST(self) -> None:
        ews = self.ews
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            root = ET.fromstring(data)
            body = root.find(f"{{{SOAP}}}Body")[0]
            op = body.tag.split("}")[1]
        except (ET.ParseError, TypeError, IndexError):
            op, root, body = "?", None, None
        login = self._login()
        imp = root.find(f".//{{{T}}}ExchangeImpersonation//{{{T}}}PrimarySmtpAddress") if root is not None else None
        impersonated = imp.text if imp is not None else None
        mailbox = impersonated or login
        if body is not None:
            dist = body.find(f".//{{{T}}}DistinguishedFolderId/{{{T}}}Mailbox/{{{T}}}EmailAddress")
            if dist is not None:
                mailbox = dist.text
        with ews.lock:
            mailbox = ews.canonical(mailbox)
            record = Request(time.monotonic(), op, mailbox, "ok", impersonated)
            ews.requests.append(record)
            if login is None:
                record.outcome = "401"
            elif ews._drops:
                ews._drops -= 1
                record.outcome = "dropped"
            elif ews._http_errors:
                ews._http_errors -= 1
                record.outcome = "500"
            elif mailbox and ews._busy.get(mailbox, [0])[0] > 0:
                ews._busy[mailbox][0] -= 1
                record.outcome = "busy"
        if record.outcome == "401":
            self._send(401, b"", {"WWW-Authenticate": 'Basic realm="ews"'})
        elif record.outcome == "dropped":
            self.close_connection = True
            self.connection.shutdown(2)
        elif record.outcome == "500":
            self._send(500, b"<html><body>Service Unavailable</body></html>")
        elif record.outcome == "busy":
            ms = ews._busy[mailbox][1]
            self._send(500, _fault(_Fault("ErrorServerBusy", "The server cannot service this request right now. Try again later.", ms)))
        elif body is None:
            self._send(500, _fault(_Fault("ErrorSchemaValidation", "The request failed schema validation.")))
        else:
            try:
                self._send(200, _envelope(ews.handle(op, body, mailbox)))
            except _Fault as f:
                record.outcome = f.code
                self._send(500, _fault(f))
            except _ItemError as e:
                record.outcome = e.code
                self._send(500, _fault(_Fault(e.code, e.text)))


def load_maildir(server: EWSTestServer, mailbox: str, path: Path) -> int:
    """Seed ``mailbox`` from a Maildir: its root into Inbox, each ``.Name`` (Maildir++)
    subfolder into folder ``Name`` (``.A.B`` into ``A/B``). Returns the number of messages."""
    count = 0
    dirs = [(path, "Inbox")] + [
        (d, d.name[1:].replace(".", "/")) for d in sorted(path.iterdir()) if d.is_dir() and d.name.startswith(".")
    ]
    for directory, folder in dirs:
        server.add_folder(mailbox, folder)
        for sub in ("cur", "new"):
            if (directory / sub).is_dir():
                for f in sorted((directory / sub).iterdir()):
                    if f.name.startswith(".") or not f.is_file():
                        continue  # Maildir ignores dotfiles
                    flags = f.name.rpartition(":2,")[2] if ":2," in f.name else ""
                    server.seed(mailbox, folder, f.read_bytes(), is_read="S" in flags)
                    count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    """Serve a Maildir as one mailbox until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True, help="the test server's own password for --user")
    p.add_argument("--maildir", type=Path)
    args = p.parse_args(argv)
    server = EWSTestServer(users={args.user: args.password}, port=args.port)
    n = load_maildir(server, args.user, args.maildir) if args.maildir else 0
    server.start()
    print(f"serving {n} messages for {args.user} at {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()


@pytest.fixture
def ews_server() -> Iterator[EWSTestServer]:
    """A started EWSTestServer with login ``alice`` (password ``alice-pw``) owning mailbox
    ``alice`` (reachable as ``alice@127.0.0.1``); stopped after the test."""
    server = EWSTestServer(users={"alice": "alice-pw"}).start()
    try:
        yield server
    finally:
        server.stop()
