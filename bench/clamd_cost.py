"""Cost per message of ClamAV (clamd) next to YARA, on a corpus Maildir.

Usage::

    python bench/clamd_cost.py [--corpus spamassassin] [--rules one-rule] [--workers N]
                               [--fixture-limits]

Starts a real clamd with ``tests/servers/clamd.py``'s ``start_clamd`` (its test signature
database only: one EICAR signature, so clamd's own signature matching costs next to nothing
and the numbers are the transport, clamd's unpacking and the tool's bookkeeping). By default
StreamMaxLength and MaxFileSize are raised to clamd's defaults (100 MiB each; MaxScanSize is
left at its default), because the fixture's small test limits (1 MiB, 512 KiB) would make
large corpus messages ``partial``; ``--fixture-limits`` keeps them. Then runs ``rescan scan
maildir:CORPUS`` with ``--clamd unix:SOCK`` alone, ``--rules R`` alone, and both, and reports
wall and CPU milliseconds per message (CPU of the tool's process tree and of clamd, read from
/proc). Stops clamd and removes its directory at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import corpus, message_files, ruleset  # noqa: E402
from harness import markdown, new_tag, process_cpu, scan, write_results  # noqa: E402

from tests.servers.clamd import start_clamd  # noqa: E402

CLAMD_DEFAULT_LIMIT = 100 * 1024 * 1024  # clamd's default StreamMaxLength and MaxFileSize


def main(argv: list[str] | None = None) -> None:
    """Command line: start clamd, run the three scans, print the table."""
    parser = argparse.ArgumentParser(description="cost per message of clamd next to YARA")
    parser.add_argument("--corpus", default="spamassassin")
    parser.add_argument("--rules", default="one-rule")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fixture-limits", action="store_true",
                        help="keep the test fixture's small clamd limits")
    args = parser.parse_args(argv)

    maildir = corpus(args.corpus)
    files = message_files(maildir)
    messages, size = len(files), sum(f.stat().st_size for f in files)
    tag = new_tag()
    limits = {} if args.fixture_limits else {"stream_max_length": CLAMD_DEFAULT_LIMIT,
                                             "max_filesize": CLAMD_DEFAULT_LIMIT}
    directory = Path(tempfile.mkdtemp(prefix="rescan-bench-clamd-"))
    server = None
    rows: list[dict[str, object]] = []
    try:
        server = start_clamd(directory, **limits)
        source = [f"maildir:{maildir}"]
        workers = ["--workers", str(args.workers)]
        clamd = ["--clamd", server.unix_address]
        rules = ["--rules", str(ruleset(args.rules))]
        # Untimed: compiles and caches the rules, reads the files into the page cache.
        scan("warm-up", source, [*rules, *clamd, *workers], tag, messages, size)
        for label, engines in (("clamd alone", clamd), (f"YARA alone ({args.rules})", rules),
                               (f"clamd + YARA ({args.rules})", [*rules, *clamd])):
            before = process_cpu(server.process.pid)
            row = scan(label, source, [*engines, *workers], tag, messages, size)
            clamd_cpu = process_cpu(server.process.pid) - before
            rows.append({**row, "clamd_cpu_s": round(clamd_cpu, 2),
                         "clamd_cpu_ms_per_message": round(clamd_cpu * 1000 / messages, 2),
                         "total_cpu_ms_per_message": round(
                             (row["cpu_s"] + clamd_cpu) * 1000 / messages, 2)})
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)

    both, yara_alone = rows[2], rows[1]
    added = {"wall_ms_per_message": round(both["wall_ms_per_message"]
                                          - yara_alone["wall_ms_per_message"], 2),
             "total_cpu_ms_per_message": round(both["total_cpu_ms_per_message"]
                                               - yara_alone["total_cpu_ms_per_message"], 2)}
    out = write_results(tag, f"clamd-{args.corpus}", {
        "corpus": str(maildir), "messages": messages, "bytes": size, "rules": args.rules,
        "workers": args.workers, "clamd_limits": limits or "fixture", "rows": rows,
        "clamd_added_to_yara": added})
    print(f"\n{messages} messages, {size / 1e6:.1f} MB, {args.workers} workers; "
          f"clamd limits: {limits or 'fixture'}; results: {out}\n")
    print(markdown(
        ["engines", "wall s", "wall ms/msg", "CPU ms/msg (tool)", "CPU ms/msg (clamd)",
         "CPU ms/msg (total)", "msg/s", "peak RSS MB (tool)", "infected", "partial", "load", "exit", "seen"],
        [[r["run"], r["wall_s"], r["wall_ms_per_message"], r["cpu_ms_per_message"],
          r["clamd_cpu_ms_per_message"], r["total_cpu_ms_per_message"], r["messages_per_s"],
          r["peak_rss_mb"], r["summary"].get("infected"), r["summary"].get("partial"), r["load_before"], r["returncode"],
          r["summary"].get("messages_seen")] for r in rows]))
    print(f"\nclamd added to YARA: {added['wall_ms_per_message']:+.2f} ms wall, "
          f"{added['total_cpu_ms_per_message']:+.2f} ms CPU (tool + clamd) per message")


if __name__ == "__main__":
    main()
