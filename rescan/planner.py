"""The planner: compares each ref with its stamp in the state store and the current definitions.

- unknown, or its version token changed, or its last scan failed → ``full`` scan (also when
  definitions changed for a message that was not fully scanned last time, unless what it
  missed is certain to be missed again: malformed MIME, a limit; the extractor's version and
  the limits are in every component's fingerprint);
- stamp equal to the current components → ``skip`` (not fetched at all);
- some components added or changed since its stamp → ``delta``: fetched and scanned with only
  those components; findings of removed components are dropped.
``full=True`` (``--full``) ignores stamps.
"""

from __future__ import annotations

from typing import Sequence

from rescan.models import Finding, MessageRef, Problem, Status, Verdict
from rescan.pipeline import Plan

# Problem codes that a scan with the same extractor and limits meets again, wherever it runs:
# a message partial only for these gets a delta scan like a fully scanned one (``limit:*`` too).
REPEATABLE = frozenset({"malformed"})


def stored_verdict(stored, keep: set[str] | None = None) -> Verdict:
    """The verdict kept in the state store, with findings limited to components in ``keep``."""
    findings = tuple(
        Finding.from_json(f) for f in stored.findings if keep is None or f["namespace"] in keep
    )
    problems = tuple(Problem(p["code"], p["detail"], p.get("part")) for p in stored.problems)
    status = Status(stored.status)
    if status in (Status.CLEAN, Status.INFECTED):
        status = Verdict.decide(findings, problems)
    return Verdict(status, findings, problems, stored.message_id, None, 0)


class StatePlanner:
    """Plans against a ``rescan.state.StateStore`` and the current component fingerprints."""

    def __init__(self, store, components: dict[str, str], full: bool = False):
        self.store = store
        self.components = components
        self.full = full
        self._diffs: dict[int, tuple[dict, tuple[str, ...], bool]] = {}

    def _diff(self, stamp: dict[str, str]) -> tuple[tuple[str, ...], bool]:
        """(components stale in ``stamp``, whether it names removed ones). Messages share a few
        distinct stamp objects (the store hands out one dict per distinct stamp), so each is
        compared once per run, not once per message."""
        hit = self._diffs.get(id(stamp))
        if hit is None or hit[0] is not stamp:
            cur = self.components
            stale = tuple(c for c in cur if stamp.get(c) != cur[c])
            hit = (stamp, stale, any(c not in cur for c in stamp))
            self._diffs[id(stamp)] = hit
        return hit[1], hit[2]

    def plan(self, refs: Sequence[MessageRef]) -> list[Plan]:
        """One Plan per ref, in order."""
        stored = self.store.get_messages([r.key for r in refs])
        return [self._plan_one(ref, stored.get(ref.key)) for ref in refs]

    def _plan_one(self, ref: MessageRef, s) -> Plan:
        if s is None or s.version != ref.version:
            return Plan("full")
        was_clean = s.status == Status.CLEAN.value
        if self.full or s.status == Status.ERROR.value:
            return Plan("full", was_clean_or_unknown=was_clean)
        stale, removed = self._diff(s.stamp)
        keep = set(self.components) if removed else None
        previous = stored_verdict(s, keep)
        if not stale:
            return Plan("skip", previous=previous, was_clean_or_unknown=was_clean, rewrite=removed)
        if s.status not in (Status.CLEAN.value, Status.INFECTED.value) and not all(
            p["code"] in REPEATABLE or p["code"].startswith("limit:") for p in s.problems
        ):
            # a timeout, an archive that another password or reader may open: scan it all again
            return Plan("full", was_clean_or_unknown=was_clean)
        return Plan("delta", components=stale, previous=previous, was_clean_or_unknown=was_clean)
