"""Start-up time of the `sequencer` command: help of the command and of each subcommand, against `import torch`.

    .venv/bin/python benchmarks/cli_startup.py --repeats 5

Each line is timed in a fresh process, round-robin with the others (so that a load change hits all alike); the
median wall time is reported with its ratio to `python -c "import torch"` measured in the same rounds. The parsers
import no torch (sequencer/commands/), so every help should cost a small fraction of the import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sequencer.cli import COMMANDS

SEQUENCER = str(Path(sys.executable).with_name("sequencer"))


def wall_time(command: list[str]) -> float:
    """Seconds from starting `command` to its exit."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Time every help and the torch import round-robin, print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (the median is reported)")
    args = parser.parse_args()
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "sequencer --help": [SEQUENCER, "--help"],
        **{f"sequencer {name} --help": [SEQUENCER, name, "--help"] for name in COMMANDS},
    }
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(args.repeats):
        for label, command in commands.items():
            times[label].append(wall_time(command))
    torch_import = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':<34} {'median s':>9} {'vs import torch':>16}")
    for label, samples in times.items():
        median = statistics.median(samples)
        print(f"{label:<34} {median:>9.3f} {median / torch_import:>15.3f}x")


if __name__ == "__main__":
    main()
