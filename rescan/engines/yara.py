"""YARA engine (yara-python).

Each rule file is its own namespace (its path relative to the ``--rules`` argument) and its own
*component*: its fingerprint hashes its content and every file it includes, so a changed
include changes the file's fingerprint. The externals that public rule sets expect
(``filename``, ``filepath``, ``extension``, ``filetype``, ``owner``) are defined at compile time
and set per part at match time.

Compiled rules cannot be pickled: the spec compiles in the main process (which is also where
compile errors surface, naming file and line, before any mail is read), saves the compiled rules
in the cache directory, and each worker ``yara.load()``s them once. Compiling a large public
rule set takes seconds, so the whole set is compiled only when no earlier compiled set covers
most of it: after a few rule files are added or changed, only those are compiled, and the whole
set is *layered*: the earlier compiled set (its matches from removed or changed files dropped)
plus the new files. Matches are ordered as one compiled set would order them. A delta scan over
a few rule files compiles that subset in the worker, once per subset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Collection, Iterable, Iterator

import yara

from rescan.engines import Engine, EngineSpec, ScanOutput
from rescan.errors import DefinitionsError
from rescan.models import Finding, Part, Problem

RULE_SUFFIXES = (".yar", ".yara")
BUNDLED_RULES = Path(__file__).resolve().parent.parent / "rules"
EXTERNALS = {"filename": "", "filepath": "", "extension": "", "filetype": "", "owner": ""}
KEEP_COMPILED = 8  # compiled rule sets kept in the cache (one per recent definitions version)
# Layering is used when the files not in an earlier compiled set are at most this share of all.
LAYER_SHARE = 0.1
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


def _set_key(components: dict[str, str]) -> str:
    """The cache name of a compiled set: a hash of its rule files and their fingerprints."""
    return hashlib.sha256(repr(sorted(components.items())).encode()).hexdigest()[:32]


def compile_to_cache(files: dict[str, Path], components: dict[str, str]) -> Path:
    """Compile ``files`` (whose fingerprints are ``components``) into the compiled-rules cache,
    with a note of its components next to it, and keep the KEEP_COMPILED most recently used
    sets. Returns the compiled file. Raises DefinitionsError."""
    rules = compile_rules(files)
    cache = compiled_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{_set_key(components)}.yarc"
    for target, write in (
        (path, rules.save),
        (path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(components), encoding="utf-8")),
    ):
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
        os.close(fd)
        write(tmp)
        os.replace(tmp, target)
    for old in sorted(cache.glob("*.yarc"), key=lambda p: p.stat().st_mtime)[:-KEEP_COMPILED]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    for old in sorted(cache.glob("*.layers.json"), key=lambda p: p.stat().st_mtime)[:-KEEP_COMPILED]:
        old.unlink(missing_ok=True)
    return path


def _cached_sets() -> Iterator[tuple[Path, dict[str, str]]]:
    """(compiled file, its components) of every compiled set in the cache."""
    for note in compiled_cache_dir().glob("*.json"):
        path = note.with_suffix(".yarc")
        try:
            components = json.loads(note.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(components, dict) and path.exists():
            yield path, components


class YaraSpec(EngineSpec):
    """YARA rules from files and directories. Compiles at construction what no compiled set
    in the cache holds (so a broken rule file fails the run before any mail is touched) and
    saves it for the workers. ``layers``: (compiled file, namespaces taken from it, or None
    for all of it), together the whole rule set (see the module docstring).

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
        self.layers = self._compiled()

    def _compiled(self) -> list[tuple[str, tuple[str, ...] | None]]:
        """The layers of the whole set: the cached compiled set of exactly these files; else
        the layers chosen for them before (``<key>.layers.json``), while all are cached; else
        the cached set that holds the most of them as they are now, plus the others compiled
        here (or found compiled), when those are few; else the whole set compiled here."""
        cur = self._components
        cache = compiled_cache_dir()
        key = _set_key(cur)
        path = cache / f"{key}.yarc"
        if path.exists():
            os.utime(path)
            return [(str(path), None)]
        note = cache / f"{key}.layers.json"
        try:
            chosen = [(str(cache / name), None if keep is None else tuple(keep))
                      for name, keep in json.loads(note.read_text(encoding="utf-8"))]
            for layer, _ in chosen:
                os.utime(layer)
            return chosen
        except (OSError, ValueError, TypeError):
            pass
        best: tuple[Path, tuple[str, ...]] | None = None
        for cached, components in _cached_sets():
            same = tuple(ns for ns, fp in components.items() if cur.get(ns) == fp)
            if same and (best is None or len(same) > len(best[1])):
                best = cached, same
        rest = {ns: self.files[ns] for ns in cur if best is None or ns not in best[1]}
        if best is None or len(rest) > LAYER_SHARE * len(cur):
            return [(str(compile_to_cache(self.files, cur)), None)]
        base, same = best
        os.utime(base)
        layers: list[tuple[str, tuple[str, ...] | None]] = [(str(base), tuple(sorted(same)))]
        if rest:
            fps = {ns: cur[ns] for ns in rest}
            added = cache / f"{_set_key(fps)}.yarc"
            layers.append((str(added if added.exists() else compile_to_cache(rest, fps)), None))
        try:
            note.write_text(json.dumps([[Path(p).name, keep] for p, keep in layers]), encoding="utf-8")
        except OSError:
            pass  # a cache: the next run chooses again
        return layers

    def components(self) -> dict[str, str]:
        return dict(self._components)

    def rule_counts(self) -> dict[str, int]:
        """Rule file → number of rules declared in it."""
        return dict(self._counts)

    def describe(self) -> dict[str, object]:
        return {"version": yara.__version__, "rules": sum(self.rule_counts().values())}

    def load(self) -> YaraEngine:
        return YaraEngine(self.layers, self.files, self.timeout)


