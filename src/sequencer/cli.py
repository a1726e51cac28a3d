"""The `sequencer` command: one entry point whose subcommands share their option definitions (see options.py).

A subcommand's flags come from `sequencer.commands.<name>`, which imports no torch, timm or matplotlib; the module
that does its work is imported only when it runs, so help and argument errors are instant. Every expected failure
(`sequencer.errors.SequencerError`) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import NoReturn

from sequencer import __version__
from sequencer.errors import SequencerError
from sequencer.options import apply_config, check_input_flags

# name -> (module whose `run(args) -> int` does the work, one-line help); the flags: sequencer.commands.<name>
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
    "variants": (
        "sequencer.analysis.variants",
        "top-1 on the ImageNet test sets (variants of ImageNet: ReaL/-A/-R/-Sketch/-V2/-C) beside published figures",
    ),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """A parser whose argument errors are one line on stderr and exit code 2, like every other refused input."""

    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage block first; `--help` still shows it.
        self.exit(2, f"{self.prog}: error: {message}\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's real default, unless it is empty or the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, "", [], argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of `command` only (none for `sequencer --help`)."""
    parser = OneLineErrorParser(prog="sequencer", description="Sequencer: Deep LSTM for Image Classification")
    parser.add_argument("--version", action="version", version=f"sequencer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.command_parsers = {}
    for name, (_, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, formatter_class=DefaultsHelpFormatter)
        parser.command_parsers[name] = sub_parser
        if name == command:
            flags = importlib.import_module(f"sequencer.commands.{name}")
            sub_parser.description = flags.__doc__
            flags.add_arguments(sub_parser)
    return parser


def parse(parser: argparse.ArgumentParser, command: str | None, argv: list[str]) -> argparse.Namespace:
    """The parsed command line; words no flag takes are refused by the subcommand's parser, which names it."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        (parser.command_parsers[command] if command else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _torchrun_restarts_left() -> bool:
    """Whether this process is a torchrun worker that torchrun would restart after a failure."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    return restarts > int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand; a `SequencerError` becomes one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if word in COMMANDS), None)  # the first word that names a subcommand
    parser = build_parser(command)
    args = parse(parser, command, argv)
    # Warnings (no checkpoint given, a deprecated option ...) read as one line, like the errors, without source lines;
    # only while the command runs, so that later warnings of the same process are not labelled with its name.
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_: f"sequencer {args.command}: warning: {message}\n"
    try:
        if getattr(args, "config", None):
            apply_config(parser.command_parsers[command], args.config)
            args = parse(parser, command, argv)
        check_input_flags(args)
        if getattr(args, "device_modules", None):  # before the device is checked: they may register it
            from sequencer.runtime import import_device_modules

            import_device_modules(args.device_modules)
        if getattr(args, "amp", False):
            from sequencer.runtime import check_amp

            check_amp(args.device, args.amp_dtype)
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except SequencerError as error:
        # Under torchrun every process meets the same refusal: one says it. A restartable launch would only restart
        # a command that is refused again (and print it again), so there the processes end with 0.
        restart = _torchrun_restarts_left()
        if int(os.environ.get("RANK", "0")) == 0:
            note = " (exit 0, so that torchrun does not restart a refused command)" if restart else ""
            print(f"sequencer {args.command}: error: {error}{note}", file=sys.stderr)
        return 0 if restart else 2
    except KeyboardInterrupt:  # Ctrl-C: the user's stop, not a bug (train says what it leaves to resume from)
        print(f"sequencer {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
