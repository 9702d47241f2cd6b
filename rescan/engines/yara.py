"""YARA engine (yara-python).

Each rule file is its own namespace (its path relative to the ``--rules`` argument) and its own
*component*: its fingerprint hashes its content and every file it includes, so a changed
include changes the file's fingerprint. The externals that public rule sets expect
(``filename``, ``filepath``, ``extension``, ``filetype``, ``owner``) are defined at compile time
and set per part at match time.

Compiled rules cannot be pickled: the spec compiles once in the main process (which is also
where compile errors surface, naming file and line), saves the compiled rules to a file, and
each worker ``yara.load()``s that file once. A delta scan over a few rule files compiles that
subset in the worker, once per subset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Collection, Iterable

import yara

from rescan.engines import Engine, EngineSpec, ScanOutput
from rescan.errors import DefinitionsError
from rescan.models import Finding, Part, Problem

RULE_SUFFIXES = (".yar", ".yara")
BUNDLED_RULES = Path(__file__).resolve().parent.parent / "rules"
EXTERNALS = {"filename": "", "filepath": "", "extension": "", "filetype": "", "owner": ""}
KEEP_COMPILED = 8  # compiled rule sets kept in the cache (one per recent definitions version)
_INCLUDE = re.compile(rb'^\s*include\s+"([^"]+)"', re.M)
_RULE_DECL = re.compile(rb"^\s*(?:(?:private|global)\s+)*rule\s+\w+", re.M)
# Magic numbers for the ``filetype`` external, with the names public rule sets compare against.
_FILETYPES = (
    (b"MZ", "EXE"),
    (b"\x7fELF", "ELF"),
    (b"\xcf\xfa\xed\xfe", "MACH-O"),
    (b"\xce\xfa\xed\xfe", "MACH-O"),
    (b"\xca\xfe\xba\xbe", "MACH-O"),
    (b"MDMP", "MDMP"),
    (b"PK\x03\x04", "ZIP"),
    (b"%PDF", "PDF"),
    (b"\xd0\xcf\x11\xe0", "OLE"),
    (b"Rar!", "RAR"),
    (b"7z\xbc\xaf\x27\x1c", "7Z"),
)


def compiled_cache_dir() -> Path:
    """Where compiled rule sets are kept: ``$RESCAN_CACHE_DIR`` or the user's cache directory."""
    env = os.environ.get("RESCAN_CACHE_DIR")
    if env:
        return Path(env) / "compiled"
    import platformdirs

    return platformdirs.user_cache_path("rescan") / "compiled"


def find_rule_files(paths: Iterable[str | Path]) -> dict[str, Path]:
    """Namespace → rule file, for files and directories (searched recursively, hidden entries
    included, in sorted order). A directory's files are named relative to it; a file by its
    name. Raises DefinitionsError for a missing path, a directory without rule files, or two
    files that would get the same namespace."""
    found: dict[str, Path] = {}

    def add(ns: str, path: Path) -> None:
        if ns in found and found[ns] != path:
            raise DefinitionsError(f"two rule files share the name {ns!r}: {found[ns]} and {path}")
        found[ns] = path

    for given in paths:
        p = Path(given)
        if p.is_dir():
            root = p.resolve()
            prefix = len(str(root)) + 1
            files = sorted(
                os.path.join(d, name)[prefix:]
                for d, _, names in os.walk(root, followlinks=True)
                for name in names
                if os.path.splitext(name)[1].lower() in RULE_SUFFIXES
            )
            if not files:
                raise DefinitionsError(f"no .yar or .yara rule files in {p}")
            for rel in files:
                add(rel.replace(os.sep, "/"), root / rel)
        elif p.is_file():
            add(p.name, p.resolve())
        else:
            raise DefinitionsError(f"rule path not found: {p}")
    return dict(sorted(found.items()))


def fingerprint_rule_file(path: Path) -> str:
    """sha256 over the file's bytes and, recursively, the bytes of every file it includes."""
    return _read_rule_file(path)[0]


def _stamp(path: Path) -> list[int]:
    """[size, mtime in ns] of a rule file. Raises DefinitionsError when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DefinitionsError(f"cannot read rule file {path}: {exc.strerror}") from None
    return [st.st_size, st.st_mtime_ns]


def _read_rule_file(path: Path) -> tuple[str, int, list[list]]:
    """(fingerprint, rule count, [path, size, mtime] of every file read: ``path`` and,
    recursively, what it includes; each stamped before it is read). Raises DefinitionsError
    when one cannot be read."""
    h = hashlib.sha256()
    read: dict[Path, list[int]] = {}
    count = 0

    def feed(p: Path) -> None:
        nonlocal count
        if p in read:
            return
        read[p] = _stamp(p)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise DefinitionsError(f"cannot read rule file {p}: {exc.strerror}") from None
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
        if p == path:
            count = len(_RULE_DECL.findall(data))
        for inc in _INCLUDE.findall(data) if b"include" in data else ():
            feed((p.parent / inc.decode("utf-8", "replace")).resolve())

    feed(path)
    return h.hexdigest(), count, [[str(p), *st] for p, st in read.items()]


class _FileFacts:
    """Fingerprint and rule count per rule file, remembered in the cache directory with the
    size and mtime of every file that went into them (the file and what it includes, each
    stamped before it was read): a rerun over a large public rule set must not re-read every
    file."""

    def __init__(self, path: Path, facts: dict[str, list]):
        self.path = path
        self.facts = facts
        self.changed = False

    @classmethod
    def load(cls) -> _FileFacts:
        path = compiled_cache_dir() / "rule-files.json"
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            facts = {}
        return cls(path, facts if isinstance(facts, dict) else {})

    def get(self, file: Path) -> tuple[str, int]:
        """(fingerprint, rule count) of ``file``. Raises DefinitionsError when unreadable."""
        hit = self.facts.get(str(file))
        try:
            fp, count, read = hit
            if all(_stamp(name) == [size, mtime] for name, size, mtime in read):
                return fp, count
        except (TypeError, ValueError, DefinitionsError):  # another shape, a file gone: read anew
            pass
        fp, count, read = _read_rule_file(file)
        self.facts[str(file)] = [fp, count, read]
        self.changed = True
        return fp, count

    def save(self) -> None:
        """Write the facts back when anything was added (best effort: a cache)."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self.facts, out)
            os.replace(tmp, self.path)
        except OSError:
            pass


