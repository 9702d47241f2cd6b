"""Helpers shared by the benchmark scripts: where things are, which files, which rules."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = BENCH / "data"
RESULTS = BENCH / "results"

# Rule files see these externals (public rule sets such as signature-base need them defined).
EXTERNALS = ("filename", "filepath", "extension", "filetype", "owner")

EICAR_RULE = """rule eicar_test_file
{
    meta:
        description = "EICAR anti-virus test file"
    strings:
        $eicar = "EICAR-STANDARD-ANTIVIRUS-TEST-FILE"
    condition:
        $eicar
}
"""


def shared_rulesets() -> Path:
    """The shared third-party rule sets: ``../shared/rulesets`` seen from the project root,
    or from the nearest ancestor that has it (a git worktree lives deeper than the root).

    Raises:
        SystemExit: when no ancestor holds ``shared/rulesets``.
    """
    for base in (ROOT, *ROOT.parents):
        candidate = base.parent / "shared" / "rulesets"
        if candidate.is_dir():
            return candidate
    raise SystemExit("no shared/rulesets found above the project root")


def ruleset(name: str) -> Path:
    """Path of a named rule set: ``one-rule`` (written here on first use), ``signature-base``
    or ``reversinglabs`` (shared, never copied), or any existing file or directory.

    Raises:
        SystemExit: for an unknown name.
    """
    if name == "one-rule":
        folder = DATA / "rules-one"
        folder.mkdir(parents=True, exist_ok=True)
        rule = folder / "eicar.yar"
        if not rule.exists() or rule.read_text() != EICAR_RULE:
            rule.write_text(EICAR_RULE)
        return folder
    if name in ("signature-base", "reversinglabs"):
        return shared_rulesets() / name / "yara"
    path = Path(name)
    if path.exists():
        return path.resolve()
    raise SystemExit(f"unknown rule set {name!r}")


def rule_files(path: Path) -> list[Path]:
    """The ``.yar``/``.yara`` files of a rule set (a file or a directory tree), sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".yar", ".yara") and p.is_file())


def message_files(maildir: Path) -> list[Path]:
    """Every message file in the ``cur/`` and ``new/`` dirs of a Maildir++ tree, sorted."""
    return sorted(
        p for sub in ("cur", "new") for d in maildir.glob(f"**/{sub}") if d.is_dir()
        for p in d.iterdir() if p.is_file()
    )


def corpus(name: str) -> Path:
    """Maildir of a named corpus (``spamassassin``, ``bombs``, ``infected-N``) or a path.

    Raises:
        SystemExit: when the corpus has not been built.
    """
    path = DATA / f"{name}-maildir" if not Path(name).exists() else Path(name)
    if not path.is_dir():
        raise SystemExit(f"{path} does not exist: build it with python bench/corpus.py")
    return path.resolve()
