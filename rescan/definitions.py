"""Definitions: the loaded engines (rule files, clamd) plus the limits, and their fingerprints.

A *component* is one rule file (named by its path relative to ``--rules``) or one engine's
database (``clamav``). Its fingerprint hashes what changes its answers; the extraction limits
and the extractor's version are folded into every component's fingerprint, because changing
them changes results too. The definitions *version* is a short hash over all components.
A message's *stamp* is the components map it was last scanned with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from rescan.engines import EngineSpec
from rescan.models import Limits

# Bump when extraction changes in a way that changes results, so every stamp goes stale.
EXTRACTOR_VERSION = "1"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class Definitions:
    """Engines and limits for one run."""

    specs: list[EngineSpec]
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        salt = _digest({"limits": self.limits.as_dict(), "extractor": EXTRACTOR_VERSION})
        self._components: dict[str, str] = {}
        self._engine_of: dict[str, str] = {}
        for spec in self.specs:
            for name, fp in spec.components().items():
                self._components[name] = _digest([fp, salt])
                self._engine_of[name] = spec.name
        self._components = dict(sorted(self._components.items()))
        self._subset_fps: dict[tuple[str, ...] | None, str] = {}

    @classmethod
    def build(cls, rules=(), clamd: str | None = None, limits: Limits | None = None) -> Definitions:
        """Engines for a run: YARA from ``rules`` (the bundled rules when neither ``rules`` nor
        ``clamd`` is given) and ClamAV from ``clamd``. Raises DefinitionsError."""
        from rescan.engines.yara import BUNDLED_RULES, YaraSpec

        specs: list[EngineSpec] = []
        if rules or not clamd:
            specs.append(YaraSpec(list(rules) or [BUNDLED_RULES]))
        if clamd:
            from rescan.engines.clamav import ClamdSpec

            specs.append(ClamdSpec(clamd))
        return cls(specs, limits or Limits())

    def components(self) -> dict[str, str]:
        """Component name → fingerprint (limits included)."""
        return dict(self._components)

    @property
    def version(self) -> str:
        """The definitions version: a short hash over every component's fingerprint."""
        return _digest(self._components)[:16]

    def fingerprint_of(self, components: list[str] | tuple[str, ...] | None) -> str:
        """Fingerprint of a subset of components (all when None), used as a verdict-cache key
        (asked once per batch of messages: remembered)."""
        key = None if components is None else tuple(sorted(components))
        fp = self._subset_fps.get(key)
        if fp is None:
            names = self._components if key is None else key
            fp = self._subset_fps[key] = _digest({n: self._components[n] for n in names})
        return fp

    def changes_since(self, previous: dict[str, str] | None) -> dict[str, list[str]]:
        """Components added, changed and removed since ``previous`` (empty lists when None)."""
        if previous is None:
            return {"added": [], "changed": [], "removed": []}
        cur = self._components
        return {
            "added": sorted(set(cur) - set(previous)),
            "changed": sorted(n for n in cur if n in previous and previous[n] != cur[n]),
            "removed": sorted(set(previous) - set(cur)),
        }

    def to_json(self, previous: dict[str, str] | None = None) -> dict[str, Any]:
        """The ``run.definitions`` object of the JSON report."""
        engines = {spec.name: spec.describe() for spec in self.specs}
        counts: dict[str, int] = {}
        for spec in self.specs:
            rule_counts = getattr(spec, "rule_counts", None)
            if rule_counts:
                counts.update(rule_counts())
        return {
            "version": self.version,
            "engines": engines,
            "limits": self.limits.as_dict(),
            "rule_files": [
                {"name": n, "engine": self._engine_of[n], "fingerprint": fp, "rules": counts.get(n)}
                for n, fp in self._components.items()
            ],
            "changed_since_last_run": self.changes_since(previous),
        }
