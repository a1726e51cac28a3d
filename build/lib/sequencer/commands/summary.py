"""Parameters and MACs (recurrent layers counted) of every Sequencer variant: the paper's model-zoo table."""

from __future__ import annotations

import argparse

from sequencer.options import add_output_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--models, --img-size, --format, --out."""
    parser.add_argument("--models", default="*", help="shell-style pattern of variant names (default: all)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: each variant's own)")
    parser.add_argument(
        "--format",
        choices=("markdown", "csv"),
        default=None,
        help="table format (default: csv for an --out file ending in .csv, else markdown)",
    )
    add_output_option(parser, "", "write the table to this file instead of printing it", "--out")
