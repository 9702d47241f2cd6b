"""Raw message → scannable parts, lazily and under explicit limits.

``extract(raw, limits)`` returns an ``Extraction``; iterating it yields ``Part``s one by one:

- ``headers``: the raw header block of the message;
- each MIME leaf, decoded (base64, quoted-printable, uuencode), at its IMAP section number,
  with ``/filename`` when it has one: ``1``, ``2/invoice.zip``, ``2.1``;
- every leaf, member or nested message whose *content* is a container (zip, tar, gzip, bzip2,
  xz, 7z, TNEF, Outlook .msg, RFC 822 message, mbox, uuencoded text) is yielded whole and then
  followed by its members: ``2/invoice.zip/payload.exe``; nested messages restart their
  sections: ``3/fwd.eml/headers``, ``3/fwd.eml/2/evil.zip/x.exe``.

Anything not reached (a limit, an encrypted or unsupported archive, malformed MIME) becomes a
``Problem`` in ``Extraction.problems``; extraction itself never raises on bad input.
"""

from __future__ import annotations

import binascii
import email
import hashlib
import quopri
import re
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from io import BytesIO
from typing import Iterator, Sequence

from rescan.containers import READERS, Budget, detect_type, sniff, uudecode
from rescan.models import Limits, Part, Problem

# Nesting of multipart entities inside one message; deeper is treated as malformed (no mail
# client nests this deep, and it keeps recursion far from Python's own limit).
MAX_MIME_DEPTH = 64

# How much decoded text of one part is searched for password hints.
PASSWORD_TEXT_LIMIT = 1024 * 1024

_UU_ENCODINGS = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})
_PASSWORD_HINT = re.compile(r"(?i)\b(?:passwor[dt]|pwd?|kennwort|passcode)\b([^\n]{0,80})")
_HINT_FILLER = frozenset(
    "is ist lautet the der die das for für fuer of zip file archive attachment anhang datei "
    "to zum open öffnen : = - –".split()
)
_PUNCT = "\"'“”‘’«»()[]<>.,;:!?*"
_TAGS = re.compile(r"<[^>]*>")


class Extraction:
    """The parts of one message, produced lazily.

    Iterating yields ``Part`` objects (with ``.data``) one by one and fills ``problems``
    with everything that could not be scanned. Iterating again starts over (``problems`` is
    cleared first). ``message_id`` and ``subject`` are decoded from the top header block
    when the object is made.
    """

    message_id: str | None
    subject: str | None
    problems: list[Problem]

    def __init__(self, raw: bytes, limits: Limits, passwords: Sequence[str] = ("infected",)):
        self._raw = raw
        self._limits = limits
        self._passwords = tuple(passwords)
        self.problems = []
        try:
            headers = BytesHeaderParser(policy=compat32).parsebytes(split_headers(raw)[0])
            self.message_id = _header_text(headers.get("message-id"))
            self.subject = _header_text(headers.get("subject"))
        except Exception:  # unreadable headers: the parts are still extracted and scanned
            self.message_id = self.subject = None

    def __iter__(self) -> Iterator[Part]:
        self.problems.clear()
        walker = _Walker(Budget(self._limits, self._passwords, self.problems))
        return walker.message(self._raw, "", 0, harvest=True)


def extract(raw: bytes, limits: Limits, passwords: Sequence[str] = ("infected",)) -> Extraction:
    """Prepare the extraction of one raw RFC 5322 message.

    Takes the message bytes, the limits, and passwords to try on encrypted archives (words
    near "password" in the message's text are tried too). Returns a lazy ``Extraction``.
    Never raises on malformed input.
    """
    return Extraction(raw, limits, passwords)


