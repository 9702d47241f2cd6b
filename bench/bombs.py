"""Compression bombs: time, peak RSS of the whole process tree, and each message's verdict.

Usage::

    python bench/bombs.py [--rules one-rule] [--workers 1 2]

Builds ``bench/data/bombs-maildir`` if needed (``corpus.py bombs``), then runs ``rescan scan
maildir:bench/data/bombs-maildir`` once per worker count. Every bomb must come out
``partial`` (never ``clean``, never ``error``: an error would mean a timeout or a crash);
the script prints each message's status and problem codes and exits 1 when one is not
partial.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import corpus, message_files, ruleset  # noqa: E402
from corpus import build_bombs  # noqa: E402
from harness import markdown, new_tag, scan, write_results  # noqa: E402


def verdicts(row: dict[str, object]) -> dict[str, tuple[str, list[str]]]:
    """Subject → (status, problem codes) of every message the report lists."""
    return {m["subject"]: (m["status"], m["problems"]) for m in row["messages_not_clean"]}


def main(argv: list[str] | None = None) -> None:
    """Command line: scan the bombs, print the tables, exit 1 unless every bomb is partial."""
    parser = argparse.ArgumentParser(description="rescan over a Maildir of compression bombs")
    parser.add_argument("--rules", default="one-rule")
    parser.add_argument("--workers", type=int, nargs="+",
                        default=sorted({1, os.cpu_count() or 1}))
    args = parser.parse_args(argv)

    build_bombs()  # idempotent: a complete corpus is left alone
    maildir = corpus("bombs")
    files = message_files(maildir)
    messages, size = len(files), sum(f.stat().st_size for f in files)
    tag = new_tag()
    rows = [{**scan(f"bombs w{n}", [f"maildir:{maildir}"],
                    ["--rules", str(ruleset(args.rules)), "--workers", str(n)],
                    tag, messages, size), "workers": n} for n in args.workers]

    failures = []
    for r in rows:
        seen = verdicts(r)
        if len(seen) != messages:
            failures.append(f"{r['run']}: {messages - len(seen)} message(s) reported clean")
        failures += [f"{r['run']}: {subject!r} is {status}" for subject, (status, _) in
                     seen.items() if status != "partial"]
    out = write_results(tag, "bombs", {"corpus": str(maildir), "messages": messages,
                                       "bytes": size, "rules": args.rules, "rows": rows,
                                       "failures": failures})
    print(f"\n{messages} messages, {size / 1e6:.1f} MB; results: {out}\n")
    print(markdown(["workers", "wall s", "CPU s", "peak RSS MB (tree)", "load", "exit", "seen"],
                   [[r["workers"], r["wall_s"], r["cpu_s"], r["peak_rss_mb"], r["load_before"],
                     r["returncode"], r["summary"].get("messages_seen")] for r in rows]))
    print()
    subjects = sorted({s for r in rows for s in verdicts(r)})
    print(markdown(["message", *(f"w{r['workers']}: status, problems" for r in rows)],
                   [[s, *(_verdict_cell(verdicts(r).get(s)) for r in rows)] for s in subjects]))
    print("\nall partial: " + ("yes" if not failures else "NO\n" + "\n".join(failures)))
    sys.exit(1 if failures else 0)


def _verdict_cell(verdict: tuple[str, list[str]] | None) -> str:
    if verdict is None:
        return "clean (not in the report)"
    status, problems = verdict
    return f"{status}, {', '.join(f'`{p}`' for p in problems)}"


if __name__ == "__main__":
    main()
