"""Reports, derived from records only: the JSON document, the clamscan-style text, exit codes.

Order is deterministic: newly detected messages first, then by source, mailbox, folder, id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, TextIO

from rescan.models import Status

if TYPE_CHECKING:
    from rescan.pipeline import Record, RunError

EXIT_CLEAN, EXIT_INFECTED, EXIT_ERROR = 0, 1, 2


def now_iso() -> str:
    """The current UTC time as ISO 8601 text, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class Summary:
    """Counts over all records of a run."""

    messages_seen: int = 0
    messages_scanned: int = 0
    up_to_date: int = 0
    infected: int = 0
    new_infected: int = 0
    partial: int = 0
    errors: int = 0
    skipped: int = 0
    bytes_scanned: int = 0
    parts_from_cache: int = 0  # parts answered by the verdict cache (same content seen before)
    mailboxes: int = 0
    folders: int = 0
    folders_incremental: int = 0  # folders where only what changed since the last run was listed

    def add(self, rec: Record) -> None:
        """Count one record."""
        self.messages_seen += 1
        st = rec.verdict.status
        if rec.plan.kind == "skip":
            self.up_to_date += 1
        elif rec.scanned and st is not Status.ERROR:
            self.messages_scanned += 1
            self.bytes_scanned += rec.verdict.bytes_scanned
            self.parts_from_cache += rec.parts_from_cache
        if st is Status.INFECTED:
            self.infected += 1
            self.new_infected += rec.new
        elif st is Status.PARTIAL:
            self.partial += 1
        elif st is Status.ERROR:
            self.errors += 1
        elif st is Status.SKIPPED:
            self.skipped += 1

    def add_unchanged(self, n: int) -> None:
        """Count ``n`` clean messages known from earlier runs and not listed in this one (the
        unchanged part of incremental folders)."""
        self.messages_seen += n
        self.up_to_date += n

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Report:
    """Everything a report shows. ``records`` holds only the messages that are not clean."""

    start: str
    end: str = ""
    duration: float = 0.0
    sources: list[str] = field(default_factory=list)
    definitions: dict[str, Any] = field(default_factory=dict)
    summary: Summary = field(default_factory=Summary)
    records: list[Record] = field(default_factory=list)
    errors: list[RunError] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True

    def add(self, rec: Record) -> None:
        """Count a record, and keep it when its message is not clean."""
        self.summary.add(rec)
        if rec.verdict.status is not Status.CLEAN:
            self.records.append(rec)

    def ordered(self) -> list[Record]:
        """Not-clean records: new ones first, then by store location."""
        return sorted(self.records, key=lambda r: (not r.new, r.ref.key))

    @property
    def exit_code(self) -> int:
        """0 all scanned and clean; 1 something infected; 2 errors or anything not fully
        scanned (errors win over infected)."""
        s = self.summary
        if self.errors or s.errors or s.partial or s.skipped or not self.complete:
            return EXIT_ERROR
        if any(not a["ok"] for a in self.actions):
            return EXIT_ERROR
        if any(r.verdict.problems for r in self.records):
            return EXIT_ERROR
        return EXIT_INFECTED if s.infected else EXIT_CLEAN

    def to_json(self) -> dict[str, Any]:
        """The ``{"run": ..., "messages": [...]}`` document of DESIGN.md."""
        return {
            "run": {
                "start": self.start,
                "end": self.end,
                "duration_seconds": round(self.duration, 3),
                "complete": self.complete,
                "sources": self.sources,
                "definitions": self.definitions,
                "summary": self.summary.to_json(),
                "errors": [e.to_json() for e in sorted(self.errors, key=lambda e: (e.source, e.mailbox or "", e.folder or ""))],
                "actions": self.actions,
                "exit_code": self.exit_code,
            },
            "messages": [message_json(r) for r in self.ordered()],
        }


def message_json(rec: Record) -> dict[str, Any]:
    """One entry of the report's ``messages`` list."""
    v = rec.verdict
    return {
        "source": rec.ref.source,
        "mailbox": rec.ref.mailbox,
        "folder": rec.ref.folder,
        "id": rec.ref.id,
        "message_id": v.message_id,
        "subject": v.subject,
        "status": v.status.value,
        "new": rec.new,
        "rescanned": rec.scanned,
        "findings": [f.to_json() for f in v.findings],
        "problems": [p.to_json() for p in v.problems],
    }


