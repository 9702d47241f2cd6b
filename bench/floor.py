"""The floor of a scan: read every message and extract its parts, no engine at all.

Runs ``rescan.extract.extract`` over the messages of a Maildir in ``--workers`` processes
(the tool's own worker count), so a delta rescan can be compared with the cost of fetching
and extracting alone. Prints messages, parts, seconds.

Usage::

    python bench/floor.py --corpus spamassassin --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, corpus, message_files  # noqa: E402

sys.path.insert(0, str(ROOT))
BATCH = 64  # messages per task: enough to amortise the inter-process round trip
PASSWORDS = ("infected",)  # the archive passwords the tool tries by default


def extract_batch(paths: list[str]) -> int:
    """Extract every message of ``paths``; return the number of parts."""
    from rescan.extract import extract
    from rescan.models import Limits

    limits = Limits()
    parts = 0
    for path in paths:
        parts += sum(1 for _ in extract(Path(path).read_bytes(), limits, PASSWORDS))
    return parts


def main(argv: list[str] | None = None) -> None:
    """Command line: extract the corpus in N processes and print the measurements."""
    parser = argparse.ArgumentParser(description="fetch + extract only, in N processes")
    parser.add_argument("--corpus", default="spamassassin")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    files = [str(p) for p in message_files(corpus(args.corpus))]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        parts = sum(pool.map(extract_batch, [files[i:i + BATCH] for i in range(0, len(files), BATCH)]))
    print(json.dumps({"messages": len(files), "parts": parts, "workers": args.workers,
                      "wall_s": round(time.perf_counter() - started, 3)}))


if __name__ == "__main__":
    main()
