"""The worker side: what runs inside each pool process.

``init_worker(specs, cache_path)`` loads the engines once per process. ``scan_message`` is the
task: pure and idempotent, it takes raw message bytes and which components to apply, and
returns a ``ScanResult``: the verdict plus verdict-cache rows for the main process to store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

from rescan.engines import Engine, EngineSpec
from rescan.errors import FetchError
from rescan.models import Finding, Limits, Part, Problem, Verdict, error_verdict, too_large

CACHE_MIN_SIZE = 1024  # smaller parts (and the header block) are unique per message: not cached
_engines: list[Engine] = []
_cache = None  # a read-only verdict cache (rescan.state.CacheReader) or None


@dataclass(frozen=True)
class ScanResult:
    """A verdict, the cache rows learned while reaching it (sha256, key, findings), how many
    parts were answered from the verdict cache instead of being scanned, and whether the
    message was scanned at all (not when it could not be read, or was too large)."""

    verdict: Verdict
    cache_rows: tuple[tuple[str, str, list[dict]], ...] = field(default=())
    parts_from_cache: int = 0
    scanned: bool = True


def init_worker(specs: list[EngineSpec], cache_path: str | None = None) -> None:
    """Pool initializer: load each engine once, and open the verdict cache read-only."""
    global _engines, _cache
    _engines = [spec.load() for spec in specs]
    _cache = None
    if cache_path:
        from rescan.state import CacheReader

        _cache = CacheReader(cache_path)


def _scan_part(
    part: Part, components: Collection[str] | None, cache_key: str | None
) -> tuple[list[Finding], list[Problem], tuple | None, bool]:
    if part.path == "headers" or part.size < CACHE_MIN_SIZE:
        cache_key = None
    if _cache is not None and cache_key:
        hit = _cache.get(part.sha256, cache_key)
        if hit is not None:
            return [_relocate(Finding.from_json(f), part) for f in hit], [], None, True
    findings: list[Finding] = []
    problems: list[Problem] = []
    for engine in _engines:
        if engine.unpacks_messages and not part.decrypted:
            continue
        f, p = engine.scan_part(part, components)
        findings += f
        problems += p
    row = None
    if cache_key and not problems:
        row = (part.sha256, cache_key, [f.to_json() for f in findings])
    return findings, problems, row, False


def _relocate(finding: Finding, part: Part) -> Finding:
    return Finding(finding.engine, finding.rule, finding.namespace, finding.tags, finding.meta, part.path, part.sha256)


def scan_message(
    raw: bytes,
    components: tuple[str, ...] | None,
    limits: Limits,
    cache_key: str | None = None,
    passwords: tuple[str, ...] = ("infected",),
) -> ScanResult:
    """Extract ``raw`` into parts and scan each with the loaded engines.

    ``components`` restricts the scan to some rule files (None: all). ``cache_key`` is the
    fingerprint of that component set: parts whose (sha256, cache_key) is in the verdict
    cache are not scanned again. Never raises for bad mail: problems end up on the verdict.
    """
    # Imported here, in the worker (the pool preloads it): a run that scans nothing, such as
    # a rerun with every stamp current, never loads the MIME and archive readers.
    from rescan.extract import extract

    findings: list[Finding] = []
    problems: list[Problem] = []
    rows = []
    for engine in _engines:
        f, p = engine.scan_message(raw, components)
        findings += f
        problems += p
    ext = extract(raw, limits, passwords)
    scanned = 0
    from_cache = 0
    for part in ext:
        f, p, row, hit = _scan_part(part, components, cache_key)
        findings += f
        problems += p
        scanned += part.size
        from_cache += hit
        if row is not None:
            rows.append(row)
    problems += ext.problems
    verdict = Verdict(
        status=Verdict.decide(tuple(findings), tuple(problems)),
        findings=tuple(findings),
        problems=tuple(problems),
        message_id=ext.message_id,
        subject=ext.subject,
        bytes_scanned=scanned,
    )
    return ScanResult(verdict, tuple(rows), from_cache)


def scan_batch(
    raws: list,
    components: tuple[str, ...] | None,
    limits: Limits,
    cache_key: str | None = None,
    passwords: tuple[str, ...] = ("infected",),
) -> list[ScanResult]:
    """``scan_message`` over several messages in one task (one round trip to the worker for
    many small messages). Each of ``raws`` is a message's bytes or a reader of them (see
    ``connectors.base.Connector.readers``), read here. Same other arguments; one ScanResult
    per message, in order."""
    results = []
    for raw in raws:
        if not isinstance(raw, bytes):
            try:
                raw = raw.read()
            except FetchError as exc:
                results.append(ScanResult(error_verdict("fetch", str(exc)), scanned=False))
                continue
            if len(raw) > limits.max_message_size:  # it grew since it was listed
                results.append(ScanResult(too_large(len(raw), limits.max_message_size), scanned=False))
                continue
        results.append(scan_message(raw, components, limits, cache_key, passwords))
    return results
