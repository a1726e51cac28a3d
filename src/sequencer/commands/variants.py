"""Top-1 on the ImageNet variants found under one root (ReaL, -A, -R, -Sketch, -V2, -C), beside the published figures.

Each dataset is read from its released folder, found under ROOT by its usual name or named by its own flag. Class
folders named by WordNet id or number take their ImageNet-1k index; ImageNet-A and -R are scored on their 200 classes,
ReaL against timm's packaged reassessed labels, ImageNet-C as the mCE normalised by AlexNet.
"""

from __future__ import annotations

import argparse

from sequencer.options import add_input_options, add_model_options, add_output_option, add_runtime_options

# Test-set key (see sequencer.analysis.variants.TEST_SETS) -> the flag naming its folder, and what it holds.
DATASET_FLAGS = {
    "real": ("imagenet-val", "ImageNet val images, for ImageNet and ImageNet-ReaL"),
    "a": ("imagenet-a", "ImageNet-A"),
    "r": ("imagenet-r", "ImageNet-R"),
    "sketch": ("imagenet-sketch", "ImageNet-Sketch"),
    "v2": ("imagenetv2", "ImageNet-V2 (matched frequency)"),
    "c": ("imagenet-c", "ImageNet-C, as released: <corruption>/<severity>/<wnid>/*"),
}
ROOT_HELP = (
    "folder holding the datasets under their usual names: imagenet/val, imagenet-val or val (ImageNet and ReaL); "
    "imagenet-a; imagenet-r; imagenet-sketch/sketch, imagenet-sketch or sketch; "
    "imagenetv2-matched-frequency-format-val, imagenetv2-matched-frequency or imagenet-v2; imagenet-c"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """ROOT, one flag per dataset, --real-labels, --limit, --out, model, input and runtime options."""
    parser.add_argument("root", nargs="?", default=None, help=ROOT_HELP)
    group = parser.add_argument_group("datasets (each overrides the folder found under ROOT)")
    for key, (flag, holds) in DATASET_FLAGS.items():
        group.add_argument(f"--{flag}", dest=f"dataset_{key}", default=None, metavar="DIR", help=f"{holds} folder")
    parser.add_argument(
        "--real-labels",
        default="",
        metavar="FILE",
        help="ImageNet-ReaL labels (JSON list, one entry per val image); default: timm's packaged file",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most N images per dataset (and per -C folder)")
    add_output_option(parser, "results/variants", "output folder (variants.csv, variants.png)", "--out", kind="folder")
    add_model_options(parser, default_model="sequencer2d_s")
    add_input_options(parser)
    add_runtime_options(parser)