def filetype_of(data: bytes) -> str:
    """The ``filetype`` external for a part, from its magic number ("" when unknown)."""
    for magic, name in _FILETYPES:
        if data.startswith(magic):
            return name
    return ""


def compile_rules(files: dict[str, Path]) -> yara.Rules:
    """Compile rule files, each in its own namespace. Raises DefinitionsError naming the file
    and line of the first error (yara reports them as ``path(line): message``)."""
    try:
        return yara.compile(filepaths={ns: str(p) for ns, p in files.items()}, externals=EXTERNALS)
    except yara.SyntaxError as exc:
        raise DefinitionsError(f"rule file does not compile: {exc}") from None
    except yara.Error as exc:
        raise DefinitionsError(f"rules could not be compiled: {exc}") from None


class YaraSpec(EngineSpec):
    """YARA rules from files and directories. Compiles once at construction (so a broken rule
    file fails the run before any mail is touched) and saves the compiled rules for workers.

    ``timeout`` is yara's own per-match timeout in seconds (the pool keeps its own watchdog).
    """

    name = "yara"

    def __init__(self, paths: Iterable[str | Path], timeout: int = 60):
        self.files = find_rule_files(paths)
        self.timeout = timeout
        known = _FileFacts.load()
        facts = {ns: known.get(p) for ns, p in self.files.items()}
        known.save()
        self._components = {ns: f[0] for ns, f in facts.items()}
        self._counts = {ns: f[1] for ns, f in facts.items()}
        self.compiled_path = str(self._compiled())

    def _compiled(self) -> Path:
        """The compiled rules file for exactly these rule files, compiling them on a cache miss.
        Compiling a large public rule set takes seconds; a rerun with unchanged rules must not."""
        key = hashlib.sha256(repr(sorted(self._components.items())).encode()).hexdigest()[:32]
        cache = compiled_cache_dir()
        path = cache / f"{key}.yarc"
        if path.exists():
            os.utime(path)
            return path
        rules = compile_rules(self.files)
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-", suffix=".yarc")
        os.close(fd)
        rules.save(tmp)
        os.replace(tmp, path)
        for old in sorted(cache.glob("*.yarc"), key=lambda p: p.stat().st_mtime)[:-KEEP_COMPILED]:
            old.unlink(missing_ok=True)
        return path

    def components(self) -> dict[str, str]:
        return dict(self._components)

    def rule_counts(self) -> dict[str, int]:
        """Rule file → number of rules declared in it."""
        return dict(self._counts)

    def describe(self) -> dict[str, object]:
        return {"version": yara.__version__, "rules": sum(self.rule_counts().values())}

    def load(self) -> YaraEngine:
        return YaraEngine(self.compiled_path, self.files, self.timeout)


class YaraEngine(Engine):
    """Compiled YARA rules inside a worker process."""

    name = "yara"

    def __init__(self, compiled_path: str, files: dict[str, Path], timeout: int):
        self.rules = yara.load(compiled_path)
        self.files = files
        self.timeout = timeout
        self._subset = lru_cache(maxsize=8)(self._compile_subset)

    def _compile_subset(self, components: frozenset[str]) -> yara.Rules | None:
        chosen = {ns: p for ns, p in self.files.items() if ns in components}
        return compile_rules(chosen) if chosen else None

    def _rules_for(self, components: Collection[str] | None) -> yara.Rules | None:
        if components is None:
            return self.rules
        wanted = frozenset(set(components) & self.files.keys())
        if wanted == self.files.keys():
            return self.rules
        return self._subset(wanted)

    def scan_part(self, part: Part, components: Collection[str] | None = None) -> ScanOutput:
        rules = self._rules_for(components)
        if rules is None:
            return [], []
        name = part.filename or ""
        externals = {
            "filename": name,
            "filepath": part.path,
            "extension": os.path.splitext(name)[1].lstrip(".").lower(),
            "filetype": filetype_of(part.data),
            "owner": "",
        }
        try:
            matches = rules.match(data=part.data, externals=externals, timeout=self.timeout)
        except yara.TimeoutError:
            return [], [Problem("timeout", "yara match timed out", part.path)]
        except yara.Error as exc:
            return [], [Problem("engine", f"yara: {exc}", part.path)]
        findings = [
            Finding(
                engine="yara",
                rule=m.rule,
                namespace=m.namespace,
                tags=tuple(m.tags),
                meta=dict(m.meta),
                part=part.path,
                sha256=part.sha256,
            )
            for m in matches
        ]
        return findings, []
