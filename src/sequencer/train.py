"""Train or fine-tune a Sequencer with timm's train.py flags and the paper's recipes, alone or under torchrun.

With no DATA argument it trains `sequencer2d_tiny` on scikit-learn's handwritten digits (built in, no download) and
prints the held-out top-1. Everything lands in --output: args.yaml, summary.csv, last.pth.tar (every epoch),
model_best.pth.tar, the --checkpoint-hist best checkpoint-EPOCH.pth.tar and training_curves.png;
`--resume OUTPUT/last.pth.tar` continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sequencer.average import EPOCH_CHECKPOINT
from sequencer.checkpoint import atomic_save, load_pretrained, read_file
from sequencer.data import DATASET_HELP, DIGITS_NAMES, build_dataset, create_loader, create_transform, data_config
from sequencer.distributed import (
    DistributedContext,
    all_reduce_mean,
    cleanup_distributed,
    init_distributed,
    on_every_rank,
)
from sequencer.errors import CheckpointError, UsageError
from sequencer.hub import released_weights
from sequencer.model import VARIANTS, check_model_name, create_model
from sequencer.options import (
    add_compile_options,
    add_input_options,
    add_model_options,
    add_output_option,
    add_runtime_options,
    input_overrides,
)
from sequencer.plotting import plot_training_curves
from sequencer.runtime import amp_dtype, autocast, compile_model, set_threads
from sequencer.validate import evaluate

_logger = logging.getLogger(__name__)

# timm's create_scheduler_v2 names ("none" trains at a constant rate).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "none")
SUMMARY_FIELDS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
CURVES_FILE = "training_curves.png"

# Flags whose default depends on the data. With no DATA the run is the built-in digits demo (>= 98% held-out top-1 in
# well under 90 s on two CPU cores, see BENCHMARKS.md); with real data the defaults are timm's train.py's.
# Demo choices, from trial runs: the 8x8 digits go to 16 px, not the model's 32 (3x faster and no less accurate);
# no flips (a mirrored digit is another glyph); crops keep >= 80% of the digit; one thread, because two threads on a
# machine whose other core is busy ran more than ten times slower.
DIGITS_RECIPE: dict[str, Any] = dict(
    model="sequencer2d_tiny",
    img_size=16,
    batch_size=64,
    workers=0,
    epochs=25,
    opt="adamw",
    lr=3e-3,
    weight_decay=0.05,
    warmup_epochs=1,
    warmup_lr=1e-4,
    sched_on_updates=True,
    hflip=0.0,
    scale=(0.8, 1.0),
    color_jitter=0.0,
    train_interpolation="bicubic",
    threads=1,
)
TIMM_RECIPE: dict[str, Any] = dict(
    model="sequencer2d_s",
    img_size=None,
    batch_size=128,
    workers=2,
    epochs=300,
    opt="sgd",
    lr=None,
    weight_decay=2e-5,
    warmup_epochs=5,
    warmup_lr=1e-5,
    sched_on_updates=False,
    hflip=0.5,
    scale=(0.08, 1.0),
    color_jitter=0.4,
    train_interpolation="random",
    threads=None,
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def _recipe_help(key: str) -> str:
    return f" (default: {TIMM_RECIPE[key]}; digits demo: {DIGITS_RECIPE[key]})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """timm's train.py flags (those the paper's recipes and this trainer use), with timm's meanings."""
    demo = ", ".join(f"{k}={v}" for k, v in DIGITS_RECIPE.items())
    parser.epilog = (
        f"Without DATA (the digits demo) the defaults are {demo}; with data, timm's train.py defaults apply "
        f"(model {TIMM_RECIPE['model']}, batch {TIMM_RECIPE['batch_size']}). Multi-GPU or multi-node: "
        "torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m sequencer train ..."
    )
    parser.add_argument(
        "-c",
        "--config",
        default="",
        metavar="YAML",
        help="take the flags from this file (a run's args.yaml, as timm's train.py writes); the command line wins",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "data",
        nargs="?",
        default=None,
        metavar="DATA",
        help="dataset root with train/<class>/* and val/<class>/*; none: the built-in digits demo",
    )
    data.add_argument("--data-dir", default=None, help="dataset root (alternative to DATA; where torch/* data live)")
    data.add_argument("--dataset", "-d", default="", help=DATASET_HELP)
    data.add_argument("--train-split", default="train", help="training split")
    data.add_argument("--val-split", default="validation", help="held-out split (val/ or validation/ folder)")
    data.add_argument("--dataset-download", action="store_true", help="download torch/* datasets when missing")

    add_model_options(parser, default_model=None)
    model = parser.add_argument_group("model (training)")
    model.add_argument(
        "--initial-checkpoint",
        dest="checkpoint",
        help="start from these weights (same as --checkpoint); a head of another size is re-initialised",
    )
    model.add_argument("--pretrained", action="store_true", help="start from the released ImageNet weights")
    model.add_argument("--resume", default="", help="continue a run from its last.pth.tar (epoch, optimizer, EMA...)")
    model.add_argument("--no-resume-opt", action="store_true", help="with --resume, do not restore optimizer state")
    model.add_argument("--start-epoch", type=int, default=None, help="epoch to start at (default: 0 or resumed)")
    model.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    model.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (linear over blocks)")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    add_input_options(parser)
    add_runtime_options(parser)
    add_compile_options(parser)
    parser.set_defaults(batch_size=None, workers=None)
    parser.add_argument("-vb", "--validation-batch-size", type=int, default=None, help="default: --batch-size")

    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--opt", default=None, help="timm optimizer name: adamw, sgd, lamb, ..." + _recipe_help("opt"))
    opt.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    opt.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    opt.add_argument("--weight-decay", type=float, default=None, help="weight decay" + _recipe_help("weight_decay"))
    opt.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this norm (value, agc)")
    opt.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"], help="gradient clipping mode")
    opt.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning-rate decay")

    sched = parser.add_argument_group("learning-rate schedule")
    sched.add_argument("--sched", default="cosine", help="timm scheduler: cosine, step, multistep, poly, none, ...")
    sched.add_argument(
        "--sched-on-updates",
        action="store_true",
        default=None,
        help="step the schedule every update, not every epoch" + _recipe_help("sched_on_updates"),
    )
    sched.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (default: --lr-base scaled by the global batch; digits demo: {DIGITS_RECIPE['lr']})",
    )
    sched.add_argument("--lr-base", type=float, default=0.1, help="learning rate at --lr-base-size images per step")
    sched.add_argument("--lr-base-size", type=int, default=256, help="global batch size of --lr-base")
    sched.add_argument(
        "--lr-base-scale",
        default="",
        choices=["", "linear", "sqrt"],
        help="scaling rule of --lr-base (default: sqrt for adaptive optimizers, else linear)",
    )
    sched.add_argument(
        "--warmup-lr",
        type=float,
        default=None,
        help="learning rate at the start of warm-up" + _recipe_help("warmup_lr"),
    )
    sched.add_argument("--min-lr", type=float, default=0.0, help="floor of the schedule")
    sched.add_argument("--epochs", type=int, default=None, help="epochs of the schedule" + _recipe_help("epochs"))
    sched.add_argument(
        "--warmup-epochs", type=int, default=None, help="linear warm-up epochs" + _recipe_help("warmup_epochs")
    )
    sched.add_argument("--warmup-prefix", action="store_true", help="warm-up before, not within, --epochs")
    sched.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    sched.add_argument("--decay-epochs", type=float, default=90, help="step schedule: epochs between decays")
    sched.add_argument(
        "--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep schedule: epochs to decay at"
    )
    sched.add_argument("--decay-rate", type=float, default=0.1, help="step / multistep decay factor")

    aug = parser.add_argument_group("augmentation and regularisation (timm)")
    aug.add_argument("--no-aug", action="store_true", help="no training augmentation")
    aug.add_argument(
        "--scale", type=float, nargs=2, default=None, help="random-resized-crop area range" + _recipe_help("scale")
    )
    aug.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    aug.add_argument("--hflip", type=float, default=None, help="horizontal flip probability" + _recipe_help("hflip"))
    aug.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    aug.add_argument(
        "--color-jitter", type=float, default=None, help="colour jitter strength" + _recipe_help("color_jitter")
    )
    aug.add_argument("--aa", default=None, help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    aug.add_argument(
        "--train-interpolation",
        default=None,
        help="training resize interpolation" + _recipe_help("train_interpolation"),
    )
    aug.add_argument("--reprob", type=float, default=0.0, help="random-erasing probability")
    aug.add_argument("--remode", default="pixel", help="random-erasing mode (const, rand, pixel)")
    aug.add_argument("--recount", type=int, default=1, help="random-erasing count")
    aug.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (on when > 0)")
    aug.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (on when > 0)")
    aug.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, help="cutmix box ratio range")
    aug.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    aug.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    aug.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"], help="mixup granularity")
    aug.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0: never)")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    ema = parser.add_argument_group("model EMA")
    ema.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    ema.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    ema.add_argument("--model-ema-warmup", action="store_true", help="ramp the EMA decay up over the first steps")
    ema.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU")

    misc = parser.add_argument_group("output")
    misc.add_argument("--seed", type=int, default=42, help="random seed (per epoch and rank)")
    add_output_option(misc, "", "output folder (default: output/train/<date>-<model>-<size>)")
    misc.add_argument("--experiment", default="", help="sub-folder of --output for this run")
    misc.add_argument(
        "--eval-metric", default="top1", choices=["top1", "top5", "loss"], help="metric that picks model_best.pth.tar"
    )
    misc.add_argument(
        "--checkpoint-hist",
        type=_non_negative_int,
        default=10,
        metavar="N",
        help="keep the N best epochs as checkpoint-EPOCH.pth.tar, ranked by --eval-metric, for `sequencer average` "
        "(0: none; default: 10, as timm)",
    )
    misc.add_argument("--no-progress", action="store_true", help="no progress bar")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def resolve_arguments(args: argparse.Namespace, world_size: int = 1) -> argparse.Namespace:
    """Fill data-dependent defaults (digits demo or timm's), and the learning rate from --lr-base like timm."""
    args = argparse.Namespace(**vars(args))
    recipe = DIGITS_RECIPE if _is_digits(args) else TIMM_RECIPE
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None and args.batch_size > 0:  # a batch size < 1 is refused by check_arguments
        ratio = args.batch_size * world_size / args.lr_base_size
        scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
        args.lr = args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)
    args.validation_batch_size = args.validation_batch_size or args.batch_size
    return args


