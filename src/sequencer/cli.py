"""The `sequencer` command: one entry point whose subcommands share their option definitions (see options.py).

Only the module of the subcommand being run is imported, so `sequencer --help` does not pay for torch, timm or
matplotlib. Every expected failure (`sequencer.errors.SequencerError`) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sequencer.errors import SequencerError

# name -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sequencer.train", "train or fine-tune a model (timm-style flags; works under torchrun)"),
    "validate": ("sequencer.validate", "top-1 / top-5 / loss / images per second on a labelled folder"),
    "predict": ("sequencer.inference", "classify images or folders with a model's own preprocessing"),
    "export": ("sequencer.deploy", "export to ONNX, TorchScript or an ExportedProgram and check it"),
    "average": ("sequencer.average", "average a run's best epoch checkpoints, or export a checkpoint's weights"),
    "bench": ("sequencer.bench", "throughput and peak memory against timm and other models"),
    "summary": ("sequencer.analysis.summary", "parameters and MACs of every variant"),
    "erf": ("sequencer.analysis.erf", "effective receptive field maps per stage"),
    "resolution": ("sequencer.analysis.resolution", "top-1 against inference resolution"),
    "robustness": ("sequencer.analysis.robustness", "accuracy under ImageNet-C corruptions, mCE"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its options (none for `sequencer --help`)."""
    parser = argparse.ArgumentParser(prog="sequencer", description="Sequencer: Deep LSTM for Image Classification")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            sub_parser.description = module.__doc__
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(run=module.run)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand; a `SequencerError` becomes one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    command = _command_of(argv)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except SequencerError as error:
        print(f"sequencer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