class YaraEngine(Engine):
    """Compiled YARA rules inside a worker process."""

    name = "yara"

    def __init__(self, layers: list[tuple[str, tuple[str, ...] | None]], files: dict[str, Path], timeout: int):
        self._layer_files = layers
        self._layers: list[tuple[yara.Rules, frozenset[str] | None]] | None = None
        self.files = files
        self.timeout = timeout
        self._subset = lru_cache(maxsize=8)(self._compile_subset)

    @property
    def layers(self) -> list[tuple[yara.Rules, frozenset[str] | None]]:
        """The whole set, loaded on first use (a delta rescan may never need it)."""
        if self._layers is None:
            self._layers = [(yara.load(path), None if keep is None else frozenset(keep))
                            for path, keep in self._layer_files]
        return self._layers

    def _compile_subset(self, components: frozenset[str]) -> list[tuple[yara.Rules, None]]:
        chosen = {ns: p for ns, p in self.files.items() if ns in components}
        return [(compile_rules(chosen), None)] if chosen else []

    def _rules_for(self, components: Collection[str] | None) -> list[tuple[yara.Rules, frozenset[str] | None]]:
        """Compiled sets to match, each with the namespaces to keep from it (None: all)."""
        if components is None:
            return self.layers
        wanted = frozenset(set(components) & self.files.keys())
        if wanted == self.files.keys():
            return self.layers
        return self._subset(wanted)

    def scan_part(self, part: Part, components: Collection[str] | None = None) -> ScanOutput:
        layers = self._rules_for(components)
        if not layers:
            return [], []
        name = part.filename or ""
        externals = {
            "filename": name,
            "filepath": part.path,
            "extension": os.path.splitext(name)[1].lstrip(".").lower(),
            "filetype": filetype_of(part.data),
            "owner": "",
        }
        matches = []
        try:
            for rules, keep in layers:
                found = rules.match(data=part.data, externals=externals, timeout=self.timeout)
                matches += found if keep is None else [m for m in found if m.namespace in keep]
        except yara.TimeoutError:
            return [], [Problem("timeout", "yara match timed out", part.path)]
        except yara.Error as exc:
            return [], [Problem("engine", f"yara: {exc}", part.path)]
        if len(layers) > 1:  # in the order of one compiled set: namespaces sorted, rules in file order
            matches.sort(key=lambda m: m.namespace)
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
