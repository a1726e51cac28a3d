"""The flags as data: each flag a field of a frozen config dataclass (`option`, `switch` for on/off flags, or a
`FlagGroup`'s, which names its argparse group once), with its default, type, range and help once; the parsers are built
from these fields (`add_fields`) and a value given from Python is checked by the same types (`FlagFields`). The groups
several commands share live here (`DatasetSource`, `ModelSource`, `InputOverrides`, `Runtime`, `Compilation`), beside
the argparse types that check a value: ranges (`bounded`, and those many flags share: `PROBABILITY`, `POSITIVE_INT`,
...), comma lists (`comma_list`) and writable outputs (`writable_path`).

Standard library only: the library reads its defaults here, and building a parser must not import torch.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sequencer.choices import AMP_DTYPES, DEFAULT_MODEL, INPUT_KEYS, INTERPOLATIONS, MAX_IMAGE_SIDE
from sequencer.errors import UsageError
from sequencer.files import plain


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


# The argparse types of the ranges many flags share (`bounded` writes a one-off range where it is used).
PROBABILITY = bounded(float, min=0, max=1)  # 0 to 1: a probability, a rate, a momentum
FRACTION = bounded(float, above=0, max=1)  # above 0, up to 1: a crop or area fraction
NON_NEGATIVE = bounded(float, min=0)
POSITIVE = bounded(float, above=0)
POSITIVE_INT = bounded(int, min=1)
COUNT = bounded(int, min=0)  # an int >= 0: workers, epochs, intervals where 0 is off
IMAGE_SIDE = bounded(int, min=1, max=MAX_IMAGE_SIDE)  # every image-size flag


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


def option(*flags: str, default: Any = None, group: str = "", **argparse_kwargs: Any) -> Any:
    """A config field that is also a flag: its default, once, and the `add_argument` arguments that read its text."""
    return field(default=default, metadata={"flags": flags, "group": group, "argparse": argparse_kwargs})


def switch(*flags: str, group: str = "", help: str) -> Any:
    """An on/off config field: a flag that takes no value, off (False) unless given."""
    return option(*flags, default=False, group=group, action="store_true", help=help)


@dataclass(frozen=True)
class FlagGroup:
    """The argparse group `title`, so that its fields do not repeat it: `DATA.option(...)`, `DATA.switch(...)`."""

    title: str

    def option(self, *flags: str, default: Any = None, **argparse_kwargs: Any) -> Any:
        return option(*flags, default=default, group=self.title, **argparse_kwargs)

    def switch(self, *flags: str, help: str) -> Any:
        return switch(*flags, group=self.title, help=help)


# The groups the commands share (train adds its own).
DATA, MODEL, INPUT = FlagGroup("data"), FlagGroup("model"), FlagGroup("input")
RUNTIME, COMPILATION = FlagGroup("runtime"), FlagGroup("compilation")


def add_fields(
    parser: argparse.ArgumentParser,
    config: type,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> dict[str, argparse._ArgumentGroup]:
    """A flag for each field of the dataclass `config`, in argparse groups by the fields' `group`; a command may give
    some its own default or help. Returns the groups by title, for a command's own flags."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for item in fields(config):
        if "flags" not in item.metadata:
            continue
        title, flags = item.metadata["group"], item.metadata["flags"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        kwargs = {**item.metadata["argparse"], "default": (defaults or {}).get(item.name, item.default)}
        if helps and item.name in helps:
            kwargs["help"] = helps[item.name]
        if flags[0].startswith("-"):
            kwargs["dest"] = item.name
        groups[title].add_argument(*flags, **kwargs)
    return groups


@functools.cache
def parser_of(config: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add_fields(parser, config)
    return parser


class FlagFields:
    """Base of the frozen config dataclasses whose fields are flags: a value given from Python is read and checked by
    its flag's type, count and choices as the command line's text is, and refused with the same `UsageError`."""

    def __post_init__(self) -> None:
        parser = parser_of(type(self))
        actions = {action.dest: action for action in parser._actions}
        for item in fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if item.name not in actions or value is None or value == item.default:
                continue
            try:
                value = as_parsed(parser, actions[item.name], value)
            except argparse.ArgumentError as error:
                raise UsageError(f"{type(self).__name__}({item.name}={getattr(self, item.name)!r}): {error}") from None
            object.__setattr__(self, item.name, tuple(value) if isinstance(value, list) else value)

    def as_dict(self) -> dict[str, Any]:
        """The fields as YAML/JSON-safe values (tuples as lists): what args.yaml and a checkpoint's `args` hold."""
        return {item.name: plain(getattr(self, item.name)) for item in fields(self)}  # type: ignore[arg-type]


DATASET_HELP = (
    "torch/cifar10, torch/cifar100, torch/flowers102, torch/stanford_cars or torch/oxford_iiit_pet, read from "
    "--data-dir (default: a class-folder tree). Splits: train -> Flowers train, Cars train, Pets trainval; "
    "val/validation -> Flowers val, Cars test, Pets test; test -> each one's test split. Streamed through timm "
    '(pip install "sequencer[streaming]"): wds/NAME, WebDataset shards in --data-dir, each split a shard pattern '
    "('train-{000000..000127}.tar|N', N its images) or a split of --data-dir's _info.json; hfds/NAME and "
    "hfids/NAME (streamed), a Hugging Face dataset by Hub name or local folder, --data-dir its cache"
)


@dataclass(frozen=True)
class DatasetSource(FlagFields):
    """DATA, --data-dir, --dataset/-d, --dataset-download, as timm's scripts."""

    data: str | None = DATA.option("data", nargs="?", metavar="DATA", help="dataset root")
    data_dir: str | None = DATA.option("--data-dir", help="dataset root (alternative to DATA; where torch/* data live)")
    dataset: str = DATA.option("--dataset", "-d", default="", help=DATASET_HELP)
    dataset_download: bool = DATA.switch("--dataset-download", help="download torch/* datasets when missing")


# --model of the commands that load one checkpoint: without it, the model the checkpoint records (`load_model`).
RECORDED_MODEL_HELP = (
    f"model name (see `sequencer summary`; default: the one the --checkpoint records, else {DEFAULT_MODEL})"
)


@dataclass(frozen=True)
class ModelSource(FlagFields):
    """--model, --checkpoint, --num-classes, --in-chans, --use-ema, --unsafe-load."""

    model: str | None = MODEL.option("--model", default=DEFAULT_MODEL, help="model name (see `sequencer summary`)")
    checkpoint: str = MODEL.option("--checkpoint", default="", help="weights file (.pth, .pth.tar, .safetensors)")
    num_classes: int | None = MODEL.option(
        "--num-classes", type=POSITIVE_INT, help="classes of the head (default: the data's)"
    )
    in_chans: int = MODEL.option("--in-chans", default=3, type=POSITIVE_INT, help="input channels")
    use_ema: bool = MODEL.switch("--use-ema", help="load the EMA weights of a training checkpoint")
    unsafe_load: bool = MODEL.switch(
        "--unsafe-load",
        help="read checkpoints that hold Python objects besides tensors with full pickle: this runs code from the "
        "file, so only for files you trust (safetensors and plain tensor checkpoints never need it)",
    )


@dataclass(frozen=True)
class RecordedModelSource(ModelSource):
    """`ModelSource` of the commands that load one checkpoint: --model and --in-chans default to what it records."""

    model: str | None = MODEL.option("--model", help=RECORDED_MODEL_HELP)
    in_chans: int | None = MODEL.option(
        "--in-chans", type=POSITIVE_INT, help="input channels (default: those the --checkpoint records, else 3)"
    )


@dataclass(frozen=True)
class InputOverrides(FlagFields):
    """--img-size, --input-size, --crop-pct, --mean, --std, --interpolation (default: the model's config)."""

    img_size: int | None = INPUT.option(
        "--img-size", type=IMAGE_SIDE, help="square input size (default: the model's, 224 for the paper's variants)"
    )
    input_size: tuple[int, int, int] | None = INPUT.option(
        "--input-size",
        type=IMAGE_SIDE,
        nargs=3,
        metavar=("C", "H", "W"),
        help="input size C H W (overrides --img-size; default: the model's)",
    )
    crop_pct: float | None = INPUT.option(
        "--crop-pct", type=FRACTION, help="centre-crop fraction for evaluation (default: the model's, 0.875)"
    )
    mean: tuple[float, ...] | None = INPUT.option(
        "--mean", type=float, nargs="+", help="normalisation mean (default: the model's, ImageNet's)"
    )
    std: tuple[float, ...] | None = INPUT.option(
        "--std", type=POSITIVE, nargs="+", help="normalisation std (default: the model's, ImageNet's)"
    )
    interpolation: str = INPUT.option(
        "--interpolation",
        default="",
        choices=INTERPOLATIONS,
        help="resize interpolation (default: the model's, bicubic)",
    )


def image_mode(channels: int, input_img_mode: str | None = None) -> str:
    """The PIL mode images are read in: `input_img_mode`, else timm's for the input's channels (RGB for 3, else L)."""
    return input_img_mode or ("RGB" if channels == 3 else "L")


@dataclass(frozen=True)
class ImageInputOverrides(InputOverrides):
    """`InputOverrides` of the commands that read image files, and --input-img-mode, the mode they are read in."""

    input_img_mode: str | None = INPUT.option(
        "--input-img-mode",
        help="PIL mode images are read in (default: RGB for 3 input channels, else L), e.g. L with --in-chans 1",
    )


@dataclass(frozen=True)
class Runtime(FlagFields):
    """--device, --amp, --amp-dtype, -b, -j, --threads."""

    device: str | None = RUNTIME.option("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    amp: bool = RUNTIME.switch(
        "--amp", "--native-amp", help="automatic mixed precision (float16 on GPU, bfloat16 on CPU)"
    )
    amp_dtype: str | None = RUNTIME.option("--amp-dtype", choices=AMP_DTYPES, help="override the AMP dtype")
    batch_size: int | None = RUNTIME.option(
        "-b", "--batch-size", default=32, type=POSITIVE_INT, help="batch size (per process)"
    )
    workers: int | None = RUNTIME.option("-j", "--workers", default=2, type=COUNT, help="data-loading worker processes")
    threads: int | None = RUNTIME.option("--threads", type=POSITIVE_INT, help="torch CPU threads")


@dataclass(frozen=True)
class Compilation(FlagFields):
    """--torchcompile [BACKEND], as in timm's scripts."""

    torchcompile: str | None = COMPILATION.option(
        "--torchcompile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="run the model through torch.compile (backend: inductor unless named)",
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


class KeyValues(argparse.Action):
    """timm's `--model-kwargs a=1 b=x`: the words as a dict, each value a Python literal where it reads as one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, *_: Any) -> None:
        setattr(namespace, self.dest, read_key_values(values, self))


def read_key_values(words: Any, action: argparse.Action) -> dict[str, Any]:
    """`key=value` words (or a mapping, from a config file or Python) as a dict of literals."""
    import ast

    if isinstance(words, dict):
        words = [f"{key}={value!r}" for key, value in words.items()]
    result = {}
    for word in words:
        key, sep, text = str(word).partition("=")
        if not sep or not key.isidentifier():
            raise argparse.ArgumentError(action, f"expected key=value words, not {word!r}")
        try:
            result[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            result[key] = text  # a bare word: a string, as timm's ParseKwargs reads it
    return result


def as_parsed(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """`value` for `action`, from a config file or a keyword argument, as the command line would give it: as many
    values as the flag takes, each read and checked by its type (argparse runs none on a default that is not a
    string) and one of its choices unless it is the default; an `argparse.ArgumentError` naming the flag otherwise."""
    if value is None:
        return value
    if isinstance(action, KeyValues):
        return read_key_values(value if isinstance(value, dict | list | tuple) else [value], action)
    if value in ([], ()) and action.nargs in ("*", "+") and not action.default:
        return []  # none given: how timm's args.yaml writes an empty list flag (--wandb-tags)
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


# What timm's train.py writes into args.yaml for its NaFlex and distillation options, which Sequencer does not have:
# read back at these values they are left out; set otherwise, refused.
TIMM_ONLY_DEFAULTS: dict[str, Any] = {
    "naflex_loader": False,
    "naflex_train_seq_lens": [128, 256, 576, 784, 1024],
    "naflex_max_seq_len": 576,
    "naflex_patch_sizes": None,
    "naflex_patch_size_probs": None,
    "naflex_loss_scale": "linear",
    "kd_model_name": None,
    "kd_distill_type": "logit",
    "kd_loss_type": "kl",
    "distill_loss_weight": None,
    "task_loss_weight": None,
    "kd_temperature": 4.0,
    "kd_student_feature_dim": None,
    "kd_teacher_feature_dim": None,
    "kd_token_distill_type": "soft",
}


def option_names(actions: list[argparse.Action]) -> dict[str, str]:
    """Each name a config file may give an option (its dest, or any of its flags spelt as a dest: timm's args.yaml
    says initial_checkpoint for our checkpoint) -> its dest."""
    names = {}
    for action in actions:
        for flag in action.option_strings:
            names[flag.lstrip("-").replace("-", "_")] = action.dest
        names[action.dest] = action.dest
    return names


def read_config_file(path: str, names: dict[str, str]) -> dict[str, Any]:
    """The options a YAML file sets (a run's args.yaml, timm's too) by dest; refused in one line unless `names`
    (`option_names`) has them all. A null sets nothing: the option keeps its default."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read --config {path}: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of option names to values")
    values = {
        key: value
        for key, value in values.items()
        if key not in ("command", "config") and not (key in TIMM_ONLY_DEFAULTS and TIMM_ONLY_DEFAULTS[key] == value)
    }
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UsageError(f"--config {path} sets options this command does not have: {', '.join(unknown[:8])}")
    # timm's args.yaml writes null for "the model's default" (in_chans, drop_path ...), whose default here is a value:
    # null taken as a value would reach the model, or a check, as None.
    return {names[key]: value for key, value in values.items() if value is not None}


def takes_groups(**groups: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A library function that takes flag groups (`source=ModelSource`, ...) as their fields, keyword by keyword.

    Its signature lists each group's fields with the group's defaults (written once, in the group, which the
    command's parser is built from too); a call builds the groups from the keywords, so that a bad value from Python
    is refused with the one-line `UsageError` the command line gives, and passes them to the function."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(function).parameters.values() if p.name not in groups]
        members = {item.name: name for name, group in groups.items() for item in fields(group)}
        flags = [
            inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=item.type)
            for group in groups.values()
            for item in fields(group)
        ]

        @functools.wraps(function)
        def call(**keywords: Any) -> Any:
            unknown = sorted(set(keywords) - members.keys() - {p.name for p in own})
            if unknown:
                raise TypeError(f"{function.__name__}() got an unexpected keyword argument {unknown[0]!r}")
            given = {name: {} for name in groups}
            for key in [key for key in keywords if key in members]:
                given[members[key]][key] = keywords.pop(key)
            return function(**keywords, **{name: group(**given[name]) for name, group in groups.items()})

        returns = inspect.signature(function).return_annotation
        call.__signature__ = inspect.Signature([*own, *flags], return_annotation=returns)  # type: ignore[attr-defined]
        return call

    return decorate


def check_normalization(mean: Any, std: Any, channels: int) -> None:
    """Refuse a --mean or --std whose length is neither 1 nor the input's `channels`."""
    for flag, values in (("mean", mean), ("std", std)):
        if values and len(values) not in (1, channels):
            raise UsageError(f"--{flag} takes 1 or {channels} values (one per input channel), got {len(values)}")


def input_overrides(args: argparse.Namespace, *exclude: str) -> dict[str, Any]:
    """The preprocessing flags of `add_input_options` as `data_config` / `create_transform` overrides."""
    return {key: getattr(args, key) for key in INPUT_KEYS if key not in exclude}


def flag_values(function: Callable[..., Any], args: argparse.Namespace, **given: Any) -> dict[str, Any]:
    """The keyword arguments of library `function` that the parsed flags hold under the same names, plus `given`:
    what a command's `run(args)` passes on, so that a flag reaches its parameter without being named twice."""
    names = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return {**{name: getattr(args, name) for name in names if hasattr(args, name)}, **given}
