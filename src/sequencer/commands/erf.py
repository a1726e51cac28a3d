"""Effective receptive fields per stage: how much each input pixel moves the centre output of every stage.

The paper's recipe: the gradient of the centre output feature with respect to the input image, averaged over images,
shown as log10(x + 1) heat maps. Sequencer's map is cross-shaped (the vertical and horizontal LSTMs see whole
columns and rows), a CNN's a compact blob. Models without a checkpoint are randomly initialised from --seed.
"""

from __future__ import annotations

import argparse

from sequencer.config import IMAGE_SIDE, POSITIVE_INT
from sequencer.options import add_compare_options, add_model_options, add_output_option, add_runtime_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, comparison (random init without a checkpoint), data, image count and size, output options."""
    add_model_options(parser)
    add_compare_options(parser)
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        metavar="DATA",
        help="image folder (DATA/val/<class>/* or DATA/<class>/*); none: random noise images",
    )
    parser.add_argument("--num-images", type=POSITIVE_INT, default=32, help="images to average over")
    parser.add_argument("--img-size", type=IMAGE_SIDE, default=None, help="input size (default: the first model's)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random images and of the weights of models without checkpoint"
    )
    add_output_option(parser, "results/erf", "output folder for erf.csv, erf.png and erf.npz", "--out", kind="folder")
    add_runtime_options(parser)
    # Memory grows with the images backpropagated at once (sequencer2d_s at 224 px: about 0.3 GiB each); the
    # maps do not depend on it.
    parser.set_defaults(batch_size=4)
