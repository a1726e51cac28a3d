"""Parameters and MACs (recurrent layers counted) of every Sequencer variant: the paper's model-zoo table."""

from __future__ import annotations

import argparse

from sequencer.choices import SUMMARY_FORMATS
from sequencer.config import IMAGE_SIDE
from sequencer.options import add_output_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--models, --img-size, --format, -o/--out."""
    parser.add_argument("--models", default="*", help="shell-style pattern of variant names (default: all)")
    parser.add_argument("--img-size", type=IMAGE_SIDE, default=None, help="input size (default: each variant's own)")
    parser.add_argument(
        "--format", choices=SUMMARY_FORMATS, default="markdown", help="format of the table printed on stdout"
    )
    add_output_option(
        parser,
        "results/summary",
        "output folder for summary.csv and summary.png (MACs against parameters)",
        "--out",
        kind="folder",
    )
