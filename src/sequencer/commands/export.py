"""Export a model to ONNX, TorchScript or a torch.export ExportedProgram, then load the file back and check it."""

from __future__ import annotations

import argparse

from sequencer.choices import EXPORT_FORMATS, QUANTIZATIONS
from sequencer.config import NON_NEGATIVE, POSITIVE_INT
from sequencer.options import add_input_options, add_model_options, add_output_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, input size and export options."""
    add_model_options(parser)
    add_input_options(parser)
    group = parser.add_argument_group("export")
    group.add_argument(
        "--format", default=None, choices=EXPORT_FORMATS, help="export format (default: from the suffix of -o)"
    )
    add_output_option(group, None, "file to write (.onnx, .pt, .pt2)", required=True)
    group.add_argument(
        "--dynamic-batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="any batch size, checked at three (default); --no-dynamic-batch fixes it to -b (TorchScript takes any)",
    )
    group.add_argument(
        "-b",
        "--batch-size",
        type=POSITIVE_INT,
        default=2,
        help="batch of the example input, and the fixed batch of a --no-dynamic-batch export (default 2)",
    )
    group.add_argument("--tolerance", type=NON_NEGATIVE, default=1e-4, help="largest accepted |logit difference|")
    group.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    group.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=None,
        help="ONNX only: write the file with int8 weights (onnxruntime's dynamic quantization) once the float32 export "
        "passed its check, and report its top-1 agreement and max |logit diff| against PyTorch on the check images",
    )
