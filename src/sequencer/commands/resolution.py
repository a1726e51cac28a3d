"""Top-1 against inference resolution: a model trained at one size, evaluated at others with the same weights."""

from __future__ import annotations

import argparse

from sequencer.config import IMAGE_SIDE, comma_list
from sequencer.options import (
    add_compare_options,
    add_input_options,
    add_model_options,
    add_output_option,
    add_runtime_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA, --model/--checkpoint, --compare, --sizes, --out, input and runtime options."""
    parser.add_argument("data", help="labelled images: DATA/val/<class>/* or DATA/<class>/*")
    add_model_options(parser)
    add_compare_options(parser)
    parser.add_argument(
        "--sizes",
        type=comma_list(IMAGE_SIDE, distinct_sorted=True),
        default="160,224,288,384,448",
        help="comma-separated inference sizes",
    )
    add_output_option(parser, "results/resolution", "output folder for resolution.csv and .png", "--out", kind="folder")
    add_input_options(parser)
    add_runtime_options(parser)