# (flag, attribute, lowest allowed, whether the lowest is allowed, highest allowed or None): checked before any work.
_BOUNDS: tuple[tuple[str, str, float, bool, float | None], ...] = (
    ("--epochs", "epochs", 1, True, None),
    ("-b/--batch-size", "batch_size", 1, True, None),
    ("-vb/--validation-batch-size", "validation_batch_size", 1, True, None),
    ("-j/--workers", "workers", 0, True, None),
    ("--num-classes", "num_classes", 1, True, None),
    ("--in-chans", "in_chans", 1, True, None),
    ("--lr", "lr", 0, True, None),  # 0 is legitimate: a run that only checks loading or evaluates
    ("--warmup-lr", "warmup_lr", 0, True, None),
    ("--min-lr", "min_lr", 0, True, None),
    ("--warmup-epochs", "warmup_epochs", 0, True, None),
    ("--cooldown-epochs", "cooldown_epochs", 0, True, None),
    ("--weight-decay", "weight_decay", 0, True, None),
    ("--clip-grad", "clip_grad", 0, False, None),
    ("--drop", "drop", 0, True, 1),
    ("--drop-path", "drop_path", 0, True, 1),
    ("--smoothing", "smoothing", 0, True, 1),
    ("--reprob", "reprob", 0, True, 1),
    ("--mixup", "mixup", 0, True, None),
    ("--cutmix", "cutmix", 0, True, None),
    ("--mixup-prob", "mixup_prob", 0, True, 1),
    ("--hflip", "hflip", 0, True, 1),
    ("--vflip", "vflip", 0, True, 1),
    ("--model-ema-decay", "model_ema_decay", 0, True, 1),
    ("--img-size", "img_size", 1, True, None),
    ("--checkpoint-hist", "checkpoint_hist", 0, True, None),
)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flags that cannot work (out of range, unknown names) with a `UsageError`, before any work starts."""
    for flag, key, low, low_allowed, high in _BOUNDS:
        value = getattr(args, key, None)
        if value is None:
            continue
        if value < low or (value == low and not low_allowed) or (high is not None and value > high):
            limits = f"{'>=' if low_allowed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise UsageError(f"{flag} {value} is out of range: it must be {limits}")
    check_model_name(args.model)
    size = args.input_size[-2:] if args.input_size else [args.img_size] * 2 if args.img_size else None
    patches = math.prod(VARIANTS[check_model_name(args.model)]["patch_sizes"])
    if size and min(size) < patches:
        raise UsageError(
            f"input size {'x'.join(map(str, size))} is smaller than the {patches}x{patches} pixels that "
            f"{args.model}'s stem and downsampling patches need"
        )
    if args.pretrained and args.checkpoint:
        raise UsageError("--pretrained and --initial-checkpoint both give starting weights; pass one")
    if args.opt.lower().removeprefix("fused") not in {o.lower() for o in list_optimizers()} and "_" not in args.opt:
        raise UsageError(f"unknown optimizer --opt {args.opt!r}; timm knows {', '.join(list_optimizers())}")
    if args.sched not in SCHEDULERS:
        raise UsageError(f"unknown schedule --sched {args.sched!r}; expected one of {', '.join(SCHEDULERS)}")


def _is_digits(args: argparse.Namespace) -> bool:
    return not (args.data or args.data_dir or args.dataset) or args.dataset.lower() in DIGITS_NAMES


def _dataset_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(name or root for build_dataset, data_dir) from DATA / --data-dir / --dataset."""
    root = args.data or args.data_dir
    return (args.dataset or root), root


