"""Classify images or folders of images with a model's own preprocessing; print top-k labels, or write CSV / JSON."""

from __future__ import annotations

import argparse

from sequencer.choices import DEFAULT_MODEL, EXPORT_PAYS_OFF_AT, PREDICT_RUNTIMES, PREDICTION_FORMATS
from sequencer.config import POSITIVE_INT, ImageInputOverrides
from sequencer.options import add_input_options, add_model_options, add_output_option, add_runtime_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Inputs, model, preprocessing, runtime and output options."""
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (recursive)")
    add_model_options(
        parser,
        model_help="model name (see `sequencer summary`; default: the one the --checkpoint or .onnx file records, "
        f"else {DEFAULT_MODEL})",
        checkpoint_help="weights file (.pth, .pth.tar, .safetensors), or an .onnx file written by `sequencer export` "
        "(run by onnxruntime with the preprocessing and class names stored in it)",
    )
    add_input_options(parser, ImageInputOverrides)
    runtime = add_runtime_options(parser)
    runtime.add_argument(
        "--runtime",
        choices=PREDICT_RUNTIMES,
        default="auto",
        help="what runs the model: torch, or onnxruntime on the CPU (the `export` extra; --threads sets its intra-op "
        "threads). auto: onnxruntime for an .onnx --checkpoint, and for a --checkpoint on the CPU without --amp when "
        "onnxruntime is installed (the fastest exact CPU path) and the checkpoint's export is cached or this run has "
        f"{EXPORT_PAYS_OFF_AT} images or more to repay it (the export is checked and kept in $SEQUENCER_CACHE, default "
        "~/.cache/sequencer: about 40 s for Sequencer2D-S on 2 cores); else torch",
    )
    group = parser.add_argument_group("output")
    group.add_argument("--topk", type=POSITIVE_INT, default=5, help="classes to list per image")
    group.add_argument(
        "--class-map",
        default=None,
        metavar="FILE",
        help="class names: one per line, or a JSON list / dict (default: ImageNet-1K for 1000 classes)",
    )
    add_output_option(group, None, "file to write the predictions to, instead of stdout")
    group.add_argument(
        "--format",
        dest="output_format",
        choices=PREDICTION_FORMATS,
        default=None,
        help="output format (default: from --output's suffix .csv / .json, else a table)",
    )
