"""Top-1, top-5, loss and images per second of a model on a labelled dataset (timm's validate.py flags)."""

from __future__ import annotations

import argparse

from sequencer.config import ImageInputOverrides
from sequencer.options import (
    add_compile_options,
    add_dataset_options,
    add_input_options,
    add_model_options,
    add_output_option,
    add_runtime_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of timm's validate.py that apply here."""
    data = add_dataset_options(
        parser, "dataset root (DATA/val/<class>/*, or DATA/<class>/*); none: the built-in digits"
    )
    data.add_argument("--split", default="validation", help="split to evaluate: validation (or val), test, train")
    add_model_options(parser)
    add_input_options(parser, ImageInputOverrides)
    add_runtime_options(parser)
    add_compile_options(parser)
    add_output_option(parser, "", "JSON file to write the metrics to", "--results-file")
    parser.add_argument(
        "--valid-labels",
        default="",
        metavar="imagenet-a|imagenet-r|FILE",
        help="score only these classes (logits of the others masked out): ImageNet-A's or ImageNet-R's 200 "
        "(timm's packaged lists), or a file with one class index per line",
    )
    parser.add_argument(
        "--real-labels",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="also report ImageNet-ReaL top-1 on the ImageNet val images (ILSVRC2012_val_*.JPEG): labels from "
        "FILE, else timm's packaged imagenet_real_labels.json",
    )
