"""Local mail stores: Maildir (with Maildir++ subfolders), mbox (mboxo, mboxrd) and .eml trees.

Sources: ``maildir:PATH``, ``mbox:PATH``, ``eml:PATH``, or a bare path that is auto-detected
(registered under the pseudo-scheme ``local``). Every store here is one mailbox.

Scanning changes nothing: files are opened read-only, nothing is renamed, moved from ``new/``
to ``cur/`` or written. Only the Maildir actions (quarantine, delete) write, and only when
asked. Enumeration of Maildir and .eml stores only stats files; mbox
enumeration streams the file once, line by line, hashing each message as it goes.

OS errors are translated into ``rescan.errors`` at one boundary, ``map_local_errors()``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence

from connectors.base import ActionResult, Connector, FolderChanges, SourceOptions, register, scheme_of
from rescan.errors import ActionError, FetchError, SourceError, UsageError
from rescan.models import MessageRef

INBOX = "INBOX"

# Bytes read at once while streaming an mbox: large enough that per-read overhead vanishes,
# small enough that a multi-gigabyte mbox or line is read in bounded steps.
_MBOX_CHUNK = 256 * 1024
_FETCH_SLACK = 4096  # read past a message's size at fetch: its From line, escapes, next From
# Lines that matter when splitting an mbox: From lines (separators after a blank line)
# and escaped From lines. Searching for the newline before them is ten times faster than
# a multi-line "^" pattern.
_FROM_LINE = re.compile(rb"(>*)From ")
_NEW_FROM_LINE = re.compile(rb"\n(>*)From ")
_MBOX_FORMATS = ("mboxrd", "mboxo")
_BLANK_LINES = (b"\n", b"\r\n")
# RFC 5322 header field name followed by a colon: how a message file starts.
_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")
# A folder changed less than this long ago gets no cursor: a file added within the same
# timestamp tick as the last change would leave its directory's times as they were.
CURSOR_SETTLE_NS = 2_000_000_000


@contextlib.contextmanager
def map_local_errors(what: str) -> Iterator[None]:
    """Translate ``OSError`` raised inside the block into ``SourceError`` naming ``what``.

    Raises: SourceError."""
    try:
        yield
    except OSError as exc:
        raise SourceError(f"{what}: {exc.strerror or exc}") from None


def _open_readonly(path: str, buffered: bool = True) -> BinaryIO:
    """``path`` opened for binary reading only (the one place this module opens a file);
    unbuffered to be read whole at once."""
    return open(path, "rb") if buffered else open(path, "rb", buffering=0)


def _path_of(source: str) -> str:
    """The filesystem path of ``source``: the URL minus its scheme (``maildir:``,
    ``maildir://``), with ``~`` expanded."""
    path = source.split(":", 1)[1] if scheme_of(source) else source
    if path.startswith("//"):  # maildir:///abs/path, as in file URLs
        path = path[2:]
    return os.path.expanduser(path)


def _select(folders: Iterable[str], options: SourceOptions) -> list[str]:
    """``folders`` kept by the include and exclude globs of ``options`` (exclude wins)."""
    kept = []
    for name in folders:
        if options.include and not any(fnmatch.fnmatchcase(name, g) for g in options.include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in options.exclude):
            continue
        kept.append(name)
    return kept


def _batches(refs: Iterable[MessageRef], size: int) -> Iterator[list[MessageRef]]:
    """``refs`` in lists of at most ``size`` (at least one) items."""
    size = max(1, size)
    batch: list[MessageRef] = []
    for ref in refs:
        batch.append(ref)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _iso_utc(seconds: float) -> str:
    """ISO 8601 UTC to the second (as ``datetime.isoformat``, at half its cost per message)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(seconds))


class _LocalConnector(Connector):
    """Shared parts of the one-mailbox local stores: mailbox name, folder checks, cursors.

    A folder's cursor (``cursor()``, ``changes()``) is the identity and the change times of the
    files that change whenever a message is added, removed or renamed (``_watched()``: a
    Maildir's ``new/`` and ``cur/`` directories, an mbox file), taken before the listing. Its
    ctime cannot be set back by anyone (restoring a backup with its old mtimes still changes
    it), and a folder changed in the last two seconds gets none. Equal cursors mean nothing was
    added, removed or renamed: ``changes()`` then lists nothing."""

    max_connections = 4  # local disk: a few parallel readers help, more only seek
    scheme = ""  # the source scheme of the store's kind

    def __init__(self, source: str, options: SourceOptions, path: str, mailbox: str):
        super().__init__(source, options)
        # The store's name in the state and the reports: its kind and absolute path, however
        # it was given (a bare path, a relative one from a scheduled job's directory).
        self.source = f"{self.scheme}:{os.path.abspath(path)}"
        self.path = path
        self.mailbox = mailbox
        self._cursors: dict[str, str | None] = {}
        self._cursor_lock = threading.Lock()

    def _watched(self, folder: str) -> list[str]:
        """The paths whose times change with the folder's listing (none: no cursor)."""
        return []

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes | Exception]]:
        """The bytes of each ref, read through ``readers()`` (the stores whose messages are
        files); a missing or unreadable message yields FetchError."""
        for ref, reader in zip(refs, self.readers(refs)):
            try:
                yield ref, reader.read()
            except FetchError as exc:
                yield ref, exc

    def _snapshot(self, folder: str) -> str | None:
        """The folder's cursor now, or None while it has changed too recently to be trusted
        (or when this store has no cursor). Raises SourceError when a watched path cannot be
        read."""
        now = time.time_ns()
        stamps = []
        for path in self._watched(folder):
            with map_local_errors(path):
                st = os.stat(path)
            if now - max(st.st_mtime_ns, st.st_ctime_ns) < CURSOR_SETTLE_NS:
                return None
            stamps.append(f"{st.st_dev}.{st.st_ino}.{st.st_size}.{st.st_mtime_ns}.{st.st_ctime_ns}")
        return "local1:" + ":".join(stamps) if stamps else None

    def _listed(self, folder: str, cursor: str | None) -> None:
        """Remember the cursor taken before a listing of ``folder`` that ran to its end."""
        with self._cursor_lock:
            self._cursors[folder] = cursor

    def cursor(self, mailbox: str, folder: str) -> str | None:
        """The folder's cursor as the last complete ``refs()`` listing of it saw it."""
        with self._cursor_lock:
            return self._cursors.get(folder) if mailbox == self.mailbox else None

    def changes(self, mailbox: str, folder: str, cursor: str) -> FolderChanges | None:
        """Nothing, when the folder's cursor is still ``cursor``; else None (list it whole).
        Raises SourceError when the folder does not exist or cannot be read."""
        self._check(mailbox, folder)
        now = self._snapshot(folder)
        if now is None or now != cursor:
            return None
        return FolderChanges(iter(()), (), now)

    def mailboxes(self) -> list[str]:
        """The one mailbox of this store."""
        return [self.mailbox]

    def _folder_exists(self, folder: str) -> bool:
        raise NotImplementedError

    def _check(self, mailbox: str, folder: str) -> None:
        """Raise SourceError unless ``folder`` of ``mailbox`` exists and is selected."""
        if (
            mailbox != self.mailbox
            or not _select([folder], self.options)
            or not self._folder_exists(folder)
        ):
            raise SourceError(f"{self.source}: no folder {folder!r} in mailbox {mailbox!r}")


