"""The `sequencer` command: one entry point whose subcommands share their option definitions (see options.py)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sequencer.train", "train or fine-tune a model (timm-style flags; works under torchrun)"),
    "validate": ("sequencer.validate", "top-1 / top-5 / loss / images per second on a labelled folder"),
    "predict": ("sequencer.inference", "classify images or folders with a model's own preprocessing"),
    "export": ("sequencer.deploy", "export to ONNX, TorchScript or an ExportedProgram and check it"),
    "bench": ("sequencer.bench", "throughput and peak memory against timm and other models"),
    "summary": ("sequencer.analysis.summary", "parameters and MACs of every variant"),
    "erf": ("sequencer.analysis.erf", "effective receptive field maps per stage"),
    "resolution": ("sequencer.analysis.resolution", "top-1 against inference resolution"),
    "robustness": ("sequencer.analysis.robustness", "accuracy under ImageNet-C corruptions, mCE"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each subcommand module adds its own options."""
    parser = argparse.ArgumentParser(prog="sequencer", description="Sequencer: Deep LSTM for Image Classification")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