def plain_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as YAML/JSON-safe values (no functions, tuples as lists), for args.yaml and checkpoints."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, str | int | float | bool | list):
            out[key] = value
    return out


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, epoch, rank), so an epoch replays exactly after a resume.

    Epoch -1 is the set-up before training (model initialisation).
    """
    state = np.random.SeedSequence([seed, rank, epoch + 1]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: NativeScaler | None
    ema: ModelEmaV3 | None
    epoch: int = 0
    num_updates: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    class_names: list[str] = field(default_factory=list)  # index -> the data's class, for predict and validate


def checkpoint_dict(state: TrainState, args: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """A training checkpoint that `load_pretrained` also reads (`state_dict` in our key format)."""
    ckpt: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "model_name": state.model.model_name,
        "num_classes": state.model.num_classes,
        "epoch": state.epoch,
        "num_updates": state.num_updates,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "optimizer": state.optimizer.state_dict(),
        "args": args,
        "history": history,
        "class_names": state.class_names,
    }
    if state.scheduler is not None:
        ckpt["scheduler"] = state.scheduler.state_dict()
    if state.scaler is not None:
        ckpt["scaler"] = state.scaler.state_dict()
    if state.ema is not None:
        ckpt["state_dict_ema"] = {k: v.detach().cpu() for k, v in state.ema.module.state_dict().items()}
    return ckpt


def restore(
    state: TrainState, path: str, restore_optimizer: bool = True, unsafe_load: bool = False
) -> list[dict[str, Any]]:
    """Load a training checkpoint into `state`; returns the summary rows recorded so far."""
    ckpt = read_file(path, unsafe_load=unsafe_load)
    if "epoch" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this trainer; use --initial-checkpoint for weights"
        )
    model = state.model
    trained = (ckpt.get("model_name"), ckpt.get("num_classes"))
    if trained != (model.model_name, model.num_classes):
        raise CheckpointError(
            f"{path} is a run of {trained[0]} with {trained[1]} classes; this run is {model.model_name} with "
            f"{model.num_classes} classes: resume with the flags of that run, or start from its weights with "
            "--initial-checkpoint"
        )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as error:  # same name and classes, other constructor overrides
        raise CheckpointError(f"{path} does not fit this run's model: {str(error).splitlines()[0]}") from None
    if state.ema is not None:
        state.ema.module.load_state_dict(ckpt.get("state_dict_ema", ckpt["state_dict"]))
    if restore_optimizer:
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.scaler is not None and "scaler" in ckpt:
            state.scaler.load_state_dict(ckpt["scaler"])
    if state.scheduler is not None and "scheduler" in ckpt:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    state.epoch = ckpt["epoch"] + 1
    state.num_updates = ckpt["num_updates"]
    state.best_metric, state.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
    return list(ckpt.get("history", []))


def update_checkpoint_history(
    ckpt: dict[str, Any], history: list[dict[str, Any]], output: Path, eval_metric: str, keep: int
) -> list[int]:
    """Save the latest epoch as checkpoint-EPOCH.pth.tar if it ranks among the `keep` best; delete those that do not.

    The ranking is rebuilt every epoch from the recorded history (restored by --resume) and the files on disk, so a
    resumed run goes on ranking the files it kept; a file of an epoch the history does not hold (left by an earlier
    run in this folder) is deleted. Ties keep the earlier epoch. Returns the kept epochs, best first.
    """
    epoch = history[-1]["epoch"]
    on_disk = {
        int(match.group(1)): path
        for path in output.glob("checkpoint-*.pth.tar")
        if (match := EPOCH_CHECKPOINT.fullmatch(path.name))
    }
    candidates = [row for row in history if row["epoch"] in on_disk or row["epoch"] == epoch]
    sign = 1 if eval_metric == "loss" else -1  # the loss ranks lowest first, accuracies highest first
    ranked = sorted(candidates, key=lambda row: (sign * row[f"eval_{eval_metric}"], row["epoch"]))
    kept = [row["epoch"] for row in ranked[:keep]]
    if epoch in kept:
        atomic_save(ckpt, output / f"checkpoint-{epoch}.pth.tar")
    for old_epoch, path in on_disk.items():
        if old_epoch not in kept:
            path.unlink()
    return kept


def write_summary(history: list[dict[str, Any]], path: Path) -> None:
    """summary.csv, one row per epoch, rewritten whole (and atomically) from the recorded history."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows({k: row[k] for k in SUMMARY_FIELDS} for row in history)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def train_one_epoch(
    state: TrainState,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    args: argparse.Namespace,
    context: DistributedContext,
    mixup: Mixup | None,
    train_model: nn.Module,
    num_epochs: int,
) -> float:
    """One pass over the training data; returns the mean loss over all ranks. Stops at a non-finite loss."""
    train_model.train()
    device = context.device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    bar = tqdm(
        loader,
        desc=f"epoch {state.epoch + 1}/{num_epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=args.no_progress or not context.is_primary,
    )
    for batch in bar:
        # None: every image of the batch was unreadable (and counted by the dataset).
        if batch is not None and mixup is not None and len(batch[0]) % 2:
            # A skipped unreadable image left an odd batch; timm's mixup needs pairs.
            batch = (batch[0][:-1], batch[1][:-1]) if len(batch[0]) > 1 else None
        # All ranks skip together: one sitting a step out would leave the others waiting in the gradient all-reduce.
        if not on_every_rank(batch is not None, context):
            continue
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with autocast(device, args.amp, args.amp_dtype):
            loss = criterion(train_model(images), targets)
        # Every rank sees the same averaged loss, so all stop at the same step instead of some waiting forever.
        mean_loss = all_reduce_mean(loss.detach(), context)
        if not torch.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({mean_loss.item()}) at epoch {state.epoch + 1}, step {steps + 1}"
            )
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler(
                loss,
                state.optimizer,
                clip_grad=args.clip_grad,
                clip_mode=args.clip_mode,
                parameters=train_model.parameters(),
            )
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(train_model.parameters(), args.clip_grad, mode=args.clip_mode)
            state.optimizer.step()
        state.num_updates += 1
        if state.ema is not None:
            state.ema.update(state.model, step=state.num_updates)
        if state.scheduler is not None:
            state.scheduler.step_update(num_updates=state.num_updates)
        total_loss += mean_loss.double()
        steps += 1
        bar.set_postfix(
            loss=f"{total_loss.item() / steps:.4f}", lr=f"{_current_lr(state.optimizer):.2e}", refresh=False
        )
    bar.close()
    if steps == 0:
        raise ValueError("the training loader yielded no batch: fewer images than one batch (drop_last)?")
    return total_loss.item() / steps


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    groups = optimizer.param_groups
    return sum(group["lr"] for group in groups) / len(groups)


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model with its starting weights: released (--pretrained), a file (--initial-checkpoint), or fresh."""
    model = create_model(
        args.model, num_classes=num_classes, drop_path_rate=args.drop_path, in_chans=args.in_chans, drop_rate=args.drop
    )
    if args.pretrained:
        load_pretrained(model, released_weights(model.model_name, model.pretrained_cfg["url"]))
    elif args.checkpoint:
        load_pretrained(model, args.checkpoint, use_ema=args.use_ema, unsafe_load=args.unsafe_load)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def output_folder(args: argparse.Namespace) -> Path:
    """--output[/--experiment]; by default the resumed run's folder, else output/train/<date>-<model>-<size>."""
    if args.output:
        base = Path(args.output)
    elif args.resume:
        base = Path(args.resume).parent
    else:
        size = args.img_size or (args.input_size[-1] if args.input_size else "default")
        base = Path("output/train") / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}-{size}"
    return base / args.experiment if args.experiment else base


