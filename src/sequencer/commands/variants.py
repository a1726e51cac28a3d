"""Top-1 on the ImageNet test sets (variants of ImageNet: ReaL, -A, -R, -Sketch, -V2, -C) found under one root, beside
the published figures.

Each dataset is read from its released folder, found under ROOT by its usual name or named by its own flag. Class
folders named by WordNet id or number take their ImageNet-1k index; ImageNet-A and -R are scored on their 200 classes,
ReaL against timm's packaged reassessed labels, ImageNet-C as the mCE normalised by AlexNet.
"""

from __future__ import annotations

import argparse

from sequencer.choices import DATASET_FLAGS, DATASET_FOLDERS
from sequencer.config import POSITIVE_INT
from sequencer.options import add_input_options, add_model_options, add_output_option, add_runtime_options

ROOT_HELP = "folder holding the datasets under their usual names, the first one found: " + "; ".join(
    f"{holds.partition(',')[0].partition(' (')[0]}: {' or '.join(DATASET_FOLDERS[key])}"
    for key, (_, holds) in DATASET_FLAGS.items()
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """ROOT, one flag per test set, --real-labels, --limit, --out, model, input and runtime options."""
    parser.add_argument("root", nargs="?", default=None, help=ROOT_HELP)
    group = parser.add_argument_group("datasets (each overrides the folder found under ROOT)")
    for flag, holds in DATASET_FLAGS.values():
        group.add_argument(f"--{flag}", default=None, metavar="DIR", help=f"{holds} folder")
    parser.add_argument(
        "--real-labels",
        default="",
        metavar="FILE",
        help="ImageNet-ReaL labels (JSON list, one entry per val image); default: timm's packaged file",
    )
    parser.add_argument(
        "--limit", type=POSITIVE_INT, default=None, help="at most N images per test set (and per -C folder)"
    )
    add_output_option(parser, "results/variants", "output folder (variants.csv, variants.png)", "--out", kind="folder")
    add_model_options(parser)
    add_input_options(parser)
    add_runtime_options(parser)