def split_headers(raw: bytes) -> tuple[bytes, bytes]:
    """Split a message at its first empty line into (header block, body). The header block
    keeps its final line break; without an empty line it is all header."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) >= 0]
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw[2 if raw.startswith(b"\r\n") else 1 :]
    if not ends:
        return raw, b""
    i, n = min(ends)
    return raw[: i + n // 2], raw[i + n :]


class _Walker:
    """One extraction pass: walks MIME, opens containers, keeps the budget."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.limits = budget.limits

    def message(self, raw: bytes, prefix: str, depth: int, parsed: Message | None = None,
                harvest: bool = False) -> Iterator[Part]:
        hpath = _join(prefix, "headers")
        header_block, body = split_headers(raw)
        if self.budget.admit(hpath, len(header_block)):
            yield _part(hpath, "text/rfc822-headers", None, header_block)
        msg = parsed
        if msg is None:
            try:
                msg = email.message_from_bytes(raw, policy=compat32)
            except Exception as e:  # the parser's failure is the message's fault
                self.budget.problem("malformed", f"MIME: {type(e).__name__}", prefix or None)
                yield from self._emit(_join(prefix, "1"), "text/plain", None, body, depth)
                return
        try:
            if harvest:
                self.budget.add_passwords_later(lambda: password_hints(msg))
            yield from self._entity(msg, [], prefix, depth)
        except Exception as e:  # a structure the email package cannot walk: keep what we have
            self.budget.problem("malformed", f"MIME: {type(e).__name__}", prefix or None)

    def _entity(self, ent: Message, sections: list[int], prefix: str,
                depth: int) -> Iterator[Part]:
        section = ".".join(map(str, sections)) or "1"
        where = _join(prefix, section) if sections or not ent.is_multipart() else (prefix or None)
        for defect in ent.defects:
            self.budget.problem("malformed", f"MIME: {type(defect).__name__}", where)
        if len(sections) > MAX_MIME_DEPTH:
            self.budget.problem("malformed", f"MIME nested deeper than {MAX_MIME_DEPTH}", where)
            return
        if ent.is_multipart():
            payload = ent.get_payload()
            if ent.get_content_maintype() != "message":
                for i, child in enumerate(payload, 1):
                    yield from self._entity(child, sections + [i], prefix, depth)
                return
            encoded = _encoded_message(ent, payload)
            if encoded is not None:  # a base64 or quoted-printable message/rfc822 (RFC 2046 forbids it; mailers do it)
                filename = _filename(ent) or "message.eml"
                yield from self._emit(_join(prefix, section, filename), "message/rfc822", filename, encoded, depth)
                return
            if ent.get_content_subtype() != "delivery-status" and payload:
                yield from self._nested(ent, payload[0], section, prefix, depth)
                return
            data = b"\n".join(_flatten(p) for p in payload)
        else:
            data = self._decode(ent, where)
        filename = _filename(ent)
        path = _join(prefix, section, filename)
        yield from self._emit(path, ent.get_content_type(), filename, data, depth)

    def _nested(self, ent: Message, sub: Message, section: str, prefix: str,
                depth: int) -> Iterator[Part]:
        filename = _filename(ent) or "message.eml"
        path = _join(prefix, section, filename)
        data = _flatten(sub)
        if not self.budget.admit(path, len(data)):
            return
        yield _part(path, "message/rfc822", filename, data, self._decrypted(path))
        if depth + 1 > self.limits.max_recursion:
            self._too_deep(path)
            return
        yield from self.message(data, path, depth + 1, parsed=sub)

    def _decode(self, ent: Message, where: str) -> bytes:
        cte = str(ent.get("content-transfer-encoding", "")).strip().lower()
        if cte in _UU_ENCODINGS:
            text = _payload_bytes(ent)
            begin = re.search(rb"^begin [0-7]{3,4} [^\r\n]*\r?$", text, re.M)
            data, complete = uudecode(text[begin.end():] if begin else text)
            if not begin or not complete:
                self.budget.problem("malformed", "uuencode: missing begin or end line", where)
            return data
        before = len(ent.defects)
        data = ent.get_payload(decode=True)
        for defect in ent.defects[before:]:
            self.budget.problem("malformed", f"MIME: {type(defect).__name__}", where)
        return data if isinstance(data, bytes) else _payload_bytes(ent)

    def _emit(self, path: str, ctype: str | None, filename: str | None, data: bytes,
              depth: int) -> Iterator[Part]:
        """Yield one part (typed by content when ``ctype`` is None), then, if its content is
        a container, its members."""
        if not self.budget.admit(path, len(data)):
            return
        kind = sniff(data)
        yield _part(path, ctype or detect_type(data, kind), filename, data, self._decrypted(path))
        if kind is None:
            return
        if depth + 1 > self.limits.max_recursion:
            self._too_deep(path)
            return
        if kind == "message":
            yield from self.message(data, path, depth + 1)
            return
        try:
            for name, body in READERS[kind](data, path, filename, self.budget):
                yield from self._emit(f"{path}/{name}", None, name, body, depth + 1)
        except ImportError as e:  # an optional archive library is not installed
            self.budget.problem("unsupported", f"{kind}: needs {e.name} (install rescan[archives])", path)
        except Exception as e:  # one boundary for every archive library's errors
            self.budget.problem("malformed", f"{kind}: {type(e).__name__}: {str(e)[:120]}", path)

    def _decrypted(self, path: str) -> bool:
        """True for a member of an archive opened with a password, at any depth below it."""
        return any(path == d or path.startswith(d + "/") for d in self.budget.decrypted)

    def _too_deep(self, path: str) -> None:
        self.budget.problem(
            "limit:max-recursion", f"containers nested deeper than {self.limits.max_recursion}", path
        )


