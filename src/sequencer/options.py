"""Option groups shared by the subcommands, so each flag is defined once, and the argparse types that check a
flag's value while the command line is parsed: ranges (`bounded`), comma lists (`comma_list`) and writable outputs
(`writable_path`); the names a flag offers come from `sequencer.choices`."""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sequencer.choices import AMP_DTYPES, DEFAULT_MODEL, INPUT_KEYS, INTERPOLATIONS, MAX_IMAGE_SIDE
from sequencer.errors import UsageError


@dataclass(frozen=True)
class Bounded:
    """An argparse type: the text read as `kind`, refused unless it is >= `low`, > `above` and <= `high` (each
    bound that is not None)."""

    kind: type[int] | type[float]
    low: float | None = None
    above: float | None = None
    high: float | None = None

    def __call__(self, text: str) -> float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {self.kind.__name__} value: {text!r}") from None
        # Written so that NaN, which compares false with everything, is refused.
        within = (
            (self.low is None or value >= self.low)
            and (self.above is None or value > self.above)
            and (self.high is None or value <= self.high)
        )
        if not within:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {self.limits}")
        return value

    @property
    def limits(self) -> str:
        """The bounds as the error states them: ">= 1", "> 0 and <= 1"."""
        parts = [f">= {self.low}"] if self.low is not None else []
        parts += [f"> {self.above}"] if self.above is not None else []
        parts += [f"<= {self.high}"] if self.high is not None else []
        return " and ".join(parts)


def bounded(
    kind: type[int] | type[float], *, min: float | None = None, max: float | None = None, above: float | None = None
) -> Bounded:
    """The argparse type of a number flag with a range: `min` and `max` allowed, `above` itself not."""
    return Bounded(kind, low=min, above=above, high=max)


# The argparse type of every image-size flag.
IMAGE_SIDE = bounded(int, min=1, max=MAX_IMAGE_SIDE)


@dataclass(frozen=True)
class CommaList:
    """An argparse type: 'a,b,c' as a list of `item` values (each read and checked by `item`, and one of `choices`
    when given). `distinct_sorted`: each value once, in the order of `choices` (ascending without them); `empty`:
    what an empty text stands for (refused when None)."""

    item: Callable[[str], Any]
    choices: tuple | None = None
    distinct_sorted: bool = False
    empty: tuple | None = None

    def __call__(self, text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            if self.empty is None:
                raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
            return list(self.empty)
        values = []
        for part in parts:
            try:
                values.append(self.item(part))
            except ValueError:
                name = getattr(self.item, "__name__", "")
                raise argparse.ArgumentTypeError(f"invalid {name} value: {part!r}") from None
        if self.choices is not None:
            unknown = [value for value in values if value not in self.choices]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(map(str, unknown))}; expected some of {', '.join(map(str, self.choices))}"
                )
        if self.distinct_sorted:
            return sorted(set(values), key=self.choices.index if self.choices is not None else None)
        return values


def comma_list(
    item: Callable[[str], Any],
    choices: tuple | None = None,
    *,
    distinct_sorted: bool = False,
    empty: tuple | None = None,
) -> CommaList:
    """The argparse type of a flag that takes a comma-separated list (see `CommaList`)."""
    return CommaList(item, choices, distinct_sorted, empty)


# --model of the commands that load one checkpoint: without it, the model the checkpoint records (`load_model`).
RECORDED_MODEL_HELP = (
    f"model name (see `sequencer summary`; default: the one the --checkpoint records, else {DEFAULT_MODEL})"
)