# --- Maildir ------------------------------------------------------------------------------


def is_maildir(path: str) -> bool:
    """True when directory ``path`` holds the ``cur`` and ``new`` subdirectories of a Maildir."""
    return os.path.isdir(os.path.join(path, "cur")) and os.path.isdir(os.path.join(path, "new"))


def maildir_unique_name(filename: str) -> str:
    """The unique name of a Maildir file: its name before the ``:2,FLAGS`` info."""
    return filename.split(":", 1)[0]


def _read_whole(path: str) -> bytes:
    with _open_readonly(path, buffered=False) as f:
        return f.read()


@dataclass(frozen=True)
class MaildirFile:
    """Where one Maildir message was listed (``sub/file name`` in its folder directory, or
    None), found again by its unique name when a client moved it from ``new/`` to ``cur/`` or
    changed its flags since. Picklable: a worker process reads it itself (see
    ``Connector.readers``)."""

    folder_dir: str
    folder: str
    unique: str
    listed: str | None
    size: int

    def read(self) -> bytes:
        """The message's bytes. Raises FetchError when it is gone or unreadable."""
        return self.locate()[1]

    def locate(self) -> tuple[str, bytes]:
        """(path, bytes) of the message. Raises FetchError when it is gone or unreadable."""
        if self.listed:
            found = self._read(self.listed)
            if found is not None:
                return found
        for rel in self._current_names():  # moved since it was listed
            found = self._read(rel)
            if found is not None:
                return found
        raise FetchError(f"{self.folder}/{self.unique}: message no longer in the Maildir")

    def _read(self, rel: str) -> tuple[str, bytes] | None:
        """(path, bytes) of ``rel`` in the folder, None when there is no such file."""
        path = os.path.join(self.folder_dir, rel)
        try:
            return path, _read_whole(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FetchError(f"{self.folder}/{self.unique}: {exc.strerror or exc}") from None

    def _current_names(self) -> list[str]:
        found = []
        for sub in ("cur", "new"):
            try:
                entries = os.listdir(os.path.join(self.folder_dir, sub))
            except OSError as exc:
                raise FetchError(f"{self.folder}/{self.unique}: {exc.strerror or exc}") from None
            found += [f"{sub}/{n}" for n in entries if maildir_unique_name(n) == self.unique]
        return found


@register("maildir")
class MaildirConnector(_LocalConnector):
    """A Maildir with its Maildir++ subfolders (``.Archive``, ``.Archive.2024``).

    Folders: ``INBOX`` for the root, the subfolder directory name without its leading dot
    otherwise. Message id: the unique name; version: ``unique/size`` (flag changes do not
    change it). Messages are looked up in ``new/`` and ``cur/``; ``tmp/`` is ignored.
    Raises SourceError when ``PATH`` is not a Maildir.
    """

    scheme = "maildir"

    def __init__(self, source: str, options: SourceOptions):
        path = _path_of(source)
        if not os.path.isdir(path) or not is_maildir(path):
            raise SourceError(f"{path}: not a Maildir (no cur/ and new/ directories)")
        super().__init__(source, options, path, os.path.basename(os.path.abspath(path)))
        # folder -> unique name -> "cur/<file name>": where each message was last seen.
        self._where: dict[str, dict[str, str]] = {}

    def folders(self, mailbox: str) -> list[str]:
        """``INBOX`` and the Maildir++ subfolders, INBOX first then sorted, filtered by the
        include/exclude globs. Raises SourceError when the Maildir cannot be listed."""
        if mailbox != self.mailbox:
            return []
        with map_local_errors(self.path):
            subs = sorted(
                e.name[1:]
                for e in os.scandir(self.path)
                if e.name.startswith(".") and e.name not in (".", "..")
                and e.is_dir() and is_maildir(e.path)
            )
        return _select([INBOX, *subs], self.options)

    def _folder_dir(self, folder: str) -> str:
        return self.path if folder == INBOX else os.path.join(self.path, "." + folder)

    def _folder_exists(self, folder: str) -> bool:
        return "/" not in folder and is_maildir(self._folder_dir(folder))

    def _list(self, folder: str) -> list[tuple[str, str, os.stat_result]]:
        """(unique name, ``sub/file name``, stat) of each message of ``folder``, sorted by
        unique name; a name seen in both ``cur/`` and ``new/`` (moved during the listing)
        is kept once, from ``cur/``."""
        found: dict[str, tuple[str, os.stat_result]] = {}
        base = self._folder_dir(folder)
        for sub in ("cur", "new"):
            with map_local_errors(os.path.join(base, sub)):
                entries = list(os.scandir(os.path.join(base, sub)))
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:  # moved or deleted while listing
                    continue
                found.setdefault(maildir_unique_name(e.name), (f"{sub}/{e.name}", st))
        return [(u, rel, st) for u, (rel, st) in sorted(found.items())]

    def _watched(self, folder: str) -> list[str]:
        base = self._folder_dir(folder)
        return [os.path.join(base, "new"), os.path.join(base, "cur")]

    def refs(self, mailbox: str, folder: str) -> Iterator[list[MessageRef]]:
        """Every message of ``folder`` (stat only, no content read), sorted by unique name.

        Raises SourceError when the folder does not exist or cannot be listed."""
        self._check(mailbox, folder)
        cursor = self._snapshot(folder)
        listing = self._list(folder)
        self._where[folder] = {u: rel for u, rel, _ in listing}
        yield from _batches(
            (
                MessageRef(self.source, mailbox, folder, u, f"{u}/{st.st_size}",
                           st.st_size, _iso_utc(st.st_mtime))
                for u, _, st in listing
            ),
            self.options.batch_count,
        )
        self._listed(folder, cursor)

    def readers(self, refs: Sequence[MessageRef]) -> list[MaildirFile]:
        """A MaildirFile per ref, found by unique name even when the file moved from ``new/``
        to ``cur/`` or its flags changed since it was listed."""
        return [
            MaildirFile(self._folder_dir(r.folder), r.folder, r.id,
                        self._where.get(r.folder, {}).get(r.id), r.size or 0)
            for r in refs
        ]

    def quarantine(self, refs: Sequence[MessageRef], folder: str) -> list[ActionResult]:
        """Move each message into Maildir++ ``folder`` (created when missing): write a copy
        into its ``tmp/``, fsync it, verify its sha256, link it into ``cur/`` under the same
        file name, and only then remove the original. On any failure the original stays.

        Returns one ActionResult per ref. Raises ActionError for a bad folder name or when
        the folder cannot be created."""
        if not folder or folder == INBOX or "/" in folder or folder.startswith("."):
            raise ActionError(f"{self.path}: {folder!r} is not a Maildir++ folder name")
        target = self._folder_dir(folder)
        try:
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(target, sub), exist_ok=True)
            with open(os.path.join(target, "maildirfolder"), "ab"):
                pass
        except OSError as exc:
            raise ActionError(f"{target}: {exc.strerror or exc}") from None
        return [self._move(ref, reader, folder, target) for ref, reader in zip(refs, self.readers(refs))]

    def delete(self, refs: Sequence[MessageRef], hard: bool = False) -> list[ActionResult]:
        """Move each message to the ``Trash`` folder, or with ``hard`` remove its file.

        Returns one ActionResult per ref; a message that cannot be found is not ok."""
        if not hard:
            return self.quarantine(refs, "Trash")
        results = []
        for ref, reader in zip(refs, self.readers(refs)):
            try:
                os.unlink(reader.locate()[0])
                results.append(ActionResult(ref, True, "deleted"))
            except (OSError, FetchError) as exc:
                results.append(ActionResult(ref, False, f"not deleted: {exc}"))
        return results

    def _move(self, ref: MessageRef, reader: MaildirFile, folder: str, target: str) -> ActionResult:
        if ref.folder == folder:
            return ActionResult(ref, False, f"already in {folder}")
        try:
            src, data = reader.locate()
        except FetchError as exc:
            return ActionResult(ref, False, f"not moved: {exc}")
        name = os.path.basename(src)
        tmp = os.path.join(target, "tmp", name)
        dst = os.path.join(target, "cur", name if ":" in name else name + ":2,")
        made: list[str] = []
        try:
            _write_synced(tmp, data)
            made.append(tmp)
            with _open_readonly(tmp) as f:
                if hashlib.sha256(f.read()).digest() != hashlib.sha256(data).digest():
                    raise OSError("the copy differs from the original")
            os.link(tmp, dst)  # fails rather than overwrite a message already there
            made.append(dst)
            _fsync_dir(os.path.dirname(dst))
            os.unlink(src)
            _fsync_dir(os.path.dirname(src))
        except OSError as exc:
            for path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return ActionResult(ref, False, f"not moved, original kept: {exc.strerror or exc}")
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return ActionResult(ref, True, f"moved to {folder}", new_id=ref.id)


