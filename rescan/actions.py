"""Actions: policy decides, connectors carry it out.

Only ``infected`` messages are acted on (``partial``, ``error`` and ``skipped`` ones are
reported, never touched). ``tag`` marks, ``quarantine`` moves to a quarantine folder,
``delete`` moves to the trash (or deletes with ``--hard``). Connectors copy, verify, then
delete; a failed action leaves the original in place and is reported (exit 2). An action
recorded in the state store is never applied twice; messages already in the quarantine
folder are left alone.
"""

from __future__ import annotations

from typing import Any, Sequence

from connectors.base import ActionResult
from rescan.errors import ActionError
from rescan.models import Status
from rescan.pipeline import Record

CHUNK = 100  # messages per connector call


def action_label(settings) -> str:
    """How an action is recorded: ``tag:$Infected``, ``quarantine:Quarantine``, ``delete``."""
    if settings.action == "tag":
        return f"tag:{settings.tag_name}"
    if settings.action == "quarantine":
        return f"quarantine:{settings.quarantine_folder}"
    return "delete:hard" if settings.hard else "delete"


def _targets(records: Sequence[Record], source: str, settings, session) -> list[Record]:
    label = action_label(settings)
    out = []
    for rec in records:
        if rec.ref.source != source or rec.verdict.status is not Status.INFECTED:
            continue
        if settings.action == "quarantine" and rec.ref.folder == settings.quarantine_folder:
            continue
        if session.action_done(rec.ref.key) == label:
            continue
        out.append(rec)
    return sorted(out, key=lambda r: r.ref.key)


def _call(conn, settings, refs) -> list[ActionResult]:
    if settings.action == "tag":
        return conn.tag(refs, settings.tag_name)
    if settings.action == "quarantine":
        return conn.quarantine(refs, settings.quarantine_folder)
    return conn.delete(refs, hard=settings.hard)


def apply_actions(connectors, records: Sequence[Record], settings, session) -> list[dict[str, Any]]:
    """Apply ``settings.action`` to the infected records of each connector. Returns one dict
    per message acted on (``source``, ``mailbox``, ``folder``, ``id``, ``action``, ``ok``,
    ``detail``, ``new_id``), in a deterministic order."""
    label = action_label(settings)
    results: list[dict[str, Any]] = []
    for conn in connectors:
        targets = _targets(records, conn.source, settings, session)
        for i in range(0, len(targets), CHUNK):
            refs = [r.ref for r in targets[i : i + CHUNK]]
            try:
                outcome = _call(conn, settings, refs)
            except ActionError as exc:
                outcome = [ActionResult(r, False, str(exc)) for r in refs]
            for res in outcome:
                r = res.ref
                results.append(
                    {
                        "source": r.source, "mailbox": r.mailbox, "folder": r.folder, "id": r.id,
                        "action": label, "ok": res.ok, "detail": res.detail, "new_id": res.new_id,
                    }
                )
                if res.ok:
                    session.mark_action(r.key, label, res.detail)
    return results
