"""One BiLSTM2D mixer per stage shape: each rnn_impl against the nn.LSTM reference, forward and training.

    .venv/bin/python benchmarks/recurrence.py --threads 2 --batch-sizes 8 --repeats 9
    .venv/bin/python benchmarks/recurrence.py --threads 2 --impls fused,fused-mkl
    .venv/bin/python benchmarks/recurrence.py --device cuda --amp --batch-sizes 128 --impls fused

Times the mixer alone (projection, four directions, union and fc) at the map sizes Sequencer2D-S sees at 224 px
(32x32 with C=192, D=48; 16x16 with C=384, D=96) in "infer" (no_grad forward) and "train" (forward + backward),
round-robin in one process with `sequencer.bench.time_round_robin`, and prints median milliseconds and the speed-up
over the reference measured in the same run. Optional JSON output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from sequencer.bench import time_round_robin
from sequencer.model import BiLSTM2D, route
from sequencer.runtime import autocast, resolve_device, set_threads

STAGES = {"stage1": (32, 192, 48), "stage2-4": (16, 384, 96)}  # map side, channels, hidden at 224 px


def main() -> None:
    """Parse the options, time every (stage, batch, mode, impl) and print the table."""
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # from mkldnn.flags()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="8", help="comma-separated batch sizes")
    parser.add_argument("--sides", default="", help="comma-separated map sides overriding the 224-px ones")
    parser.add_argument(
        "--impls",
        default="fused",
        help="comma-separated rnn_impl values to set against reference, or the dropped variant "
        "fused-mkl (MKL instead of oneDNN GEMMs)",
    )
    parser.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    set_threads(args.threads)
    device = resolve_device(args.device)
    impls = ["reference", *args.impls.split(",")]
    sides = [int(s) for s in args.sides.split(",")] if args.sides else None
    rows = []
    print(
        f"{'stage':<9} {'map':>7} {'batch':>5} {'mode':<5} "
        + " ".join(f"{i + ' ms':>14}" for i in impls)
        + "  speed-up vs reference"
    )
    for stage, (side, dim, hidden) in STAGES.items():
        for side_used in sides or [side]:
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                torch.manual_seed(0)
                mixer = BiLSTM2D(dim, hidden, cell=args.cell).to(device)
                route(mixer, rnn_impl="reference")
                x = torch.randn(batch, side_used, side_used, dim, device=device)
                for mode in ("infer", "train"):
                    steps = {impl: _step(mixer, impl, x, mode, device, args.amp) for impl in impls}
                    times = time_round_robin(steps, device, args.warmup, args.repeats)
                    ms = {impl: 1000 * statistics.median(t) for impl, t in times.items()}
                    ratios = "  ".join(f"{impl} {ms['reference'] / ms[impl]:.2f}x" for impl in impls[1:])
                    print(
                        f"{stage:<9} {side_used:>3}x{side_used:<3} {batch:>5} {mode:<5} "
                        + " ".join(f"{ms[i]:>14.2f}" for i in impls)
                        + f"  {ratios}"
                    )
                    rows.append(
                        dict(
                            stage=stage,
                            side=side_used,
                            dim=dim,
                            hidden=hidden,
                            batch=batch,
                            mode=mode,
                            cell=args.cell,
                            ms=ms,
                            threads=torch.get_num_threads(),
                            device=str(device),
                        )
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _step(mixer: BiLSTM2D, impl: str, x: torch.Tensor, mode: str, device: torch.device, amp: bool):
    run = _variant(mixer, impl)

    def infer() -> None:
        with torch.no_grad(), autocast(device, amp):
            run(x)

    def train() -> None:
        with autocast(device, amp):
            out = run(x.requires_grad_())
        out.backward(torch.ones_like(out))
        mixer.zero_grad(set_to_none=True)
        x.grad = None

    return infer if mode == "infer" else train


def _variant(mixer: BiLSTM2D, impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """An rnn_impl, or a variant that was tried and dropped (see BENCHMARKS.md)."""
    if impl == "fused-mkl":  # the fused path with MKL's sgemm for the projection and fc instead of oneDNN

        def without_onednn(x: torch.Tensor) -> torch.Tensor:
            mixer.rnn_impl = "fused"
            with torch.backends.mkldnn.flags(enabled=False):
                return mixer(x)

        return without_onednn

    def named(x: torch.Tensor) -> torch.Tensor:
        mixer.rnn_impl = impl
        return mixer(x)

    return named


if __name__ == "__main__":
    main()
