"""Average a run's best epoch checkpoints into one weights file, or export one checkpoint's weights alone.

`sequencer average RUN_DIR -n 5 -o avg.safetensors` ranks the checkpoint-EPOCH.pth.tar that `sequencer train
--checkpoint-hist` kept in RUN_DIR by the metric each one recorded (--eval-metric of the run) and writes the mean of
the 5 best. `sequencer average RUN_DIR/last.pth.tar -o weights.safetensors` writes that checkpoint's weights without
the optimizer state. The output (.safetensors or .pth) loads with `--checkpoint FILE` or
`create_model(name, pretrained=FILE)`.

`--hf-folder DIR` writes the weights in the Hugging Face Hub layout of timm's `save_for_hf` (config.json and
model.safetensors), which `timm.create_model("local-dir:DIR")`, `sequencer.create_model("local-dir:DIR")` and
`--checkpoint DIR` read; `--push-to-hub ORG/NAME` then uploads that folder (huggingface_hub's token: HF_TOKEN or
`hf auth login`), and `timm.create_model("hf-hub:ORG/NAME")` builds it.
"""

from __future__ import annotations

import argparse
import functools

from sequencer.config import POSITIVE_INT, writable_path
from sequencer.options import add_output_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR or FILE ..., -n, -o, --use-ema / --no-use-ema, --hf-folder, --push-to-hub, --hub-private."""
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="RUN_DIR|FILE",
        help="a training output folder (its checkpoint-EPOCH.pth.tar files) or checkpoint files",
    )
    parser.add_argument(
        "-n", "--num", type=POSITIVE_INT, default=None, metavar="N", help="average the N best (default: all)"
    )
    add_output_option(parser, None, "weights file to write: .safetensors or .pth (this, --hf-folder or both)")
    parser.add_argument(
        "--use-ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average the EMA weights when the checkpoints hold them (default); --no-use-ema: the raw weights",
    )
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument(
        "--hf-folder",
        type=functools.partial(writable_path, kind="folder"),
        default=None,
        metavar="DIR",
        help="write the weights (beside -o, or alone) in timm's Hub layout: DIR/config.json and "
        'DIR/model.safetensors, which timm.create_model("local-dir:DIR") and --checkpoint DIR read',
    )
    hub.add_argument(
        "--push-to-hub",
        default=None,
        metavar="ORG/NAME",
        help="upload the two files written in --hf-folder (no other file there) to this Hub model repository, made "
        "if missing (token: HF_TOKEN or `hf auth login`)",
    )
    hub.add_argument(
        "--hub-private", action="store_true", help="make the --push-to-hub repository private when it is created"
    )
