"""Run a command and measure its wall time and the peak total RSS of its process tree."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
INTERVAL = 0.05  # seconds between two samples of the process tree


@dataclass(frozen=True)
class Measured:
    """One finished command: exit code, wall seconds, CPU seconds of the whole tree (user +
    system, of every descendant: reaped ones from rusage, others sampled from /proc), peak tree RSS in bytes, the 1-minute load average
    when it started (other work on the machine skews wall times), captured output."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss: int
    load_before: float
    stdout: str
    stderr: str


def children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_rss(root: int) -> int:
    """Sum of the resident set sizes (bytes) of ``root`` and all its descendants."""
    tree = children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(tree.get(pid, ()))
    return total


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (the first is the state), or
    None for a gone process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system, own time only) of ``root`` and each live descendant."""
    tree = children()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu, stack = {}, [root]
    while stack:
        pid = stack.pop()
        fields = stat_fields(pid)
        if fields is None:
            continue
        cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        stack.extend(tree.get(pid, ()))
    return cpu


def run_measured(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd``, sampling its process tree's RSS every ``INTERVAL`` seconds.

    Returns:
        The exit code, wall time, peak of the summed RSS, and the captured output.
    """
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    seen_cpu: dict[int, float] = {}  # pid -> last CPU seconds seen
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            seen_cpu.update(tree_cpu(proc.pid))
            stop.wait(INTERVAL)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # Reaped time misses grandchildren whose parent never waited for them (workers of a
    # forkserver); the /proc samples miss each process's last INTERVAL: take the larger.
    cpu = max(reaped, sum(seen_cpu.values()))
    return Measured(proc.returncode, wall, cpu, peak, load, stdout, stderr)
