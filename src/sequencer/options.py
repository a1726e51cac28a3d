"""Option groups shared by the subcommands, so each flag is defined once."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_options(parser: argparse.ArgumentParser, default_model: str = "sequencer2d_s") -> None:
    """--model, --checkpoint / --pretrained, --num-classes, --in-chans."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, help="model name (see `sequencer summary`)")
    group.add_argument("--checkpoint", default="", help="weights file (.pth, .pth.tar, .safetensors)")
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
    "val/validation -> Flowers val, Cars test, Pets test; test -> each one's test split"
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
        help="resize interpolation: bicubic, bilinear, ... (default: the model's, bicubic)",
    )


INPUT_KEYS = ("input_size", "img_size", "crop_pct", "mean", "std", "interpolation")


def input_overrides(args: argparse.Namespace, *exclude: str) -> dict[str, Any]:
    """The preprocessing flags of `add_input_options` as `data_config` / `create_transform` overrides."""
    return {key: getattr(args, key) for key in INPUT_KEYS if key not in exclude}


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--device, --amp, --amp-dtype, -b, -j, --threads."""
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


def add_output_option(
    parser: argparse.ArgumentParser, default: str | None, help: str, *aliases: str, required: bool = False
) -> None:
    """-o/--output, the one spelling of every subcommand's output (a file, a folder or a file stem, as `help` says);
    `aliases` keep the spelling timm's scripts or earlier versions used."""
    parser.add_argument(
        "-o", "--output", *aliases, dest="output", default=default, required=required, metavar="PATH", help=help
    )


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
