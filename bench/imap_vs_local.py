"""IMAP against local: the same corpus scanned from a real Dovecot and from the Maildir.

Usage::

    python bench/imap_vs_local.py [--corpus spamassassin] [--rules one-rule ...]
                                  [--workers N] [--connections 4 1] [--repeat 1]

Starts a Dovecot (``tests/servers/dovecot.py``'s ``DovecotServer``: loopback, no TLS,
``mail_fsync = never``), copies the corpus Maildir into its mail directory as user ``alice``
(Maildir++: the root is INBOX, ``.Ham`` and ``.Spam`` folders) before the first login, lets
Dovecot index it (one untimed FETCH of every message's size per folder), then runs, with the
same rules and workers, ``rescan scan maildir:CORPUS`` and ``rescan scan
imap://alice@127.0.0.1:PORT --connections N`` (password in ``RESCAN_PASSWORD``). Both see the
files once before the measured runs (page cache, compiled-rule cache). Dovecot runs on the
same machine: its CPU time (master and every child, from /proc) is reported next to the
tool's. Stops Dovecot and removes its directory at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import corpus, message_files, ruleset  # noqa: E402
from harness import markdown, new_tag, process_cpu, scan, tool_env, write_results  # noqa: E402

from tests.servers.dovecot import USERS, DovecotServer  # noqa: E402

USER = "alice"


def copy_into_dovecot(server: DovecotServer, maildir: Path) -> Path:
    """Copy the Maildir++ tree into the user's mail directory (owned by nobody:nogroup, as
    the userdb says) before the first login; return the user's directory."""
    target = server.dir / "mail" / USER
    shutil.copytree(maildir, target)
    for path in (target, *target.rglob("*")):
        shutil.chown(path, "nobody", "nogroup")
    return target


def index(server: DovecotServer) -> tuple[float, dict[str, int]]:
    """Open every folder and fetch every message's size once, so Dovecot builds its index
    and uid lists before the measured runs. Returns (seconds, folder → message count)."""
    started = time.perf_counter()
    client = server.client(USER)
    counts: dict[str, int] = {}
    try:
        for flags, _, name in client.list_folders():
            if b"\\Noselect" in flags:
                continue
            info = client.select_folder(name, readonly=True)
            counts[name] = info[b"EXISTS"]
            if counts[name]:
                client.fetch(client.search(), ["RFC822.SIZE"])
    finally:
        client.logout()
    return time.perf_counter() - started, counts


def master_pid(server: DovecotServer) -> int:
    """Pid of Dovecot's master process."""
    return int((server.dir / "run" / "master.pid").read_text().split()[0])


def main(argv: list[str] | None = None) -> None:
    """Command line: run the comparison, write the results JSON and print the table."""
    parser = argparse.ArgumentParser(description="rescan over IMAP (Dovecot) vs local Maildir")
    parser.add_argument("--corpus", default="spamassassin")
    parser.add_argument("--rules", nargs="+", default=["one-rule"],
                        help="rule sets (one-rule, signature-base, or a path)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--connections", type=int, nargs="+", default=[4, 1],
                        help="IMAP connection counts to measure (default: 4 and 1)")
    parser.add_argument("--repeat", type=int, default=1, help="measured rounds (default 1)")
    args = parser.parse_args(argv)

    maildir = corpus(args.corpus)
    files = message_files(maildir)
    messages, size = len(files), sum(f.stat().st_size for f in files)
    tag = new_tag()
    server = DovecotServer()
    rows: list[dict[str, object]] = []
    try:
        copy_into_dovecot(server, maildir)
        server.start()
        index_s, counts = index(server)
        print(f"Dovecot indexed {sum(counts.values())} messages in {index_s:.1f} s: {counts}",
              file=sys.stderr)
        env = tool_env(RESCAN_PASSWORD=USERS[USER])
        imap = server.url(USER)
        local = f"maildir:{maildir}"
        for rules_name in args.rules:
            common = ["--rules", str(ruleset(rules_name)), "--workers", str(args.workers)]
            # Untimed: compiles and caches the rules, reads the files into the page cache.
            scan(f"warm-up local {rules_name}", [local], common, tag, messages, size, env)
            for round_ in range(args.repeat):
                suffix = f" #{round_ + 1}" if args.repeat > 1 else ""
                base = scan(f"local {rules_name}{suffix}", [local], common, tag, messages,
                            size, env)
                rows.append({**base, "source": "maildir", "rules": rules_name,
                             "connections": None, "server_cpu_s": None, "imap_vs_local": None})
                for n in args.connections:
                    before = process_cpu(master_pid(server))
                    row = scan(f"imap {rules_name} c{n}{suffix}", [imap],
                               [*common, "--connections", str(n)], tag, messages, size, env)
                    rows.append({**row, "source": "imap", "rules": rules_name,
                                 "connections": n,
                                 "server_cpu_s": round(process_cpu(master_pid(server)) - before, 2),
                                 "imap_vs_local": round(base["wall_s"] / row["wall_s"], 2)})
    finally:
        server.cleanup()

    out = write_results(tag, f"imap-vs-local-{args.corpus}", {
        "corpus": str(maildir), "messages": messages, "bytes": size,
        "dovecot_index_s": round(index_s, 2), "dovecot_counts": counts,
        "workers": args.workers, "rows": rows, "target_imap_vs_local": 0.8})
    print(f"\n{messages} messages, {size / 1e6:.1f} MB, {args.workers} workers; "
          f"Dovecot indexed them in {index_s:.1f} s; results: {out}\n")
    print(markdown(
        ["source", "rules", "connections", "wall s", "CPU s (tool)", "CPU s (Dovecot)",
         "msg/s", "MB/s", "peak RSS MB", "IMAP / local", "load", "exit", "seen"],
        [[r["source"], r["rules"], r["connections"], r["wall_s"], r["cpu_s"],
          r["server_cpu_s"], r["messages_per_s"], r["mb_per_s"], r["peak_rss_mb"],
          r["imap_vs_local"],
          r["load_before"], r["returncode"], r["summary"].get("messages_seen")]
         for r in rows]))
    print("\ntarget: IMAP >= 0.8x local (IMAP / local = local wall / IMAP wall)")
    if args.repeat > 1:
        for rules_name in args.rules:
            for n in args.connections:
                values = [r["imap_vs_local"] for r in rows if r["source"] == "imap"
                          and r["rules"] == rules_name and r["connections"] == n]
                print(f"median IMAP / local, {rules_name}, {n} connections, "
                      f"{len(values)} rounds: {statistics.median(values):.2f}")


if __name__ == "__main__":
    main()
