"""Run the benchmarks: the tool with one worker and with all cores, the plain loop, and
(with ``--stamps``) full / unchanged rerun / delta / floor with a state store.

Usage::

    python bench/run.py --corpus spamassassin --rules one-rule signature-base [--stamps]

Each tool run is ``python -m rescan scan maildir:PATH --rules R --workers N --format json
--output FILE --quiet`` in a subprocess; wall time and the peak summed RSS of its process tree
(sampled every 50 ms from /proc) are measured from outside. Results go to
``bench/results/<time>-<corpus>.json``; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yara

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DATA, RESULTS, ROOT, corpus, message_files, rule_files, ruleset  # noqa: E402
from sampler import Measured, run_measured  # noqa: E402

RERUNS = 5  # reruns with nothing changed measured; the median is reported
DELTA_RULE = """rule bench_delta_marker
{
    strings:
        $marker = "rescan-bench-delta-marker"
    condition:
        $marker
}
"""

# measure → (bound, "min" when the value must reach the bound, "max" when it must stay under)
TARGETS = {
    "all_vs_one": (1.7, "min"),  # all workers vs one worker, on two cores
    "tool_vs_plain": (1.5, "min"),  # the tool with all workers vs the plain loop
    "peak_rss_mb": (300, "max"),  # whole process tree, all workers
    "rerun_speedup": (50, "min"),  # full scan time / unchanged rerun time
    "delta_vs_floor": (1.5, "max"),  # delta rescan time / fetch+extract time
}


def tool_env() -> dict[str, str]:
    """The environment of tool runs: compiled rules are cached under ``bench/data/cache``."""
    return {**os.environ, "RESCAN_CACHE_DIR": str(DATA / "cache")}


def warm_up(rules_name: str, rules: Path, tag: str) -> dict[str, object]:
    """Scan an empty Maildir once so the rules are compiled and cached before the measured
    runs (otherwise the first measured run alone pays for the compile); return its row."""
    empty = DATA / "empty-maildir"
    for sub in ("cur", "new", "tmp"):
        (empty / sub).mkdir(parents=True, exist_ok=True)
    cache = DATA / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    return run_tool("compile (empty Maildir)", empty, rules_name, rules, 1, 0, 0, tag)


def tool_available() -> bool:
    """True when ``python -m rescan scan --help`` works in the project root. Compiles the
    project's modules to bytecode first, as installing the package does: a checkout run with
    ``PYTHONDONTWRITEBYTECODE`` set would otherwise compile them at every start."""
    compileall.compile_dir(str(ROOT / "rescan"), quiet=1)
    compileall.compile_dir(str(ROOT / "connectors"), quiet=1)
    done = subprocess.run([sys.executable, "-m", "rescan", "scan", "--help"], cwd=ROOT,
                          capture_output=True)
    return done.returncode == 0


def tool_command(maildir: Path, rules: Path, workers: int, output: Path,
                 state: Path | None = None) -> list[str]:
    """The ``rescan scan`` command line of one benchmark run."""
    cmd = [sys.executable, "-m", "rescan", "scan", f"maildir:{maildir}", "--rules", str(rules),
           "--workers", str(workers), "--format", "json", "--output", str(output), "--quiet"]
    if state is not None:
        cmd += ["--state", str(state)]
    return cmd


def summary_of(report: Path) -> dict[str, object]:
    """The ``run.summary`` of a JSON report, or ``{}`` when there is none."""
    try:
        return json.loads(report.read_text()).get("run", {}).get("summary", {})
    except (OSError, ValueError, AttributeError):
        return {}


def row(label: str, rules: str, workers: int, m: Measured, messages: int, size: int,
        extra: dict[str, object] | None = None) -> dict[str, object]:
    """One measured run as a result row."""
    return {
        "run": label, "rules": rules, "workers": workers, "returncode": m.returncode,
        "wall_s": round(m.wall_s, 3), "cpu_s": round(m.cpu_s, 3),
        "load_before": round(m.load_before, 2), "messages": messages, "bytes": size,
        "messages_per_s": round(messages / m.wall_s, 1),
        "mb_per_s": round(size / m.wall_s / 1e6, 3),
        "peak_rss_mb": round(m.peak_rss / 2**20, 1),
        **(extra or {}),
        **({"stderr": m.stderr[-2000:]} if m.returncode not in (0, 1) else {}),
    }


def run_tool(label: str, maildir: Path, rules_name: str, rules: Path, workers: int,
             messages: int, size: int, tag: str, state: Path | None = None) -> dict[str, object]:
    """Run the tool once and return its row (with the report's summary)."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    output = RESULTS / f"{tag}-{slug}-{rules_name}-w{workers}.report.json"
    output.unlink(missing_ok=True)
    m = run_measured(tool_command(maildir, rules, workers, output, state), cwd=ROOT,
                     env=tool_env())
    summary = summary_of(output)
    # A run that did not see every message (a failing folder, say) measures nothing useful.
    complete = summary.get("messages_seen") == messages
    return row(label, rules_name, workers, m, messages, size,
               {"summary": summary, "complete": complete,
                **({} if complete else {"stderr": m.stderr[-2000:]})})


def run_plain(maildir: Path, rules_name: str, messages: int, size: int, tag: str) -> dict[str, object]:
    """Run the plain loop once in a subprocess and return its row (with its own timings)."""
    out = RESULTS / f"{tag}-plain-{rules_name}.json"
    m = run_measured([sys.executable, str(BENCH / "plain_loop.py"), "--corpus", str(maildir),
                      "--rules", rules_name, "--json", str(out)], cwd=ROOT)
    inner = json.loads(out.read_text()) if out.exists() else {}
    return row("plain loop", rules_name, 1, m, messages, size, {"plain": inner})


def mirror_rules(rules: Path, target: Path) -> Path:
    """A fresh directory of symlinks to the rule files of ``rules`` (third-party rule files
    are referenced, never copied); return it."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    base = rules if rules.is_dir() else rules.parent
    for f in rule_files(rules):
        link = target / f.relative_to(base)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    return target


def run_floor(maildir: Path, workers: int, messages: int, size: int, tag: str) -> dict[str, object]:
    """Fetch + extract alone: the tool with an empty rule directory when it accepts one,
    otherwise ``bench/floor.py`` (rescan.extract in the same number of processes)."""
    empty = DATA / "rules-empty"
    empty.mkdir(parents=True, exist_ok=True)
    for stale in empty.iterdir():
        stale.unlink()
    result = run_tool("floor (tool, no rules)", maildir, "none", empty, workers, messages,
                      size, tag)
    if result["returncode"] in (0, 1):
        return result
    m = run_measured([sys.executable, str(BENCH / "floor.py"), "--corpus", str(maildir),
                      "--workers", str(workers)], cwd=ROOT)
    return row("floor (extract)", "none", workers, m, messages, size)


def run_stamps(maildir: Path, rules_name: str, rules: Path, workers: int, messages: int,
               size: int, tag: str) -> tuple[list[dict[str, object]], dict[str, float]]:
    """Full scan with a state store, unchanged rerun, delta after adding one rule file, floor.

    Returns:
        The rows and the ratios (rerun speed-up, delta / floor).
    """
    work = mirror_rules(rules, DATA / f"stamps-rules-{rules_name}")
    state = DATA / f"stamps-{rules_name}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    rows = [run_tool("stamps: full", maildir, rules_name, work, workers, messages, size, tag, state)]
    # A rerun changes nothing but the run history, and takes a fraction of a second, where a
    # neighbour's hiccup shows: the median of RERUNS runs.
    reruns = sorted((run_tool("stamps: rerun", maildir, rules_name, work, workers, messages, size,
                              tag, state) for _ in range(RERUNS)), key=lambda r: r["wall_s"])
    rows.append({**reruns[RERUNS // 2], "run": f"stamps: rerun (median of {RERUNS})",
                 "rerun_walls": [r["wall_s"] for r in reruns]})
    (work / "bench-delta.yar").write_text(DELTA_RULE)
    rows.append(run_tool("stamps: delta +1 file", maildir, rules_name, work, workers, messages,
                         size, tag, state))
    rows.append(run_floor(maildir, workers, messages, size, tag))
    if not all(r.get("complete", True) for r in rows):
        return rows, {"stamps": "incomplete runs: see the rows' summary and stderr"}
    full, rerun, delta, floor = (r["wall_s"] for r in rows)
    cpu_full, cpu_rerun, cpu_delta, cpu_floor = (r["cpu_s"] for r in rows)
    # CPU-time ratios too: on a busy machine they are steadier than wall-time ratios.
    return rows, {"rerun_speedup": round(full / rerun, 1),
                  "rerun_speedup_cpu": round(cpu_full / cpu_rerun, 1),
                  "delta_vs_floor": round(delta / floor, 2),
                  "delta_vs_floor_cpu": round(cpu_delta / cpu_floor, 2)}


def machine() -> dict[str, object]:
    """The machine the numbers were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gb": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "yara_python": yara.__version__,
            "libyara": yara.YARA_VERSION, "kernel": platform.release()}


