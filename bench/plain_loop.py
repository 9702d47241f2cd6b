"""The naive baseline: one process, stdlib ``email`` and ``yara-python``, no archives.

For each message file: ``email.message_from_bytes(policy=default)``, walk the parts,
``get_payload(decode=True)`` for each leaf, and ``rules.match(data=...)`` on every decoded leaf
and on the raw header block. Rules are compiled like the tool compiles them: every rule file in
its own namespace, with the externals ``filename``, ``filepath``, ``extension``, ``filetype``
and ``owner`` defined (empty), then set per part when matching.

Usage::

    python bench/plain_loop.py --corpus spamassassin --rules signature-base [--json FILE]

Prints one JSON object: messages, bytes, matches, compile and scan seconds, messages/s, MB/s,
peak RSS.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import resource
import sys
import time
from pathlib import Path

import yara

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXTERNALS, corpus, message_files, rule_files, ruleset  # noqa: E402


def compile_rules(path: Path) -> tuple[yara.Rules, int]:
    """Compile every rule file under ``path``, each in its own namespace; return the rules and
    the number of files."""
    files = rule_files(path)
    base = path if path.is_dir() else path.parent
    namespaces = {str(f.relative_to(base)): str(f) for f in files}
    rules = yara.compile(filepaths=namespaces, externals={name: "" for name in EXTERNALS})
    return rules, len(files)


def header_block(raw: bytes) -> bytes:
    """The raw header block of a message (up to the first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(sep)
        if at >= 0:
            return raw[:at]
    return raw


def scan_message(rules: yara.Rules, path: Path, raw: bytes) -> int:
    """Number of matches in one message's header block and decoded leaves."""
    externals = {name: "" for name in EXTERNALS}
    externals["filepath"] = str(path)
    found = len(rules.match(data=header_block(raw), externals=externals))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not payload:
            continue
        try:
            name = part.get_filename() or ""
        except (ValueError, TypeError, IndexError):
            name = ""
        externals["filename"] = name
        externals["extension"] = Path(name).suffix.lower()
        externals["filetype"] = part.get_content_type()
        found += len(rules.match(data=payload, externals=externals))
    return found


def run(maildir: Path, rules_path: Path) -> dict[str, object]:
    """Compile the rules, scan every message of ``maildir``; return the measurements."""
    started = time.perf_counter()
    rules, nfiles = compile_rules(rules_path)
    compiled = time.perf_counter()
    messages = total = matches = errors = 0
    for path in message_files(maildir):
        raw = path.read_bytes()
        messages += 1
        total += len(raw)
        try:
            matches += scan_message(rules, path, raw)
        except Exception:  # a message the naive loop cannot parse still counts as seen
            errors += 1
    done = time.perf_counter()
    scan = done - compiled
    return {
        "messages": messages,
        "bytes": total,
        "rule_files": nfiles,
        "matches": matches,
        "errors": errors,
        "compile_s": round(compiled - started, 3),
        "scan_s": round(scan, 3),
        "wall_s": round(done - started, 3),
        "messages_per_s": round(messages / scan, 1),
        "mb_per_s": round(total / scan / 1e6, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: run the baseline and print (and optionally write) its JSON result."""
    parser = argparse.ArgumentParser(description="naive single-process YARA loop over a Maildir")
    parser.add_argument("--corpus", default="spamassassin", help="corpus name or Maildir path")
    parser.add_argument("--rules", default="one-rule", help="one-rule, signature-base or a path")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(corpus(args.corpus), ruleset(args.rules))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
