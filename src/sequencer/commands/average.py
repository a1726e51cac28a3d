"""Average a run's best epoch checkpoints into one weights file, or export one checkpoint's weights alone.

`sequencer average RUN_DIR -n 5 -o avg.safetensors` ranks the checkpoint-EPOCH.pth.tar that `sequencer train
--checkpoint-hist` kept in RUN_DIR by the metric each one recorded (--eval-metric of the run) and writes the mean of
the 5 best. `sequencer average RUN_DIR/last.pth.tar -o weights.safetensors` writes that checkpoint's weights without
the optimizer state. The output (.safetensors or .pth) loads with `--checkpoint FILE` or
`create_model(name, pretrained=FILE)`.
"""

from __future__ import annotations

import argparse

from sequencer.config import bounded
from sequencer.options import add_output_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR or FILE ..., -n, -o, --use-ema / --no-use-ema."""
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="RUN_DIR|FILE",
        help="a training output folder (its checkpoint-EPOCH.pth.tar files) or checkpoint files",
    )
    parser.add_argument(
        "-n", "--num", type=bounded(int, min=1), default=None, metavar="N", help="average the N best (default: all)"
    )
    add_output_option(parser, None, "weights file to write: .safetensors or .pth", required=True)
    parser.add_argument(
        "--use-ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average the EMA weights when the checkpoints hold them (default); --no-use-ema: the raw weights",
    )
