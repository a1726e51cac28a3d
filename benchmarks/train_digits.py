"""The main job: `sequencer train` with no arguments, timed from the shell (start-up included), against 90 s.

Runs the exact command several times in a scratch folder, reads the held-out top-1 it prints, and, as a peer
measured in the same session, the same command with `--threads 2` (torch's default on a 2-core machine), stopped
after --peer-limit seconds if it has not finished by then.

    .venv/bin/python benchmarks/train_digits.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 90.0
TARGET_TOP1 = 98.0
RESULT = re.compile(r"held-out top-1 ([\d.]+)%")


def time_command(command: list[str], limit: float | None = None) -> tuple[float, float | None]:
    """(wall seconds, held-out top-1) of one run of `command` in a fresh scratch folder; top-1 None past `limit`."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return time.perf_counter() - start, None
        wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    match = RESULT.search(result.stdout)
    if match is None:
        sys.exit(f"no held-out top-1 in the output of {' '.join(command)}:\n{result.stdout[-2000:]}")
    return wall, float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of the main job")
    parser.add_argument("--no-peer", action="store_true", help="skip the --threads 2 peer run")
    parser.add_argument("--peer-limit", type=float, default=240.0, help="seconds before the peer run is stopped")
    args = parser.parse_args()
    sequencer = str(Path(sys.executable).with_name("sequencer"))
    if not os.access(sequencer, os.X_OK):
        sys.exit(f"{sequencer} not found: install the package (make install)")
    load = os.getloadavg()[0]
    runs = [time_command([sequencer, "train"]) for _ in range(args.runs)]
    walls, top1s = [w for w, _ in runs], [t for _, t in runs]
    print(f"machine: {os.cpu_count()} CPU cores, 1-minute load average {load:.2f} before the runs")
    print("| command | runs | wall s (median, max) | held-out top-1 % (min, max) | max wall / 90 s budget |")
    print("|---|---|---|---|---|")
    print(
        f"| `sequencer train` | {len(runs)} | {statistics.median(walls):.1f}, {max(walls):.1f} | "
        f"{min(top1s):.2f}, {max(top1s):.2f} | {max(walls) / BUDGET_S:.2f} |"
    )
    if not args.no_peer:
        wall, top1 = time_command([sequencer, "train", "--threads", "2"], limit=args.peer_limit)
        finished = top1 is not None
        shown = f"{wall:.1f}" if finished else f"> {wall:.0f} (stopped)"
        print(
            f"| `sequencer train --threads 2` (peer) | 1 | {shown} | {top1 if finished else '-'} | "
            f"{'' if finished else '> '}{wall / BUDGET_S:.2f} |"
        )
        print(f"\npeer / main job wall time: {'' if finished else '> '}{wall / statistics.median(walls):.2f}x")
    ok = max(walls) < BUDGET_S and min(top1s) >= TARGET_TOP1
    verdict = "meets" if ok else "MISSES"
    print(f"\nmain job {verdict} the target: >= {TARGET_TOP1}% held-out top-1 in < {BUDGET_S:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
