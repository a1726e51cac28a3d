"""Training throughput of the distributed path on this machine's CPU: 1 process against 2 (gloo), same global batch.

Each setting is one `torchrun --standalone --nproc_per_node N -m sequencer train` of the built-in digits demo
(sequencer2d_tiny, 16 px) with the global batch split over the processes, run in a scratch folder. Throughput is what
rank 0 logs every --log-interval steps (images of all processes per second of wall time); the first epoch is warm-up
and left out, the median of the other intervals is reported, beside the wall time of the whole command.

    .venv/bin/python benchmarks/train_ddp.py --epochs 4 --output benchmarks/results/ddp_cpu_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# "epoch 1/3  step 10/22  loss 0.6931  lr 3.00e-03  1234.5 img/s", logged by rank 0 when no progress bar is drawn.
INTERVAL = re.compile(r"^epoch (\d+)/\d+  step \d+/\d+  loss \S+  lr \S+  ([\d.]+) img/s$", re.MULTILINE)
RESULT = re.compile(r"held-out top-1 ([\d.]+)%")
# (processes, torch threads per process): the distributed path, and one process given the same cores.
SETTINGS = ((1, 1), (1, 2), (2, 1))


def measure(processes: int, threads: int, args: argparse.Namespace) -> dict[str, float | int]:
    """Median img/s after the first epoch, wall seconds and held-out top-1 of one launch."""
    if args.global_batch % processes:
        sys.exit(f"--global-batch {args.global_batch} does not split over {processes} processes")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            "sequencer",
            "train",
            "--device",
            "cpu",
            "--threads",
            str(threads),
            "-b",
            str(args.global_batch // processes),
            "--epochs",
            str(args.epochs),
            "--log-interval",
            str(args.log_interval),
            "--no-progress",
            "--output",
            str(Path(scratch) / "run"),
        ]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=args.limit)
        wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    log = result.stdout + result.stderr
    rates = [float(rate) for epoch, rate in INTERVAL.findall(log) if int(epoch) > 0]
    top1 = RESULT.search(result.stdout)
    if not rates or top1 is None:
        sys.exit(f"no throughput or top-1 in the output of {' '.join(command)}:\n{log[-3000:]}")
    return dict(
        processes=processes,
        threads=threads,
        images_per_sec=statistics.median(rates),
        intervals=len(rates),
        wall_s=wall,
        top1=float(top1.group(1)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per launch (the first is warm-up)")
    parser.add_argument("--global-batch", type=int, default=64, help="images per step over all processes")
    parser.add_argument("--log-interval", type=int, default=5, help="steps between throughput readings")
    parser.add_argument("--limit", type=float, default=900.0, help="seconds before a launch is given up")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [measure(processes, threads, args) for processes, threads in SETTINGS]
    baseline = rows[0]["images_per_sec"]
    print(f"machine: {os.cpu_count()} CPU cores, 1-minute load average {load:.2f} before the runs")
    print(f"sequencer2d_tiny on the digits, 16 px, global batch {args.global_batch}, {args.epochs} epochs per launch")
    print("| processes x threads | img/s (median after epoch 0) | vs 1 x 1 | wall s | held-out top-1 % |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['processes']} x {row['threads']} | {row['images_per_sec']:.1f} | "
            f"{row['images_per_sec'] / baseline:.2f}x | {row['wall_s']:.1f} | {row['top1']:.2f} |"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps(dict(load_average=load, settings=vars(args) | {"output": str(args.output)}, rows=rows), indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