def train(args: argparse.Namespace, context: DistributedContext, output: Path) -> dict[str, Any]:
    """The whole run (flags already resolved); returns the final summary row plus best_metric / best_epoch."""
    source, data_dir = _dataset_source(args)
    # The data first: a missing or empty folder fails here, before any model is built. The built-in digits are
    # upscaled once, straight to the input size (8 -> 16 px), rather than twice through a 32 px copy.
    digits_size = args.input_size[-1] if args.input_size else args.img_size or 32
    train_set = build_dataset(
        source, args.train_split, data_dir=data_dir, download=args.dataset_download, img_size=digits_size
    )
    val_set = build_dataset(
        source, args.val_split, data_dir=data_dir, download=args.dataset_download, img_size=digits_size
    )
    if list(train_set.classes) != list(val_set.classes):
        only = sorted(set(train_set.classes) ^ set(val_set.classes))[:5]
        raise UsageError(
            f"the {args.train_split} and {args.val_split} splits have different classes "
            f"({len(train_set.classes)} vs {len(val_set.classes)}; in one split only: {', '.join(only) or 'none'})"
        )
    num_classes = args.num_classes or len(train_set.classes)
    if num_classes < len(train_set.classes):
        raise UsageError(f"--num-classes {num_classes} is smaller than the {len(train_set.classes)} classes found")
    # drop_last: a split smaller than one global batch would train on nothing and fail mid-run.
    global_batch = args.batch_size * context.world_size
    if len(train_set) < global_batch:
        raise UsageError(
            f"the {args.train_split} split has {len(train_set)} images, fewer than one batch of {global_batch} "
            f"({args.batch_size} x {context.world_size} process(es)); lower -b/--batch-size"
        )

    # The same initial weights on every rank, so that each rank's EMA copy starts equal too.
    seed_epoch(args.seed, -1, 0)
    model = build_model(args, num_classes)
    # Validation resizes with --interpolation, training with --train-interpolation.
    overrides = input_overrides(args, "interpolation")
    config = data_config(model, interpolation=args.interpolation, **overrides)
    train_set.transform = create_transform(
        model,
        train=True,
        **overrides,
        interpolation=args.train_interpolation,
        no_aug=args.no_aug,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )
    val_set.transform = create_transform(model, train=False, interpolation=args.interpolation, **overrides)

    device = context.device
    model.to(device)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    float16 = args.amp and amp_dtype(device, args.amp_dtype) == torch.float16
    scaler = NativeScaler(device=device.type) if float16 else None
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(
            model,
            decay=args.model_ema_decay,
            use_warmup=args.model_ema_warmup,
            device=torch.device("cpu") if args.model_ema_force_cpu else None,
        )
    train_loader = create_loader(
        train_set, args.batch_size, args.workers, shuffle=True, distributed=context.distributed, drop_last=True
    )
    val_loader = create_loader(val_set, args.validation_batch_size, args.workers, distributed=context.distributed)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        **scheduler_kwargs(args, decreasing_metric=args.eval_metric == "loss"),
        updates_per_epoch=len(train_loader),
    )
    state = TrainState(model, optimizer, scheduler, scaler, ema, class_names=[str(c) for c in train_set.classes])
    history: list[dict[str, Any]] = []
    if args.resume:
        history = restore(state, args.resume, not args.no_resume_opt, args.unsafe_load)
    if args.start_epoch is not None:
        state.epoch = args.start_epoch
    history = [row for row in history if row["epoch"] < state.epoch]
    if scheduler is not None and state.epoch > 0:
        # timm's schedulers are functions of time: set the learning rate for where the run resumes.
        if args.sched_on_updates:
            scheduler.step_update(state.num_updates)
        else:
            scheduler.step(state.epoch)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    train_model: nn.Module = model
    if context.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # After DDP, as timm does, so that its gradient buckets are compiled too; checkpoints keep the plain model.
    train_model = compile_model(train_model, args.torchcompile)

    saved_args = plain_arguments(args)
    if context.is_primary:
        output.mkdir(parents=True, exist_ok=True)
        (output / "args.yaml").write_text(yaml.safe_dump(saved_args, sort_keys=False))
        _logger.info(
            "training %s (%d classes, input %s) on %s: %d train / %d held-out images, %d epochs from epoch %d, "
            "%d process(es) on %s; output in %s",
            args.model,
            num_classes,
            "x".join(map(str, config["input_size"])),
            source or "the built-in digits",
            len(train_set),
            len(val_set),
            num_epochs,
            state.epoch,
            context.world_size,
            device,
            output,
        )

    decreasing = args.eval_metric == "loss"
    row: dict[str, Any] = history[-1] if history else {}
    for epoch in range(state.epoch, num_epochs):
        state.epoch = epoch
        seed_epoch(args.seed, epoch, context.rank)
        if context.distributed:
            train_loader.sampler.set_epoch(epoch)
        if mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup.mixup_enabled = False
        train_loss = train_one_epoch(state, train_loader, criterion, args, context, mixup, train_model, num_epochs)
        eval_model = ema.module if ema is not None else model
        metrics = evaluate(eval_model, val_loader, device, args.amp, args.amp_dtype, context.distributed)
        if scheduler is not None:
            scheduler.step(epoch + 1, metrics[args.eval_metric])
        row = dict(
            epoch=epoch,
            train_loss=round(train_loss, 6),
            eval_loss=round(metrics["loss"], 6),
            eval_top1=round(metrics["top1"], 4),
            eval_top5=round(metrics["top5"], 4),
            lr=_current_lr(optimizer),
        )
        history.append(row)
        metric = metrics[args.eval_metric]
        best = state.best_metric
        is_best = best is None or (metric < best if decreasing else metric > best)
        if is_best:
            state.best_metric, state.best_epoch = metric, epoch
        if context.is_primary:
            ckpt = checkpoint_dict(state, saved_args, history)
            atomic_save(ckpt, output / "last.pth.tar")
            if is_best:
                atomic_save(ckpt, output / "model_best.pth.tar")
            if args.checkpoint_hist:
                update_checkpoint_history(ckpt, history, output, args.eval_metric, args.checkpoint_hist)
            write_summary(history, output / "summary.csv")
            plot_training_curves(history, output / CURVES_FILE, title=f"{args.model} on {source or 'digits'}")
            _logger.info(
                "epoch %d/%d  train loss %.4f  held-out loss %.4f  top-1 %.2f  top-5 %.2f  lr %.2e%s",
                epoch + 1,
                num_epochs,
                train_loss,
                metrics["loss"],
                metrics["top1"],
                metrics["top5"],
                row["lr"],
                "  (best)" if is_best else "",
            )
    skipped = getattr(train_set, "num_skipped", 0) + getattr(val_set, "num_skipped", 0)
    if skipped and context.is_primary:
        _logger.warning("%d unreadable image(s) were skipped (see the warnings above)", skipped)
    return {**row, "best_metric": state.best_metric, "best_epoch": state.best_epoch, "num_skipped": skipped}