def write_json(report: Report, out: TextIO) -> None:
    """Write the JSON report: the ``run`` object on one line, then one line per message (so
    that ``grep`` finds a message with all its findings; ``jq .`` shows it indented)."""
    doc = report.to_json()
    out.write('{"run": ' + json.dumps(doc["run"], default=str) + ',\n "messages": [')
    for i, message in enumerate(doc["messages"]):
        out.write(("\n  " if i == 0 else ",\n  ") + json.dumps(message, default=str))
    out.write("\n ]}\n" if doc["messages"] else "]}\n")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _printable(text: str, limit: int) -> str:
    """``text`` without control characters (mail headers are attacker-chosen), cut to ``limit``."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def _line(rec: Record) -> str:
    r, v = rec.ref, rec.verdict
    where = f"{r.source} {r.mailbox}/{r.folder} {r.id}"
    subject = f'"{_printable(v.subject, 100)}"' if v.subject else None
    about = " ".join(x for x in (_printable(v.message_id or "", 200), subject) if x)
    if about:
        where += f" {about}"
    tag = " [NEW]" if rec.new else ""
    if v.findings:
        names = ", ".join(sorted({f"{f.rule} ({f.namespace}) in {f.part or 'message'}" for f in v.findings}))
        line = f"{where}: {names} FOUND{tag}"
    else:
        line = f"{where}: {v.status.value.upper()}{tag}"
    for p in v.problems:
        line += f"\n    {p.code}: {p.detail}" + (f" [{p.part}]" if p.part else "")
    return line


def write_text(report: Report, out: TextIO) -> None:
    """Write the clamscan-style text report: one line per not-clean message, then a summary."""
    ordered = report.ordered()
    new = [r for r in ordered if r.new]
    if new:
        out.write(f"New this run ({len(new)}):\n")
    for i, rec in enumerate(ordered):
        if new and i == len(new) and len(ordered) > len(new):
            out.write("Previously known, still present:\n")
        out.write(_line(rec) + "\n")
    for e in report.errors:
        where = " ".join(x for x in (e.source, e.mailbox, e.folder) if x)
        out.write(f"{where}: ERROR {e.error}\n")
    for a in report.actions:
        out.write(f"{a['source']} {a['mailbox']}/{a['folder']} {a['id']}: {a['action']} {'OK' if a['ok'] else 'FAILED'} {a['detail']}\n")
    s, d = report.summary, report.definitions
    rules = sum(f.get("rules") or 0 for f in d.get("rule_files", []))
    changed = d.get("changed_since_last_run", {})
    out.write("\n----------- SCAN SUMMARY -----------\n")
    out.write(f"Definitions version: {d.get('version', '?')} ({len(d.get('rule_files', []))} rule files, {rules} rules)\n")
    if any(changed.values()):
        parts = [f"{len(changed[k])} {k}" for k in ("added", "changed", "removed") if changed.get(k)]
        out.write(f"Definitions changed since last run: {', '.join(parts)}\n")
    rows = [
        ("Mailboxes", s.mailboxes),
        ("Folders", s.folders if not s.folders_incremental else f"{s.folders} ({s.folders_incremental} incremental)"),
        ("Messages seen", s.messages_seen),
        ("Scanned messages", s.messages_scanned),
        ("Up to date (not rescanned)", s.up_to_date),
        ("Infected messages", f"{s.infected} ({s.new_infected} new)"),
        ("Partially scanned", s.partial),
        ("Errors", f"{s.errors}" + (f" (and {len(report.errors)} unreadable stores or folders)" if report.errors else "")),
        ("Skipped", s.skipped),
        ("Data scanned", _size(s.bytes_scanned)),
        ("Time", f"{report.duration:.3f} sec"),
        ("Start Date", report.start),
        ("End Date", report.end),
    ]
    if not report.complete:
        rows.append(("Stopped early", "yes: the next run continues"))
    for k, val in rows:
        out.write(f"{k}: {val}\n")


def collect(records: Iterable[Record], report: Report) -> Report:
    """Add every record to ``report``; returns it."""
    for rec in records:
        report.add(rec)
    return report
