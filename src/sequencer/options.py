"""The parsers' side of the shared flags: each command adds the groups of `sequencer.config` it takes (with its own
defaults and help where they differ), its -o/--output, and --compare; `-c/--config` files become defaults
(`apply_config`), and a command's parsed flags reach its library function by name (`flag_values`)."""

from __future__ import annotations

import argparse
import functools

from sequencer.config import (
    Compilation,
    DatasetSource,
    InputOverrides,
    ModelSource,
    RecordedModelSource,
    Runtime,
    add_fields,
    as_parsed,
    check_normalization,
    option_names,
    read_config_file,
    writable_path,
)
from sequencer.errors import UsageError


def add_model_options(
    parser: argparse.ArgumentParser,
    source: type[ModelSource] = RecordedModelSource,
    model_help: str | None = None,
    checkpoint_help: str | None = None,
) -> None:
    """The flags of `source` (by default the model a checkpoint records), with a command's own help texts."""
    helps = {key: text for key, text in (("model", model_help), ("checkpoint", checkpoint_help)) if text}
    add_fields(parser, source, helps=helps)


def add_dataset_options(parser: argparse.ArgumentParser, data_help: str) -> argparse._ArgumentGroup:
    """`DatasetSource`'s flags; returns the group, for the command's splits."""
    return add_fields(parser, DatasetSource, helps={"data": data_help})["data"]


def add_input_options(parser: argparse.ArgumentParser, overrides: type[InputOverrides] = InputOverrides) -> None:
    """The flags of `overrides` (`ImageInputOverrides` for the commands that read image files)."""
    add_fields(parser, overrides)


def check_input_flags(args: argparse.Namespace) -> None:
    """Refuse --mean / --std whose length is neither 1 nor the input's channels, before any work."""
    channels = args.input_size[0] if getattr(args, "input_size", None) else getattr(args, "in_chans", None) or 3
    check_normalization(getattr(args, "mean", None), getattr(args, "std", None), channels)


def add_runtime_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """`Runtime`'s flags; returns the group, for a command's own runtime flags."""
    return add_fields(parser, Runtime)["runtime"]


def add_output_option(
    parser: argparse.ArgumentParser,
    default: str | None,
    help: str,
    *aliases: str,
    kind: str = "file",
    required: bool = False,
) -> None:
    """-o/--output, the one spelling of every subcommand's output: a "file", a "folder" or a file "stem", as `help`
    says, checked to be writable while the arguments are parsed; `aliases` keep the spelling timm's scripts or
    earlier versions used."""
    parser.add_argument(
        "-o",
        "--output",
        *aliases,
        dest="output",
        type=functools.partial(writable_path, kind=kind),
        default=default,
        required=required,
        metavar="PATH",
        help=help,
    )


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    """`Compilation`'s flag."""
    add_fields(parser, Compilation)


def add_compare_options(parser: argparse.ArgumentParser) -> None:
    """--compare: more models beside --model (Sequencer variants or timm models), each NAME or NAME=CHECKPOINT."""
    group = parser.add_argument_group("comparison")
    group.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="NAME[=CHECKPOINT]",
        help="more models side by side: Sequencer variants or any timm model, e.g. "
        "resnet50=resnet50.pth deit_small_patch16_224=deit_s.pth",
    )


def apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the flags a YAML file sets (a run's args.yaml, say) the parser's defaults: the command line still wins."""
    values = read_config_file(path, option_names(parser._actions))
    actions = {action.dest: action for action in parser._actions}
    try:
        checked = {key: as_parsed(parser, actions[key], value) for key, value in values.items()}
    except argparse.ArgumentError as error:
        raise UsageError(f"--config {path}: {error}") from None
    parser.set_defaults(**checked)