def password_hints(msg: Message) -> list[str]:
    """Words that follow "password" (passwort, pw, kennwort...) in the message's subject and
    text parts, as candidates for encrypted archives. Takes a parsed message; returns them in
    order of appearance, without duplicates."""
    texts = [_header_text(msg.get("subject")) or ""]
    for ent in msg.walk():
        if ent.is_multipart() or ent.get_content_maintype() != "text":
            continue
        try:
            data = (ent.get_payload(decode=True) or b"")[:PASSWORD_TEXT_LIMIT]
            charset = ent.get_content_charset()
            text = data.decode(charset if _known_charset(charset) else "utf-8", "replace")
        except Exception:  # a part we cannot decode has no hint to give
            continue
        texts.append(_TAGS.sub(" ", text) if ent.get_content_subtype() == "html" else text)
    found: list[str] = []
    for text in texts:
        for m in _PASSWORD_HINT.finditer(text):
            words = [w for w in m.group(1).split() if w.strip(_PUNCT).lower() not in _HINT_FILLER]
            for word in words[:2]:
                found += [word.strip(_PUNCT), word]
    return _unique([w for w in found if w])


def _known_charset(charset: str | None) -> bool:
    if not charset:
        return False
    try:
        "".encode(charset)
        return True
    except LookupError:
        return False


def _part(path: str, ctype: str, filename: str | None, data: bytes, decrypted: bool = False) -> Part:
    return Part(path, ctype, filename, len(data), hashlib.sha256(data).hexdigest(), data, decrypted)


def _join(*pieces: str | None) -> str:
    return "/".join(p for p in pieces if p)


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _filename(ent: Message) -> str | None:
    try:
        name = ent.get_filename()
    except Exception:  # a broken RFC 2231 parameter: the part is still scanned, unnamed
        return None
    if not name:
        return None
    return _header_text(name)


def _payload_bytes(ent: Message) -> bytes:
    payload = ent.get_payload()
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):  # compat32 keeps undecodable bytes as surrogate escapes
        return payload.encode("utf-8", "surrogateescape")
    return b""


def _encoded_message(ent: Message, payload: list) -> bytes | None:
    """The decoded bytes of a message/* entity sent with a base64 or quoted-printable
    transfer encoding (which the parser cannot see through), else None."""
    cte = str(ent.get("content-transfer-encoding", "")).strip().lower()
    if cte not in ("base64", "quoted-printable") or not payload:
        return None
    text = b"".join(_flatten(p) for p in payload)
    if cte == "quoted-printable":
        return quopri.decodestring(text)
    data = b"".join(text.split())
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except binascii.Error:
        return data  # not base64 after all: scan the text as it is


def _flatten(msg: Message) -> bytes:
    """The bytes of a parsed (nested) message, without From-line mangling or re-wrapping."""
    buf = BytesIO()
    try:
        BytesGenerator(buf, mangle_from_=False, maxheaderlen=0).flatten(msg)
    except Exception:  # a header the generator cannot write: keep what was written
        pass
    return buf.getvalue()


def _header_text(value: object) -> str | None:
    """Decode an RFC 2047 header value to one stripped line; None when absent or empty."""
    if value is None:
        return None
    try:
        text = str(make_header(decode_header(str(value))))
    except Exception:  # undecodable encoded words: fall back to the raw text
        text = str(value)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(text.split()) or None
