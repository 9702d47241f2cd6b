"""EWS request pattern and throughput against the loopback EWS test server.

Usage::

    python bench/ews_requests.py [--corpus spamassassin] [--count 2000] [--rules one-rule]
                                 [--workers N] [--connections 4 1]

Takes ``--count`` messages of the corpus spread evenly over its three folders (written once
to ``bench/data/<corpus>-<count>-maildir``), serves them with ``tests/servers/ews.py``'s
``EWSTestServer`` in this process as mailbox ``alice`` (the Maildir root becomes Inbox,
``.Ham`` and ``.Spam`` folders under it, as ``python -m tests.servers.ews --maildir`` does),
and runs ``rescan scan ews+http://alice@127.0.0.1:PORT/EWS/Exchange.asmx --connections N``
(password in ``RESCAN_PASSWORD``) and, for reference, ``rescan scan maildir:SUBSET`` with
the same rules and workers. The server's request log gives the HTTP requests per message,
by operation. The server is Python (one thread per connection, the whole mailbox in memory),
so the numbers describe the connector's request pattern far better than Exchange's speed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, corpus, message_files, ruleset  # noqa: E402
from harness import markdown, new_tag, scan, tool_env, write_results  # noqa: E402

from tests.servers.ews import EWSTestServer, load_maildir  # noqa: E402

USER, PASSWORD = "alice", "alice-bench-pw"


def subset(maildir: Path, name: str, count: int) -> Path:
    """``bench/data/<name>-<count>-maildir``: about ``count`` messages of ``maildir`` taken
    evenly from each of its folders (in proportion to the folder's size); built once."""
    target = DATA / f"{name}-{count}-maildir"
    files = message_files(maildir)
    step = max(1, len(files) // count)
    chosen = files[::step][:count]
    if target.is_dir() and len(message_files(target)) == len(chosen):
        return target
    shutil.rmtree(target, ignore_errors=True)
    for f in chosen:
        dest = target / f.relative_to(maildir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    for folder in [target, *(d for d in target.iterdir() if d.name.startswith("."))]:
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(exist_ok=True)
    return target


def cpu_self() -> float:
    """User + system CPU seconds of this process (the in-process server's threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    """Command line: serve the subset, scan it over EWS and locally, print the tables."""
    parser = argparse.ArgumentParser(description="rescan over EWS (test server) vs local")
    parser.add_argument("--corpus", default="spamassassin")
    parser.add_argument("--count", type=int, default=2000, help="messages to serve")
    parser.add_argument("--rules", default="one-rule")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--connections", type=int, nargs="+", default=[4, 1])
    args = parser.parse_args(argv)

    maildir = subset(corpus(args.corpus), args.corpus, args.count)
    files = message_files(maildir)
    messages, size = len(files), sum(f.stat().st_size for f in files)
    tag = new_tag()
    server = EWSTestServer(users={USER: PASSWORD})
    loaded = load_maildir(server, USER, maildir)
    folders = Counter(server.folder_path(i.folder_id) for i in server.mailbox_items(USER))
    server.start()
    env = tool_env(RESCAN_PASSWORD=PASSWORD)
    common = ["--rules", str(ruleset(args.rules)), "--workers", str(args.workers)]
    rows: list[dict[str, object]] = []
    try:
        scan("warm-up local", [f"maildir:{maildir}"], common, tag, messages, size, env)
        local = scan("local", [f"maildir:{maildir}"], common, tag, messages, size, env)
        rows.append({**local, "source": "maildir", "connections": None, "requests": None,
                     "by_operation": {}, "server_cpu_s": None})
        for n in args.connections:
            with server.lock:
                server.requests.clear()
            before = cpu_self()
            row = scan(f"ews c{n}", [server.source(USER)], [*common, "--connections", str(n)],
                       tag, messages, size, env)
            with server.lock:
                log = list(server.requests)
            by_op = Counter(r.operation for r in log)
            rows.append({**row, "source": "ews", "connections": n, "requests": len(log),
                         "by_operation": dict(by_op.most_common()),
                         "not_ok": dict(Counter(r.outcome for r in log if r.outcome != "ok")),
                         "server_cpu_s": round(cpu_self() - before, 2)})
    finally:
        server.stop()

    out = write_results(tag, f"ews-{args.corpus}-{args.count}", {
        "corpus": str(maildir), "messages": messages, "loaded": loaded, "bytes": size,
        "folders": dict(folders), "rules": args.rules, "workers": args.workers, "rows": rows})
    print(f"\n{messages} messages ({dict(folders)}), {size / 1e6:.1f} MB, rules {args.rules}, "
          f"{args.workers} workers; results: {out}\n")
    print(markdown(
        ["source", "connections", "wall s", "CPU s (tool)", "CPU s (server)", "msg/s", "MB/s",
         "requests", "requests / msg", "peak RSS MB", "load", "exit", "seen"],
        [[r["source"], r["connections"], r["wall_s"], r["cpu_s"], r["server_cpu_s"],
          r["messages_per_s"], r["mb_per_s"], r["requests"],
          round(r["requests"] / messages, 3) if r["requests"] else None, r["peak_rss_mb"],
          r["load_before"], r["returncode"], r["summary"].get("messages_seen")] for r in rows]))
    ops = sorted({op for r in rows for op in r["by_operation"]})
    ews_rows = [r for r in rows if r["source"] == "ews"]
    print("\nRequests by operation (per message in brackets):\n")
    print(markdown(["operation", *(f"c{r['connections']}" for r in ews_rows)],
                   [[op, *(f"{r['by_operation'].get(op, 0)} ({r['by_operation'].get(op, 0) / messages:.3f})"
                           for r in ews_rows)] for op in ops]))


if __name__ == "__main__":
    main()
