"""Single-op timings behind choices in sequencer/recurrence.py and sequencer/kernels/onednn.py (CPU, float32).

    .venv/bin/python benchmarks/recurrence_ops.py --threads 1

Shapes are those of Sequencer2D-S's 32x32 stage at batch 8 (4 directions x 256 sequences x hidden 48, 32 steps):
- tanh against sigmoid on one step's cell state (why tanh is computed as 2 sigmoid(2x) - 1);
- reversing the time axis of a backward direction while gathering it into time-major layout;
- the projection's weight gradient with oneDNN, dy^T x against (x^T dy)^T, and with MKL (torch.mm).
Each group is timed round-robin with `sequencer.bench.time_round_robin`; medians in microseconds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sequencer.bench import time_round_robin
from sequencer.kernels.onednn import matmul_t


def main() -> None:
    """Time each group of alternatives and print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cell = torch.randn(4, 256, 48)
    out = torch.empty_like(cell)
    _report(
        "cell nonlinearity, 49k floats",
        {
            "torch.tanh": lambda: torch.tanh(cell, out=out),
            "torch.sigmoid": lambda: torch.sigmoid(cell, out=out),
            "2 sigmoid(2x) - 1": lambda: torch.mul(cell, 2, out=out).sigmoid_().mul_(2).sub_(1),
        },
        args.repeats,
    )

    projected = torch.randn(8, 32, 32, 4 * 192)
    source = projected[..., 192:384].permute(1, 0, 2, 3)  # one direction's gates, time-major view
    target = torch.empty(32, 8, 32, 192)
    backwards = torch.arange(31, -1, -1)

    def per_step() -> None:
        for t in range(32):
            target[t].copy_(source[31 - t])

    _report(
        "gather one direction, time-major",
        {
            "copy_ (no reversal)": lambda: target.copy_(source),
            "index_select(out=)": lambda: torch.index_select(source, 0, backwards, out=target),
            "per-step copy_": per_step,
            "index_copy_": lambda: target.index_copy_(0, backwards, source),
            "flip + copy_": lambda: target.copy_(source.flip(0)),
        },
        args.repeats,
    )

    x = torch.randn(8192, 192)
    grad = torch.randn(8192, 768)
    _report(
        "projection weight gradient (768 x 192) over 8192 tokens",
        {
            "oneDNN dy^T x": lambda: matmul_t(grad.t(), x.t()),
            "oneDNN (x^T dy)^T": lambda: matmul_t(x.t(), grad.t()).t().contiguous(),
            "MKL torch.mm(dy^T, x)": lambda: torch.mm(grad.t(), x),
        },
        args.repeats,
    )


def _report(title: str, steps: dict, repeats: int) -> None:
    times = time_round_robin(steps, torch.device("cpu"), 2, repeats)
    print(title)
    for name, values in times.items():
        print(f"  {name:<24} {1e6 * statistics.median(values):10.0f} us")


if __name__ == "__main__":
    main()
