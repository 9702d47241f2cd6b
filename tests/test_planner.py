"""The planner against a real state store: skip, delta, full, and which partial messages a
delta scan may serve."""

from __future__ import annotations

import pytest

from rescan.models import MessageRef
from rescan.planner import StatePlanner
from rescan.state import StateStore, StoredMessage

OLD = {"a.yar": "1", "b.yar": "1"}
NEW = {"a.yar": "1", "b.yar": "1", "c.yar": "1"}
CHANGED = {"a.yar": "1", "b.yar": "2"}


def stored(i: int, status: str, problems: list[dict] = (), stamp: dict = OLD) -> StoredMessage:
    return StoredMessage("maildir:/m", "mb", "INBOX", f"m{i}", f"v{i}", 10, None, dict(stamp),
                         status, [], list(problems), None, None)


def ref(i: int, version: str | None = None) -> MessageRef:
    return MessageRef("maildir:/m", "mb", "INBOX", f"m{i}", version or f"v{i}", 10)


@pytest.fixture
def store(tmp_path):
    s = StateStore(str(tmp_path / "state.sqlite"))
    run = s.begin_run({}, [])
    s.record(run, [
        stored(1, "clean"),
        stored(2, "infected"),
        stored(3, "partial", [{"code": "malformed", "detail": "MIME", "part": None}]),
        stored(4, "partial", [{"code": "limit:max-files", "detail": "x", "part": "2"},
                              {"code": "malformed", "detail": "y", "part": None}]),
        stored(5, "partial", [{"code": "encrypted", "detail": "zip", "part": "2"}]),
        stored(6, "partial", [{"code": "timeout", "detail": "t", "part": "2"}]),
        stored(7, "partial", [{"code": "unsupported", "detail": "rar", "part": "2"}]),
        stored(8, "error", [{"code": "crash", "detail": "c", "part": None}]),
        stored(9, "clean", stamp=NEW),
    ])
    yield s
    s.close()


def kinds(store, components, refs, full=False):
    plans = StatePlanner(store, components, full).plan(refs)
    return [(p.kind, p.components) for p in plans]


def test_added_rule_file_gives_delta_scans_and_partials_only_when_their_gaps_repeat(store):
    refs = [ref(i) for i in range(1, 10)] + [ref(10)]
    assert kinds(store, NEW, refs) == [
        ("delta", ("c.yar",)),  # clean
        ("delta", ("c.yar",)),  # infected
        ("delta", ("c.yar",)),  # partial: malformed MIME is malformed again
        ("delta", ("c.yar",)),  # partial: a limit (limits are in the fingerprints)
        ("full", None),  # encrypted: a password may open it now
        ("full", None),  # a timeout may not happen again
        ("full", None),  # a reader may be installed now
        ("full", None),  # the last scan failed
        ("skip", None),  # already scanned with c.yar
        ("full", None),  # unknown
    ]


def test_changed_version_full_and_current_stamps(store):
    assert kinds(store, OLD, [ref(1), ref(3), ref(1, "v1-changed")]) == [
        ("skip", None), ("skip", None), ("full", None)]
    assert kinds(store, CHANGED, [ref(2)]) == [("delta", ("b.yar",))]
    assert kinds(store, NEW, [ref(1), ref(3)], full=True) == [("full", None), ("full", None)]