def _write_synced(path: str, data: bytes) -> None:
    """Create ``path`` (never overwriting) holding ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- mbox ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MboxMessage:
    """One message of an mbox: ``offset`` of its ``From `` line, sha256 ``digest`` and
    ``size`` of its un-escaped bytes, and those bytes when they were asked for."""

    offset: int
    digest: str
    size: int
    data: bytes | None = None


class _MessageBuilder:
    """Accumulates one mbox message's un-escaped bytes: hashes and optionally keeps them."""

    def __init__(self, offset: int, keep: bool):
        self.offset = offset
        self.hash = hashlib.sha256()
        self.size = 0
        self.chunks: list[bytes] | None = [] if keep else None

    def add(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        if self.chunks is not None:
            self.chunks.append(data)

    def finish(self) -> MboxMessage:
        data = b"".join(self.chunks) if self.chunks is not None else None
        return MboxMessage(self.offset, self.hash.hexdigest(), self.size, data)


class _MboxSplitter:
    """Splits mbox blocks (whole lines, or pieces of one overlong line) into messages."""

    def __init__(self, offset: int, mboxrd: bool, keep: bool):
        self.pos = offset  # file offset of the next block
        self.mboxrd = mboxrd
        self.keep = keep
        self.current: _MessageBuilder | None = None
        self.pending = b""  # a trailing blank line: dropped if a From line follows it
        self.at_line_start = True  # the next block starts a line
        self.prev_blank = True  # the line before the next block is blank (or it is the start)
        self.in_from_line = False  # the next block continues a From line

    def feed(self, block: bytes) -> list[MboxMessage]:
        """Process ``block``; returns the messages it completed."""
        done: list[MboxMessage] = []
        i = self._skip_from_line(block, 0) if self.in_from_line else 0
        if not self.in_from_line:
            for s, quotes in self._from_lines(block, i):
                if quotes:
                    if self.mboxrd or quotes == 1:
                        self._add(block[i:s])
                        i = s + 1  # drop one ">"
                    continue
                blank = self._blank_before(block, s)
                if blank is None:
                    continue  # a From line inside a paragraph is text
                if s:
                    self._add(block[i : s - blank])
                self.pending = b""
                if self.current is not None:
                    done.append(self.current.finish())
                self.current = _MessageBuilder(self.pos + s, self.keep)
                i = self._skip_from_line(block, s)
                if self.in_from_line:
                    break
        last_blank = self._last_line_blank(block, i)
        if not self.in_from_line:
            if last_blank:
                self._add(block[i : len(block) - len(last_blank)])
                self.pending = last_blank
            else:
                self._add(block[i:])
        self.prev_blank = bool(last_blank)
        self.at_line_start = block.endswith(b"\n")
        self.pos += len(block)
        return done

    def finish(self) -> list[MboxMessage]:
        """The last message, at the end of the file (its trailing blank line dropped)."""
        return [self.current.finish()] if self.current is not None else []

    def _from_lines(self, block: bytes, i: int) -> Iterator[tuple[int, int]]:
        """(start, number of leading ">") of each From line of ``block`` from ``i`` on."""
        if i == 0 and self.at_line_start and (m := _FROM_LINE.match(block)):
            yield 0, len(m.group(1))
        for m in _NEW_FROM_LINE.finditer(block, max(i - 1, 0)):
            yield m.start() + 1, len(m.group(1))

    def _add(self, data: bytes) -> None:
        if self.current is not None:
            if self.pending:
                self.current.add(self.pending)
            self.current.add(data)
        self.pending = b""

    def _skip_from_line(self, block: bytes, start: int) -> int:
        end = block.find(b"\n", start)
        self.in_from_line = end < 0
        return len(block) if end < 0 else end + 1

    def _line_start(self, block: bytes, end: int) -> int | None:
        """Start of the line that ends at ``end`` (exclusive) or None when that line began
        in an earlier block (it is then part of an overlong line, never blank)."""
        start = block.rfind(b"\n", 0, end - 1) + 1
        return None if start == 0 and not self.at_line_start else start

    def _blank_before(self, block: bytes, s: int) -> int | None:
        """Length in ``block`` of the blank line before position ``s``, None if not blank."""
        if s == 0:
            return 0 if self.prev_blank else None
        start = self._line_start(block, s)
        return s - start if start is not None and block[start:s] in _BLANK_LINES else None

    def _last_line_blank(self, block: bytes, i: int) -> bytes:
        """The block's last line when it is a whole blank line after ``i``, else b""."""
        if not block.endswith(b"\n"):
            return b""
        start = self._line_start(block, len(block))
        if start is None or start < i or block[start:] not in _BLANK_LINES:
            return b""
        return block[start:]


def mbox_messages(
    f: BinaryIO, fmt: str = "mboxrd", offset: int = 0, keep: bool = False,
    block: int = 0,
) -> Iterator[MboxMessage]:
    """Stream the messages of an mbox file from ``offset`` (which starts a ``From `` line).

    A message starts at a ``From `` line at the start of the file or after a blank line; the
    ``From `` line and the blank line before the next one are not part of it. Lines are
    un-escaped per ``fmt``: ``mboxrd`` strips one ``>`` from ``>+From `` lines, ``mboxo``
    from ``>From `` lines. ``keep`` keeps each message's bytes. Reads ``block`` bytes at a
    time (default ``_MBOX_CHUNK``); memory holds two blocks, or one message with ``keep``.
    """
    size = block or _MBOX_CHUNK
    splitter = _MboxSplitter(offset, fmt == "mboxrd", keep)
    f.seek(offset)
    carry = b""
    while data := f.read(size):
        buf = carry + data
        cut = buf.rfind(b"\n") + 1
        if cut == 0 and len(buf) < size:
            carry = buf
            continue
        cut = cut or len(buf)  # no line end: a piece of an overlong line
        yield from splitter.feed(buf[:cut])
        carry = buf[cut:]
    if carry:
        yield from splitter.feed(carry)
    yield from splitter.finish()


@register("mbox")
class MboxConnector(_LocalConnector):
    """An mbox file (mboxrd by default; ``options.extra["mbox_format"] = "mboxo"`` for mboxo).

    One mailbox and one folder, both named after the file. Message id: the byte offset of its
    ``From `` line; version: sha256 of its un-escaped bytes, so a rewritten mbox is detected.
    Raises SourceError when ``PATH`` is not an mbox file, UsageError for an unknown format.
    """

    scheme = "mbox"

    def __init__(self, source: str, options: SourceOptions):
        path = _path_of(source)
        fmt = options.extra.get("mbox_format", "mboxrd")
        if fmt not in _MBOX_FORMATS:
            raise UsageError(f"mbox_format {fmt!r} is not one of {', '.join(_MBOX_FORMATS)}")
        if not os.path.isfile(path):
            raise SourceError(f"{path}: not an mbox file (no such file)")
        with map_local_errors(path), _open_readonly(path) as f:
            head = f.read(5)
        if head and head != b"From ":
            raise SourceError(f"{path}: not an mbox file (does not start with 'From ')")
        name = os.path.basename(path)
        super().__init__(source, options, path, name)
        self.format = fmt

    def folders(self, mailbox: str) -> list[str]:
        """The one folder, named after the file, unless the include/exclude globs drop it."""
        return _select([self.mailbox], self.options) if mailbox == self.mailbox else []

    def _folder_exists(self, folder: str) -> bool:
        return folder == self.mailbox

    def refs(self, mailbox: str, folder: str) -> Iterator[list[MessageRef]]:
        """Every message in file order, hashed while streaming the file once.

        Raises SourceError when the file cannot be read."""
        self._check(mailbox, folder)
        cursor = self._snapshot(folder)
        with map_local_errors(self.path), _open_readonly(self.path) as f:
            yield from _batches(
                (
                    MessageRef(self.source, mailbox, folder, str(m.offset), m.digest, m.size)
                    for m in mbox_messages(f, self.format)
                ),
                self.options.batch_count,
            )
        self._listed(folder, cursor)

    def _watched(self, folder: str) -> list[str]:
        return [self.path]

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes | Exception]]:
        """Each message's un-escaped bytes, read at its offset. A message whose bytes no
        longer match its version (the mbox was rewritten) or that cannot be read yields
        FetchError."""
        try:
            f = _open_readonly(self.path)
        except OSError as exc:
            for ref in refs:
                yield ref, FetchError(f"{self.path}: {exc.strerror or exc}")
            return
        with f:
            for ref in sorted(refs, key=lambda r: int(r.id) if r.id.isdigit() else -1):
                yield ref, self._read(f, ref)

    def _read(self, f: BinaryIO, ref: MessageRef) -> bytes | FetchError:
        where = f"{self.path} at offset {ref.id}"
        if not ref.id.isdigit():
            return FetchError(f"{where}: not an mbox message id")
        offset = int(ref.id)
        try:
            f.seek(max(0, offset - 1))
            head = f.read(6 if offset else 5)
            if head != (b"\nFrom " if offset else b"From "):
                return FetchError(f"{where}: no message starts there any more")
            block = min(_MBOX_CHUNK, (ref.size or 0) + _FETCH_SLACK)
            found = next(mbox_messages(f, self.format, offset, True, block), None)
        except OSError as exc:
            return FetchError(f"{where}: {exc.strerror or exc}")
        if found is None or found.digest != ref.version:
            return FetchError(f"{where}: the message changed since it was listed")
        assert found.data is not None
        return found.data


