"""Images/s and peak memory of inference and training steps: ours beside timm's port, our reference path and peers.

Every model is measured at each resolution, batch size and precision asked for, in two modes: "infer" (a forward
pass under no_grad) and "train" (forward, cross-entropy, backward, AdamW step). Our models run once per --impls
entry (rnn_impl); timm's sequencer2d_* twin carries the same weights (its logits are checked against ours before
anything is timed); other names are timm models. The implementations of one setting are timed round-robin in one
process (median step); peak memory is measured in a fresh subprocess per implementation and setting.
"""

from __future__ import annotations

import argparse

from sequencer.choices import BENCH_MODES, BENCH_PRECISIONS, BENCH_RUNTIMES, DEFAULT_MODEL, IMPLEMENTATIONS
from sequencer.config import COUNT, POSITIVE_INT, comma_list
from sequencer.options import add_output_option, add_runtime_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Models, settings, repeats and outputs; device, threads and -b come from the shared runtime options."""
    parser.add_argument(
        "--models",
        type=comma_list(str),
        default=[DEFAULT_MODEL],
        help="comma-separated: our variants (see `sequencer summary`) and/or timm models",
    )
    parser.add_argument(
        "--resolutions", type=comma_list(POSITIVE_INT), default=[224], help="comma-separated input sizes"
    )
    parser.add_argument(
        "--batch-sizes", type=comma_list(POSITIVE_INT), default=None, help="comma-separated (default: -b)"
    )
    parser.add_argument(
        "--precisions",
        type=comma_list(str, BENCH_PRECISIONS),
        default=None,
        help=f"comma-separated, some of {', '.join(BENCH_PRECISIONS)} (default: amp with --amp, else float32)",
    )
    parser.add_argument(
        "--modes",
        type=comma_list(str, BENCH_MODES),
        default=list(BENCH_MODES),
        help=f"comma-separated, some of {', '.join(BENCH_MODES)}",
    )
    parser.add_argument(
        "--impls",
        type=comma_list(str, IMPLEMENTATIONS),
        default=["auto", "reference"],
        help=f"comma-separated rnn_impl values to run our models with, some of {', '.join(IMPLEMENTATIONS)}",
    )
    parser.add_argument(
        "--runtimes",
        type=comma_list(str, BENCH_RUNTIMES),
        default=["torch"],
        help="comma-separated engines for our models: torch (eager), torch-compile (inductor; inference only), "
        "onnxruntime and onnxruntime-int8 (CPU, inference only, float32 settings: the file `export --dynamic-batch` "
        "writes from the same weights, as is or with `--quantize int8`); timm's models run eager torch",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="also train our models with gradient checkpointing (compared with timm without)",
    )
    parser.add_argument("--no-timm-twin", action="store_true", help="skip timm's sequencer2d_* with our weights")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--repeats", type=POSITIVE_INT, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=COUNT, default=1, help="untimed rounds first")
    add_output_option(parser, "bench", "file stem: writes OUTPUT.json, OUTPUT.csv and OUTPUT.png", kind="stem")
    add_runtime_options(parser)
    parser.set_defaults(batch_size=8)