def table(rows: list[dict[str, object]]) -> str:
    """The rows as a markdown table."""
    lines = ["| run | rules | workers | wall s | CPU s | msg/s | MB/s | peak RSS MB | load | exit |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['rules']} | {r['workers']} | {r['wall_s']:.2f} | "
                     f"{r['cpu_s']:.1f} | {r['messages_per_s']:.0f} | {r['mb_per_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['load_before']:.1f} | {r['returncode']}"
                     f"{'' if r.get('complete', True) else ' (incomplete)'} |")
    return "\n".join(lines)


def ratios_table(ratios: dict[str, dict[str, float]]) -> str:
    """The ratios against their targets as a markdown table."""
    lines = ["| rules | measure | value | target | met |", "|---|---|---:|---:|---|"]
    for rules, values in ratios.items():
        for name, value in values.items():
            if name not in TARGETS:
                lines.append(f"| {rules} | {name} | {value} | | |")
                continue
            bound, kind = TARGETS[name]
            met = value >= bound if kind == "min" else value <= bound
            sign = ">=" if kind == "min" else "<="
            lines.append(f"| {rules} | {name} | {value} | {sign} {bound} | "
                         f"{'yes' if met else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: run the benchmarks, write the results JSON and print the tables."""
    parser = argparse.ArgumentParser(description="benchmark rescan against the plain loop")
    parser.add_argument("--corpus", default="spamassassin")
    parser.add_argument("--rules", nargs="+", default=["one-rule", "signature-base"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="worker counts to measure (default: 1 and all cores)")
    parser.add_argument("--stamps", action="store_true",
                        help="also measure full / rerun / delta / floor with --state")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument("--stamps-only", action="store_true",
                        help="only the stamps benchmarks (implies --stamps)")
    args = parser.parse_args(argv)

    if args.stamps_only:
        args.stamps, args.no_plain = True, True
    maildir = corpus(args.corpus)
    files = message_files(maildir)
    messages, size = len(files), sum(f.stat().st_size for f in files)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = time.strftime("%Y%m%d-%H%M%S")
    have_tool = tool_available()
    rows: list[dict[str, object]] = []
    ratios: dict[str, dict[str, float]] = {}
    for rules_name in args.rules:
        rules = ruleset(rules_name)
        walls: dict[int, dict[str, object]] = {}
        if have_tool:
            rows.append(warm_up(rules_name, rules, tag))
        if have_tool and not args.stamps_only:
            for n in args.workers:
                walls[n] = run_tool("tool", maildir, rules_name, rules, n, messages, size, tag)
                rows.append(walls[n])
                print(table([walls[n]]).splitlines()[-1], file=sys.stderr)
        plain = None
        if not args.no_plain:
            plain = run_plain(maildir, rules_name, messages, size, tag)
            rows.append(plain)
            print(table([plain]).splitlines()[-1], file=sys.stderr)
        ratio: dict[str, float] = {}
        lo, hi = min(args.workers), max(args.workers)
        if walls and lo != hi:
            ratio["all_vs_one"] = round(walls[lo]["wall_s"] / walls[hi]["wall_s"], 2)
        if walls:
            ratio["peak_rss_mb"] = walls[hi]["peak_rss_mb"]
        if walls and plain is not None:
            ratio["tool_vs_plain"] = round(plain["wall_s"] / walls[hi]["wall_s"], 2)
            inner = plain["plain"]
            if inner:
                ratio["tool_vs_plain_scan_only"] = round(
                    inner["scan_s"] / walls[hi]["wall_s"], 2)
        if have_tool and args.stamps:
            stamp_rows, stamp_ratios = run_stamps(maildir, rules_name, rules, hi, messages,
                                                  size, tag)
            rows += stamp_rows
            ratio.update(stamp_ratios)
        ratios[rules_name] = ratio

    result = {"time": tag, "corpus": str(maildir.relative_to(ROOT)) if maildir.is_relative_to(ROOT)
              else str(maildir), "messages": messages, "bytes": size, "machine": machine(),
              "tool_available": have_tool, "rows": rows, "ratios": ratios, "targets": TARGETS}
    out = RESULTS / f"{tag}-{args.corpus.replace('/', '_')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ncorpus: {messages} messages, {size / 1e6:.1f} MB; results: {out.relative_to(ROOT)}")
    if not have_tool:
        print("tool numbers: to be measured (python -m rescan scan --help does not work yet)")
    print()
    print(table(rows))
    print()
    print(ratios_table(ratios))


if __name__ == "__main__":
    main()
