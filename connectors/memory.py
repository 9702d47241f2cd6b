"""An in-memory store for unit tests: ``MemoryStore`` holds mailboxes of folders of messages.

``memory:NAME`` opens a store registered with ``MemoryStore.register(NAME)``.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

from connectors.base import ActionResult, Connector, SourceOptions, register
from rescan.errors import FetchError, SourceError
from rescan.models import MessageRef

_STORES: dict[str, MemoryStore] = {}


class MemoryStore:
    """Mailboxes → folders → {id: raw bytes}. ``fail_fetch`` holds ids whose fetch fails."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, bytes]]] = {}
        self.fail_fetch: set[str] = set()
        self.fetches = 0

    def add(self, mailbox: str, folder: str, id: str, raw: bytes) -> None:
        self.data.setdefault(mailbox, {}).setdefault(folder, {})[id] = raw

    def register(self, name: str) -> str:
        """Make this store reachable as ``memory:NAME``; returns that source URL."""
        _STORES[name] = self
        return f"memory:{name}"


@register("memory")
class MemoryConnector(Connector):
    """Connector over a registered ``MemoryStore``."""

    max_connections = 8

    def __init__(self, source: str, options: SourceOptions):
        super().__init__(source, options)
        name = source.split(":", 1)[1]
        if name not in _STORES:
            raise SourceError(f"{source}: no such memory store")
        self.store = _STORES[name]

    def mailboxes(self) -> list[str]:
        return sorted(self.store.data)

    def folders(self, mailbox: str) -> list[str]:
        return sorted(self.store.data.get(mailbox, {}))

    def refs(self, mailbox: str, folder: str) -> Iterator[list[MessageRef]]:
        msgs = self.store.data[mailbox][folder]
        batch = []
        for id in sorted(msgs):
            version = hashlib.sha256(msgs[id]).hexdigest()[:16]
            batch.append(MessageRef(self.source, mailbox, folder, id, version, len(msgs[id])))
            if len(batch) >= self.options.batch_count:
                yield batch
                batch = []
        if batch:
            yield batch

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes | Exception]]:
        for ref in refs:
            self.store.fetches += 1
            raw = self.store.data.get(ref.mailbox, {}).get(ref.folder, {}).get(ref.id)
            if raw is None or ref.id in self.store.fail_fetch:
                yield ref, FetchError(f"{ref.id}: not found")
            else:
                yield ref, raw

    def tag(self, refs: Sequence[MessageRef], keyword: str) -> list[ActionResult]:
        return [ActionResult(r, True, f"tagged {keyword}") for r in refs]

    def quarantine(self, refs: Sequence[MessageRef], folder: str) -> list[ActionResult]:
        out = []
        for r in refs:
            raw = self.store.data[r.mailbox][r.folder][r.id]
            self.store.add(r.mailbox, folder, r.id, raw)
            del self.store.data[r.mailbox][r.folder][r.id]
            out.append(ActionResult(r, True, f"moved to {folder}", new_id=r.id))
        return out

    def delete(self, refs: Sequence[MessageRef], hard: bool = False) -> list[ActionResult]:
        if not hard:
            return self.quarantine(refs, "Trash")
        for r in refs:
            del self.store.data[r.mailbox][r.folder][r.id]
        return [ActionResult(r, True, "deleted") for r in refs]