def add_model_options(
    parser: argparse.ArgumentParser,
    default_model: str | None = DEFAULT_MODEL,
    model_help: str = "model name (see `sequencer summary`)",
    checkpoint_help: str = "weights file (.pth, .pth.tar, .safetensors)",
) -> None:
    """--model, --checkpoint / --pretrained, --num-classes, --in-chans."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, help=model_help)
    group.add_argument("--checkpoint", default="", help=checkpoint_help)
    group.add_argument(
        "--num-classes", type=bounded(int, min=1), default=None, help="classes of the head (default: the data's)"
    )
    group.add_argument("--in-chans", type=bounded(int, min=1), default=3, help="input channels")
    group.add_argument("--use-ema", action="store_true", help="load the EMA weights of a training checkpoint")
    group.add_argument(
        "--unsafe-load",
        action="store_true",
        help="read checkpoints that hold Python objects besides tensors with full pickle: this runs code from the "
        "file, so only for files you trust (safetensors and plain tensor checkpoints never need it)",
    )


DATASET_HELP = (
    "torch/cifar10, torch/cifar100, torch/flowers102, torch/stanford_cars or torch/oxford_iiit_pet, read from "
    "--data-dir (default: a class-folder tree). Splits: train -> Flowers train, Cars train, Pets trainval; "
    "val/validation -> Flowers val, Cars test, Pets test; test -> each one's test split. Streamed through timm "
    '(pip install "sequencer[streaming]"): wds/NAME, WebDataset shards in --data-dir, each split a shard pattern '
    "('train-{000000..000127}.tar|N', N its images) or a split of --data-dir's _info.json; hfds/NAME and "
    "hfids/NAME (streamed), a Hugging Face dataset by Hub name or local folder, --data-dir its cache"
)


def add_dataset_options(parser: argparse.ArgumentParser, data_help: str) -> argparse._ArgumentGroup:
    """DATA, --data-dir, --dataset/-d, --dataset-download, as timm's scripts; returns the group for the splits."""
    group = parser.add_argument_group("data")
    group.add_argument("data", nargs="?", default=None, metavar="DATA", help=data_help)
    group.add_argument("--data-dir", default=None, help="dataset root (alternative to DATA; where torch/* data live)")
    group.add_argument("--dataset", "-d", default="", help=DATASET_HELP)
    group.add_argument("--dataset-download", action="store_true", help="download torch/* datasets when missing")
    return group


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """--img-size, --input-size, --crop-pct, --mean, --std, --interpolation (default: the model's config)."""
    group = parser.add_argument_group("input")
    group.add_argument(
        "--img-size",
        type=IMAGE_SIDE,
        default=None,
        help="square input size (default: the model's, 224 for the paper's variants)",
    )
    group.add_argument(
        "--input-size",
        type=IMAGE_SIDE,
        nargs=3,
        default=None,
        metavar=("C", "H", "W"),
        help="input size C H W (overrides --img-size; default: the model's)",
    )
    group.add_argument(
        "--crop-pct",
        type=bounded(float, above=0, max=1),
        default=None,
        help="centre-crop fraction for evaluation (default: the model's, 0.875)",
    )
    group.add_argument(
        "--mean", type=float, nargs="+", default=None, help="normalisation mean (default: the model's, ImageNet's)"
    )
    group.add_argument(
        "--std",
        type=bounded(float, above=0),
        nargs="+",
        default=None,
        help="normalisation std (default: the model's, ImageNet's)",
    )
    group.add_argument(
        "--interpolation",
        default="",
        choices=INTERPOLATIONS,
        help="resize interpolation (default: the model's, bicubic)",
    )


def check_input_flags(args: argparse.Namespace) -> None:
    """Refuse --mean / --std whose length is neither 1 nor the input's channels, before any work."""
    channels = args.input_size[0] if getattr(args, "input_size", None) else getattr(args, "in_chans", None) or 3
    for flag in ("mean", "std"):
        values = getattr(args, flag, None)
        if values and len(values) not in (1, channels):
            raise UsageError(f"--{flag} takes 1 or {channels} values (one per input channel), got {len(values)}")


def input_overrides(args: argparse.Namespace, *exclude: str) -> dict[str, Any]:
    """The preprocessing flags of `add_input_options` as `data_config` / `create_transform` overrides."""
    return {key: getattr(args, key) for key in INPUT_KEYS if key not in exclude}