def run(args: argparse.Namespace) -> int:
    """`sequencer train`: set up (distributed) processes, train, print the held-out top-1."""
    start = time.perf_counter()
    check_arguments(resolve_arguments(args))
    context = init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if context.is_primary else logging.WARNING, format="%(message)s")
    args = resolve_arguments(args, context.world_size)
    set_threads(args.threads)
    output = output_folder(args)
    try:
        result = train(args, context, output)
    except NonFiniteLossError as error:
        last = output / "last.pth.tar"
        kept = f"the last good checkpoint is kept: {last}" if last.is_file() else "no checkpoint was written"
        _logger.error("stopping: %s; %s. Lower --lr, set --clip-grad, or check the data.", error, kept)
        return 1
    except KeyboardInterrupt:
        if context.is_primary:
            _logger.error("interrupted; continue with --resume on the output folder's last.pth.tar")
        return 130
    finally:
        cleanup_distributed()
    if context.is_primary and "eval_top1" in result:
        print(
            f"held-out top-1 {result['eval_top1']:.2f}% (top-5 {result['eval_top5']:.2f}%) after epoch "
            f"{result['epoch'] + 1}; best {args.eval_metric} {result['best_metric']:.2f} at epoch "
            f"{result['best_epoch'] + 1}; {time.perf_counter() - start:.1f} s; output in {output}"
        )
    return 0