# --- .eml files ---------------------------------------------------------------------------


def _is_eml(name: str) -> bool:
    return name.lower().endswith(".eml")


def looks_like_message(path: str) -> bool:
    """True when file ``path`` starts with an RFC 5322 header field line."""
    with _open_readonly(path) as f:
        return bool(_HEADER_LINE.match(f.read(1000)))


@register("eml")
class EmlConnector(_LocalConnector):
    """A directory tree of ``.eml`` files, or one message file.

    Folders: the relative directory paths holding ``.eml`` files (``INBOX`` for the top).
    Message id: the relative file path; version: ``size:mtime_ns``.
    Raises SourceError when ``PATH`` does not exist.
    """

    scheme = "eml"

    def __init__(self, source: str, options: SourceOptions):
        path = _path_of(source)
        if not os.path.exists(path):
            raise SourceError(f"{path}: no such file or directory")
        self.single = not os.path.isdir(path)
        root = os.path.dirname(os.path.abspath(path)) if self.single else path
        super().__init__(source, options, path, os.path.basename(os.path.abspath(path)))
        self.root = root

    def folders(self, mailbox: str) -> list[str]:
        """Directories holding ``.eml`` files, INBOX first then sorted, filtered by the
        include/exclude globs. Raises SourceError when the tree cannot be listed."""
        if mailbox != self.mailbox:
            return []
        if self.single:
            return _select([INBOX], self.options)
        found: set[str] = set()

        def fail(exc: OSError) -> None:
            raise exc

        with map_local_errors(self.root):
            for top, dirs, files in os.walk(self.root, onerror=fail):
                if any(_is_eml(n) for n in files):
                    rel = os.path.relpath(top, self.root)
                    found.add(INBOX if rel == "." else rel.replace(os.sep, "/"))
        return _select(sorted(found, key=lambda n: (n != INBOX, n)), self.options)

    def _folder_dir(self, folder: str) -> str:
        return self.root if folder == INBOX else os.path.join(self.root, *folder.split("/"))

    def _folder_exists(self, folder: str) -> bool:
        if self.single:
            return folder == INBOX
        parts = folder.split("/")
        return ".." not in parts and not os.path.isabs(folder) and os.path.isdir(
            self._folder_dir(folder))

    def refs(self, mailbox: str, folder: str) -> Iterator[list[MessageRef]]:
        """Every ``.eml`` file of ``folder`` (stat only), sorted by name.

        Raises SourceError when the folder does not exist or cannot be listed."""
        self._check(mailbox, folder)
        base = self._folder_dir(folder)
        prefix = "" if folder == INBOX else folder + "/"
        with map_local_errors(base):
            if self.single:
                found = [(os.path.basename(self.path), os.stat(self.path))]
            else:
                found = sorted(self._stat_emls(base))
        yield from _batches(
            (
                MessageRef(self.source, mailbox, folder, prefix + name,
                           f"{st.st_size}:{st.st_mtime_ns}", st.st_size)
                for name, st in found
            ),
            self.options.batch_count,
        )

    @staticmethod
    def _stat_emls(base: str) -> Iterator[tuple[str, os.stat_result]]:
        """(name, stat) of each ``.eml`` file directly in ``base``; vanished files left out."""
        for e in os.scandir(base):
            if not _is_eml(e.name):
                continue
            try:
                if e.is_file():
                    yield e.name, e.stat()
            except FileNotFoundError:
                continue

    def readers(self, refs: Sequence[MessageRef]) -> list[EmlFile]:
        """An EmlFile per ref."""
        return [EmlFile(self.root, r.id, r.size or 0) for r in refs]