def add_runtime_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--device, --amp, --amp-dtype, -b, -j, --threads; returns the group for a command's own runtime flags."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    group.add_argument(
        "--amp",
        "--native-amp",
        dest="amp",
        action="store_true",
        help="automatic mixed precision (float16 on GPU, bfloat16 on CPU)",
    )
    group.add_argument("--amp-dtype", default=None, choices=AMP_DTYPES, help="override the AMP dtype")
    group.add_argument("-b", "--batch-size", type=bounded(int, min=1), default=32, help="batch size (per process)")
    group.add_argument("-j", "--workers", type=bounded(int, min=0), default=2, help="data-loading worker processes")
    group.add_argument("--threads", type=bounded(int, min=1), default=None, help="torch CPU threads")
    return group


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


def writable_path(text: str, kind: str) -> str:
    """`text` if a `kind` ("file", "folder" or "stem") can be written there, else an argparse error saying why.

    Checked before any work, so that a run does not end by failing to save what it computed."""
    if not text:
        return text
    path = Path(text).absolute()
    if kind == "file" and path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name a file")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: name a folder")
    existing = next(parent for parent in [path, *path.parents] if parent.exists())
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {existing} is a file")
    probe = existing if existing.is_dir() else existing.parent
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {probe} is not writable ({error.strerror})") from None
    return text


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    """--torchcompile [BACKEND], as in timm's scripts."""
    group = parser.add_argument_group("compilation")
    group.add_argument(
        "--torchcompile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="run the model through torch.compile (backend: inductor unless named)",
    )


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
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read --config {path}: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of option names to values")
    values = {key: value for key, value in values.items() if key not in ("command", "config")}
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f"--config {path} sets options this command does not have: {', '.join(unknown[:8])}")
    try:
        checked = {key: as_parsed(parser, actions[key], value) for key, value in values.items()}
    except argparse.ArgumentError as error:
        raise UsageError(f"--config {path}: {error}") from None
    parser.set_defaults(**checked)


def as_parsed(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """`value` for `action`, from a config file or a keyword argument, as the command line would give it: as many
    values as the flag takes, each read and checked by its type (argparse runs none on a default that is not a
    string) and one of its choices unless it is the default; an `argparse.ArgumentError` naming the flag otherwise."""
    if value is None:
        return value
    given = value
    if isinstance(value, os.PathLike | tuple):
        value = os.fspath(value) if isinstance(value, os.PathLike) else list(value)
    if action.nargs == 0:  # an on/off flag: --amp, --pretrained, ...
        if not isinstance(value, bool):
            raise argparse.ArgumentError(action, f"expected true or false, not {given!r}")
        return value
    if action.nargs not in (None, "?"):  # a flag that takes several words: 2, 3, or + of them
        count = action.nargs if isinstance(action.nargs, int) else None
        if not isinstance(value, list) or (len(value) != count if count else not value):
            raise argparse.ArgumentError(action, f"expected {count or 'one or more'} values, not {given!r}")
        value = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in value]
    if action.type is not None:
        if isinstance(value, list) and action.nargs is None:  # one word on the command line: a comma list
            value = parser._get_value(action, ",".join(map(str, value)))
        elif isinstance(value, list):
            value = [parser._get_value(action, str(item)) for item in value]
        else:
            value = parser._get_value(action, str(value))
    if action.choices is not None and value != action.default:
        for item in value if isinstance(value, list) else [value]:
            parser._check_value(action, item)
    return value


def flag_values(function: Callable[..., Any], args: argparse.Namespace, **given: Any) -> dict[str, Any]:
    """The keyword arguments of library `function` that the parsed flags hold under the same names, plus `given`:
    what a command's `run(args)` passes on, so that a flag reaches its parameter without being named twice."""
    names = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return {**{name: getattr(args, name) for name in names if hasattr(args, name)}, **given}
