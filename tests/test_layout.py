"""Invariants of the layout (DESIGN.md, invariant 7): the core never imports a connector
library, connectors never import the CLI; a local scan loads neither imapclient nor
exchangelib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_does_not_import_connector_libraries():
    for path in (ROOT / "rescan").rglob("*.py"):
        bad = {n for n in imports(path) if n.split(".")[0] in ("imapclient", "exchangelib", "imaplib")}
        assert not bad, f"{path} imports {bad}"


def test_connectors_do_not_import_the_cli():
    for path in (ROOT / "connectors").rglob("*.py"):
        assert "rescan.cli" not in imports(path), path


def test_a_local_scan_loads_no_connector_library():
    code = (
        "import sys, runpy; sys.argv = ['rescan', 'scan', 'examples/maildir', '-q', '-o', '/dev/null'];\n"
        "try:\n    runpy.run_module('rescan', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('imapclient', 'exchangelib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr
