"""Accuracy under the 15 ImageNet-C corruptions at 5 severities, made on the fly from a clean val set, and the mCE."""

from __future__ import annotations

import argparse

from sequencer.choices import CORRUPTIONS, SEVERITIES
from sequencer.config import POSITIVE_INT, comma_list
from sequencer.options import add_input_options, add_model_options, add_output_option, add_runtime_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA, model, --corruptions, --severities, --limit, --alexnet-errors, --out, input and runtime options."""
    parser.add_argument("data", help="clean labelled images: DATA/val/<class>/* or DATA/<class>/*")
    add_model_options(parser)
    parser.add_argument(
        "--corruptions",
        type=comma_list(str, CORRUPTIONS, distinct_sorted=True, empty=CORRUPTIONS),
        default="",
        help=f"comma-separated subset of ImageNet-C's corruptions: {', '.join(CORRUPTIONS)} (default: all)",
    )
    parser.add_argument(
        "--severities",
        type=comma_list(int, SEVERITIES, distinct_sorted=True, empty=SEVERITIES),
        default="",
        help=f"comma-separated subset of {','.join(map(str, SEVERITIES))} (default: all)",
    )
    parser.add_argument("--limit", type=POSITIVE_INT, default=None, help="use N images spread over the whole set")
    parser.add_argument(
        "--alexnet-errors",
        default="",
        help="AlexNet's top-1 errors for the mCE: JSON {corruption: error or [5 errors]} or CSV "
        "with columns corruption[,severity],error (fractions or percent); default: the "
        "published per-corruption means, which need all five severities",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random corruptions")
    add_output_option(parser, "results/robustness", "output folder", "--out", kind="folder")
    add_input_options(parser)
    add_runtime_options(parser)