@dataclass(frozen=True)
class EmlFile:
    """One message file of an .eml tree (``id``: its path under ``root``). Picklable: a
    worker process reads it itself (see ``Connector.readers``)."""

    root: str
    id: str
    size: int

    def read(self) -> bytes:
        """The file's bytes. Raises FetchError when it is missing, unreadable, or its id is not
        a path inside the tree."""
        parts = self.id.split("/")
        if os.path.isabs(self.id) or ".." in parts:
            raise FetchError(f"{self.id}: not a path inside {self.root}")
        try:
            return _read_whole(os.path.join(self.root, *parts))
        except OSError as exc:
            raise FetchError(f"{self.id}: {exc.strerror or exc}") from None


# --- bare paths ---------------------------------------------------------------------------


@register("local")
def open_local(source: str, options: SourceOptions) -> Connector:
    """The connector for a bare path: a directory with ``cur``/``new``/``tmp`` is a Maildir,
    a directory with ``.eml`` files an eml tree, a file starting with ``From `` an mbox, a
    file starting with a header line one message.

    Raises SourceError (one line naming the path) when it is none of these."""
    path = os.path.expanduser(source)
    with map_local_errors(path):
        if not os.path.exists(path):
            raise SourceError(f"{path}: no such file or directory")
        if os.path.isdir(path):
            if is_maildir(path) and os.path.isdir(os.path.join(path, "tmp")):
                return MaildirConnector(source, options)
            if any(any(_is_eml(n) for n in files) for _, _, files in os.walk(path)):
                return EmlConnector(source, options)
            raise SourceError(f"{path}: not a mail store (no Maildir cur/new/tmp, no .eml files)")
        with _open_readonly(path) as f:
            head = f.read(5)
        if head == b"From ":
            return MboxConnector(source, options)
        if looks_like_message(path):
            return EmlConnector(source, options)
    raise SourceError(f"{path}: not a mail store (neither an mbox nor a message file)")
