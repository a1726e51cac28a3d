"""Option groups shared by the subcommands, so each flag is defined once, and the checks their values get before
any command runs: ranges (`BOUNDS`), names (argparse choices) and writable outputs (`writable_path`)."""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path
from typing import Any

from sequencer.errors import UsageError

# timm's interpolation names; training also takes "random" (bilinear or bicubic per image).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

# Option (its dest) -> (lowest value, whether the lowest itself is allowed, highest or None), for every command that
# has the option: `check_bounds` refuses any other value before the command starts. Lists are checked item by item.
BOUNDS: dict[str, tuple[float, bool, float | None]] = {
    # shared options
    "batch_size": (1, True, None),
    "workers": (0, True, None),
    "threads": (1, True, None),
    "num_classes": (1, True, None),
    "in_chans": (1, True, None),
    "img_size": (1, True, None),
    "input_size": (1, True, None),
    "crop_pct": (0, False, 1),
    "std": (0, False, None),
    # train
    "validation_batch_size": (1, True, None),
    "epochs": (1, True, None),
    "lr": (0, True, None),  # 0 is legitimate: a run that only checks loading or evaluates
    "lr_base": (0, True, None),
    "lr_base_size": (1, True, None),
    "warmup_lr": (0, True, None),
    "min_lr": (0, True, None),
    "warmup_epochs": (0, True, None),
    "cooldown_epochs": (0, True, None),
    "weight_decay": (0, True, None),
    "momentum": (0, True, 1),
    "clip_grad": (0, False, None),
    "drop": (0, True, 1),
    "drop_path": (0, True, 1),
    "smoothing": (0, True, 1),
    "scale": (0, False, 1),
    "ratio": (0, False, None),
    "hflip": (0, True, 1),
    "vflip": (0, True, 1),
    "reprob": (0, True, 1),
    "recount": (1, True, None),
    "mixup": (0, True, None),
    "cutmix": (0, True, None),
    "cutmix_minmax": (0, False, 1),
    "mixup_prob": (0, True, 1),
    "mixup_switch_prob": (0, True, 1),
    "model_ema_decay": (0, True, 1),
    "checkpoint_hist": (0, True, None),
    "log_interval": (1, True, None),
    # predict, export, average, bench and the analyses
    "topk": (1, True, None),
    "tolerance": (0, True, None),
    "num": (1, True, None),
    "repeats": (1, True, None),
    "warmup": (0, True, None),
    "num_images": (1, True, None),
    "limit": (1, True, None),
}


def check_bounds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Raise a UsageError naming the flag for the first value outside `BOUNDS` among the options `parser` has."""
    for action in parser._actions:
        if action.dest not in BOUNDS or getattr(args, action.dest, None) is None:
            continue
        low, low_allowed, high = BOUNDS[action.dest]
        value = getattr(args, action.dest)
        for item in value if isinstance(value, list | tuple) else [value]:
            if item < low or (item == low and not low_allowed) or (high is not None and item > high):
                flag = "/".join(action.option_strings)
                shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
                limits = f"{'>=' if low_allowed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
                raise UsageError(f"{flag} {shown} is out of range: it must be {limits}")


def add_model_options(
    parser: argparse.ArgumentParser,
    default_model: str | None = "sequencer2d_s",
    model_help: str = "model name (see `sequencer summary`)",
    checkpoint_help: str = "weights file (.pth, .pth.tar, .safetensors)",
) -> None:
    """--model, --checkpoint / --pretrained, --num-classes, --in-chans."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, help=model_help)
    group.add_argument("--checkpoint", default="", help=checkpoint_help)
    group.add_argument("--num-classes", type=int, default=None, help="classes of the head (default: the data's)")
    group.add_argument("--in-chans", type=int, default=3, help="input channels")
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
        type=int,
        default=None,
        help="square input size (default: the model's, 224 for the paper's variants)",
    )
    group.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("C", "H", "W"),
        help="input size C H W (overrides --img-size; default: the model's)",
    )
    group.add_argument(
        "--crop-pct", type=float, default=None, help="centre-crop fraction for evaluation (default: the model's, 0.875)"
    )
    group.add_argument(
        "--mean", type=float, nargs="+", default=None, help="normalisation mean (default: the model's, ImageNet's)"
    )
    group.add_argument(
        "--std", type=float, nargs="+", default=None, help="normalisation std (default: the model's, ImageNet's)"
    )
    group.add_argument(
        "--interpolation",
        default="",
        choices=INTERPOLATIONS,
        help="resize interpolation (default: the model's, bicubic)",
    )


INPUT_KEYS = ("input_size", "img_size", "crop_pct", "mean", "std", "interpolation")


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
    group.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"], help="override the AMP dtype")
    group.add_argument("-b", "--batch-size", type=int, default=32, help="batch size (per process)")
    group.add_argument("-j", "--workers", type=int, default=2, help="data-loading worker processes")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
    unknown = sorted(set(values) - {action.dest for action in parser._actions})
    if unknown:
        raise UsageError(f"--config {path} sets options this command does not have: {', '.join(unknown[:8])}")
    parser.set_defaults(**values)
