"""Helpers of the server benchmarks (IMAP, EWS, bombs, clamd): run ``rescan scan`` on any
sources as a measured subprocess, read its JSON report, measure a server's CPU time, write
the results file.

The servers themselves are the test suite's (``tests/servers/``): a real Dovecot, a real
clamd, the EWS test server. They are started and stopped by each benchmark script.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, ROOT  # noqa: E402
from run import machine  # noqa: E402
from sampler import children, run_measured, stat_fields, tree_rss  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.servers.* are imported by the scripts

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tool_env(**extra: str) -> dict[str, str]:
    """The environment of tool runs: compiled rules cached under ``bench/data/cache``, plus
    ``extra`` (a password variable, say)."""
    return {**os.environ, "RESCAN_CACHE_DIR": str(DATA / "cache"), **extra}


def report_of(path: Path) -> dict:
    """The parsed JSON report at ``path``, or ``{}`` when there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def scan(label: str, sources: list[str], options: list[str], tag: str, messages: int,
         size: int, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``python -m rescan scan SOURCES OPTIONS --format json --output FILE --quiet`` in
    the project root, measured (wall, CPU of the process tree, peak summed RSS).

    Takes the expected message count and byte size of the store (for rates and for the
    ``complete`` check: every message seen). Returns the result row, with the report's
    summary and its non-clean messages (status and problem codes).
    """
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = RESULTS / f"{tag}-{slug}.report.json"
    output.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "rescan", "scan", *sources, *options,
           "--format", "json", "--output", str(output), "--quiet"]
    m = run_measured(cmd, cwd=ROOT, env=env or tool_env())
    report = report_of(output)
    summary = report.get("run", {}).get("summary", {})
    complete = summary.get("messages_seen") == messages
    row: dict[str, object] = {
        "run": label, "returncode": m.returncode, "wall_s": round(m.wall_s, 3),
        "cpu_s": round(m.cpu_s, 3), "load_before": round(m.load_before, 2),
        "messages": messages, "bytes": size,
        "messages_per_s": round(messages / m.wall_s, 1),
        "mb_per_s": round(size / m.wall_s / 1e6, 3),
        "wall_ms_per_message": round(m.wall_s * 1000 / messages, 2) if messages else None,
        "cpu_ms_per_message": round(m.cpu_s * 1000 / messages, 2) if messages else None,
        "peak_rss_mb": round(m.peak_rss / 2**20, 1),
        "complete": complete, "summary": summary, "report": output.name,
        "messages_not_clean": [
            {"subject": msg.get("subject"), "status": msg.get("status"),
             "problems": sorted({p.get("code") for p in msg.get("problems", [])}),
             "engines": sorted({f.get("engine") for f in msg.get("findings", [])})}
            for msg in report.get("messages", [])],
    }
    if m.returncode not in (0, 1) or not complete:
        row["stderr"] = m.stderr[-2000:]
    print(f"  {label}: {m.wall_s:.2f} s wall, {m.cpu_s:.1f} s CPU, exit {m.returncode}, "
          f"seen {summary.get('messages_seen')}/{messages}", file=sys.stderr)
    return row


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and of every descendant, live or reaped (a
    reaped child's time is in its parent's ``cutime``/``cstime``); 0 for a gone process."""
    total = 0.0
    stack = [pid]
    tree = children()
    while stack:
        p = stack.pop()
        fields = stat_fields(p)
        if fields is None:
            continue
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
        total += sum(int(x) for x in fields[11:15]) / CLOCK_TICKS
        stack.extend(tree.get(p, ()))
    return total


def process_rss_mb(pid: int) -> float:
    """Summed RSS (MB) of ``pid`` and its descendants now."""
    return round(tree_rss(pid) / 2**20, 1)


def new_tag() -> str:
    """A timestamp naming one benchmark run's result files."""
    return time.strftime("%Y%m%d-%H%M%S")


def write_results(tag: str, name: str, result: dict[str, object]) -> Path:
    """Write ``bench/results/<tag>-<name>.json`` (with the machine description); return it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{tag}-{name}.json"
    out.write_text(json.dumps({"time": tag, "machine": machine(), **result}, indent=2) + "\n")
    return out


def markdown(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table; columns after the first are right-aligned when numeric."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) if rows else False
               for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if n and i else "---" for i, n in enumerate(numeric)) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
