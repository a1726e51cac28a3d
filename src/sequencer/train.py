"""The trainer: `train(config)` for Python callers, `run(args)` its adapter for the command line.

A run is checked whole before any work (`prepare_run`), then goes in three steps: `build_data` (splits, loaders,
mixup and loss), `build_state` (model, optimizer, schedule, EMA, scaler, resumed state) and `run_epochs`, each taking
the frozen `TrainConfig` (`sequencer.train_config`, every flag a field) and this process's `RunState`. Its result is
the last epoch's summary row with best_metric / best_epoch, num_skipped (unreadable images) and output (the run's
folder). A loss that turns non-finite raises `NonFiniteLossError` (exit code 1 on the command line). Each epoch is
seeded from (seed, epoch, rank): that is what lets a resumed run replay the uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml
from timm.data import AugMixDataset, Mixup
from timm.data import create_transform as timm_create_transform
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import OptimInfo, create_optimizer_v2, get_optimizer_info, list_optimizers, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, set_jit_fuser
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.utils import save_image

from sequencer.average import EPOCH_CHECKPOINT
from sequencer.builder import create_model, load_pretrained, model_config
from sequencer.checkpoint import RECORD_INPUT_KEYS, RECORD_KEY, atomic_save, read_file, record_of
from sequencer.config import input_overrides
from sequencer.data import (
    build_dataset,
    create_loader,
    create_transform,
    data_config,
    image_channels,
    unused_data_flags,
)
from sequencer.distributed import (
    DistributedContext,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    launched_world_size,
    on_every_rank,
    process_group,
)
from sequencer.errors import CheckpointError, UsageError
from sequencer.files import write_csv
from sequencer.plotting import plot_training_curves
from sequencer.runtime import (
    amp_dtype,
    autocast,
    compile_model,
    import_device_modules,
    progress_bar,
    set_threads,
    usable_cpus,
    warn_if_emulated_bfloat16,
)
from sequencer.tracking import TRACKING_OPTIONS, RunTracker, check_tracking
from sequencer.train_config import LR_BASE, LR_BASE_SIZE, TrainConfig
from sequencer.validate import evaluate

_logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
# With --model-ema both the model and its EMA are evaluated (as timm's train.py does): the EMA's columns.
EMA_FIELDS = ("ema_eval_loss", "ema_eval_top1", "ema_eval_top5")
CURVES_FILE = "training_curves.png"
# The files that mark a folder as holding a run (besides checkpoint-EPOCH.pth.tar): a new run must not overwrite them.
RUN_FILES = ("args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar")
# Flags that shape the learned state a checkpoint holds: a resumed run keeps them; every other flag (the schedule,
# the epochs, augmentation ...) follows the command line.
RESUME_FIXED = ("model", "num_classes", "in_chans", "img_size", "input_size", "opt", "layer_decay")
# --recovery-interval's checkpoint, rewritten every N updates.
RECOVERY_FILE = "recovery.pth.tar"
# `--resume auto`: continue from the output folder's last.pth.tar if there is one, else start there afresh.
AUTO_RESUME = "auto"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite during `epoch`."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


def resolve(config: TrainConfig, world_size: int = 1) -> TrainConfig:
    """The data-dependent defaults filled in (digits demo or the authors'), and the learning rate from --lr-base as
    timm's train.py scales it by the global batch."""
    ours_to_choose = config.workers is None
    if config.sched == "plateau":
        # timm's plateau schedule steps on the held-out metric, once an epoch: a recipe's per-update stepping (the
        # digits demo's) gives way, and only the flag itself is refused.
        if config.sched_on_updates:
            raise UsageError(
                "--sched plateau steps once an epoch, on the held-out metric, not every update: drop --sched-on-updates"
            )
        config = replace(config, sched_on_updates=False)
    # The digits demo's --lr is a default like the others: a --lr-base* flag asks for the scaled rate instead.
    scaled = config.lr is None and (
        config.lr_base is not None or config.lr_base_size is not None or bool(config.lr_base_scale)
    )
    config = config.with_recipe()
    config = replace(
        config,
        lr_base=LR_BASE if config.lr_base is None else config.lr_base,
        lr_base_size=LR_BASE_SIZE if config.lr_base_size is None else config.lr_base_size,
    )
    if ours_to_choose:  # a worker count that is ours to choose stays within the cores there are (torch warns beyond)
        config = replace(config, workers=min(config.workers, usable_cpus()))
    if config.lr is None or scaled:
        ratio = config.batch_size * config.grad_accum_steps * world_size / config.lr_base_size
        adaptive = any(name in config.opt.lower() for name in ("ada", "lamb"))
        scale = config.lr_base_scale or ("sqrt" if adaptive else "linear")
        config = replace(config, lr=config.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio))
    return replace(config, validation_batch_size=config.validation_batch_size or config.batch_size)


def check_config(config: TrainConfig) -> None:
    """Refuse flags that cannot work together or name nothing known with a `UsageError`, before any work starts.

    Single values out of range or choices were refused when the config was made (`sequencer.config.FlagFields`)."""
    patches = math.prod(model_config(config.model).patch_sizes)
    size = config.input_size[-2:] if config.input_size else [config.img_size] * 2 if config.img_size else None
    if size and min(size) < patches:
        raise UsageError(
            f"input size {'x'.join(map(str, size))} is smaller than the {patches}x{patches} pixels that "
            f"{config.model}'s stem and downsampling patches need"
        )
    mode = config.image_mode
    read = image_channels(mode)
    if read != config.input_channels:
        raise UsageError(
            f"--input-img-mode {mode} reads {read} channel(s), but the model takes {config.input_channels} "
            "(--in-chans); L with --in-chans 1, RGB with 3"
        )
    if config.aug_splits == 1:
        raise UsageError("--aug-splits 1: splits are 0 (off) or >= 2 (a clean copy and augmented ones)")
    if config.jsd_loss and config.aug_splits < 2:
        raise UsageError("--jsd-loss compares the --aug-splits copies of each image: set --aug-splits 2 or more")
    check_tracking(**{name: getattr(config, name) for name in TRACKING_OPTIONS})
    if config.sched == "plateau":
        check_plateau_schedule()
    if config.torchscript and config.torchcompile:
        raise UsageError("--torchscript and --torchcompile both compile the model; pass one")
    if config.model_dtype not in (None, "float32") and config.amp:
        raise UsageError(f"--model-dtype {config.model_dtype} with --amp: AMP keeps float32 weights; pass one")
    if sum(map(bool, (config.pretrained, config.checkpoint, config.pretrained_path))) > 1:
        raise UsageError("--pretrained, --pretrained-path and --initial-checkpoint each give the starting weights")
    new_layer_decay = config.layer_decay_min_scale or config.layer_decay_no_opt_scale is not None
    probe = argparse.Namespace(opt="sgd", lr=0.1, weight_decay=0, momentum=0.9, layer_decay_min_scale=0.5)
    if new_layer_decay and "layer_decay_min_scale" not in optimizer_kwargs(cfg=probe):
        raise UsageError(
            f"--layer-decay-min-scale and --layer-decay-no-opt-scale: timm {timm.__version__} does not read them "
            "(1.0.31 does)"
        )
    for flag, pair, strict in (
        ("--scale", config.scale, False),
        ("--ratio", config.ratio, False),
        ("--cutmix-minmax", config.cutmix_minmax, True),
    ):
        if pair and (pair[0] >= pair[1] if strict else pair[0] > pair[1]):
            raise UsageError(
                f"{flag} {pair[0]} {pair[1]}: the first value must be {'<' if strict else '<='} the second"
            )
    if config.opt.lower().removeprefix("fused") not in {o.lower() for o in list_optimizers()} and "_" not in config.opt:
        raise UsageError(f"unknown optimizer --opt {config.opt!r}; timm knows {', '.join(list_optimizers())}")
    check_optimizer_arguments(config)
    if config.aa:
        try:  # timm's own parser of the policy, on a dummy size: it asserts on a name it does not know
            timm_create_transform(32, is_training=True, auto_augment=config.aa)
        except (AssertionError, KeyError, ValueError) as error:
            raise UsageError(
                f"unknown --aa policy {config.aa!r}{f' ({error})' if str(error) else ''}; timm takes e.g. "
                "rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w3 (AugMix), original or v0 (AutoAugment)"
            ) from None


def optimizer_info(opt: str) -> OptimInfo | None:
    """timm's registry entry of optimizer `opt` (its has_betas, num_betas, has_eps), None for a name it lacks."""
    try:  # the registry knows the name after a lookahead_ prefix
        return get_optimizer_info(opt.lower().split("_")[-1])
    except ValueError:
        return None


def check_optimizer_arguments(config: TrainConfig) -> None:
    """Refuse --opt-betas, --opt-eps or --opt-kwargs that --opt's optimizer cannot take, in one line: torch checks them
    only when it builds the optimizer, after the data is read, and a wrong count of betas is an IndexError there."""
    given = [
        flag for flag, value in (("--opt-betas", config.opt_betas), ("--opt-eps", config.opt_eps)) if value is not None
    ] + (["--opt-kwargs"] if config.opt_kwargs else [])
    if not given:
        return
    info = optimizer_info(config.opt)
    count = info.num_betas if info is not None and info.has_betas else None  # timm drops betas the optimizer lacks
    if config.opt_betas is not None and count and len(config.opt_betas) != count:
        raise UsageError(f"--opt-betas takes {count} values for --opt {config.opt}, got {len(config.opt_betas)}")
    # Built once on a single weight with the run's arguments (layer decay aside: it needs the model's layers).
    kwargs = {key: value for key, value in optimizer_kwargs(cfg=config).items() if not key.startswith("layer_decay")}
    try:
        create_optimizer_v2(nn.Linear(1, 1), **kwargs, **(config.opt_kwargs or {}))
    except (TypeError, ValueError, IndexError) as error:
        raise UsageError(f"{' / '.join(given)} with --opt {config.opt}: {error}") from None


def check_plateau_schedule() -> None:
    """Refuse --sched plateau where timm's plateau schedule cannot be built (an older timm, 1.0.12 for one, passes
    torch's ReduceLROnPlateau a `verbose` argument that torch 2.7 removed)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        create_scheduler_v2(optimizer, sched="plateau")
    except TypeError as error:
        raise UsageError(
            f"--sched plateau: timm {timm.__version__}'s plateau schedule does not run on torch "
            f"{torch.__version__.split('+')[0]} ({error}); use a newer timm or another --sched"
        ) from None


def _dataset_source(config: TrainConfig) -> tuple[str | None, str | None]:
    """(name or root for build_dataset, data_dir) from DATA / --data-dir / --dataset."""
    root = config.data or config.data_dir
    return (config.dataset or root), root


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, epoch, rank), so an epoch replays exactly after a resume.

    Epoch -1 is the set-up before training (model initialisation).
    """
    state = np.random.SeedSequence([seed, rank, epoch + 1]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TrainingData:
    """The splits a run learns from and is scored on, their loaders, and the training loss (after mixup, if on)."""

    train_set: Dataset
    val_set: Dataset
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    source: str | None  # the dataset's name or folder as given; None: the built-in digits
    criterion: nn.Module
    mixup: Mixup | None


@dataclass
class TrainState:
    """Everything a checkpoint restores, and the length of the schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: NativeScaler | None
    ema: ModelEmaV3 | None
    num_epochs: int  # of the schedule, cool-down included: epochs 0 to num_epochs - 1
    epoch: int = 0
    num_updates: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    class_names: list[str] = field(default_factory=list)  # index -> the data's class, for predict and validate
    history: list[dict[str, Any]] = field(default_factory=list)  # the summary rows, one per epoch trained


def checkpoint_dict(state: TrainState, args: dict[str, Any]) -> dict[str, Any]:
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
        "history": state.history,
        "class_names": state.class_names,
        RECORD_KEY: record_of(state.model).as_dict(),
    }
    if state.scheduler is not None:
        ckpt["scheduler"] = scheduler_state(state.scheduler)
    if state.scaler is not None:
        ckpt["scaler"] = state.scaler.state_dict()
    if state.ema is not None:
        ckpt["state_dict_ema"] = {k: v.detach().cpu() for k, v in state.ema.module.state_dict().items()}
    return ckpt


# What a plateau schedule has learned besides its best metric (timm's state_dict), for a resume to go on exactly: its
# counters, and the rate before --lr-noise's perturbation of this epoch.
PLATEAU_COUNTERS = ("num_bad_epochs", "cooldown_counter")


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The schedule's state for a checkpoint: timm's, and a plateau schedule's counters and unperturbed rate."""
    state = scheduler.state_dict()
    if isinstance(scheduler, PlateauLRScheduler):
        state.update({key: getattr(scheduler.lr_scheduler, key) for key in PLATEAU_COUNTERS})
        state["restore_lr"] = scheduler.restore_lr
    return state


def restore_plateau(scheduler: PlateauLRScheduler, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
    """A plateau schedule as the checkpoint left it: its state, and the rate it had reduced to.

    The reduced rate lives only in the optimizer's groups (timm's resume keeps it with them); it is kept relative to
    the run's --lr, so that a changed --lr still takes effect."""
    saved = ckpt["scheduler"]
    scheduler.load_state_dict(saved)
    for key in PLATEAU_COUNTERS:
        if key in saved:
            setattr(scheduler.lr_scheduler, key, saved[key])
    groups = ckpt["optimizer"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):  # --no-resume-opt with another layout: this run's rates stand
        return
    # An unchanged --lr gives a factor of exactly 1: the checkpoint's rate bit for bit. A run at --lr 0 had nothing
    # to reduce: this run's rate stands.
    factors = [
        group["initial_lr"] / saved_group["initial_lr"] if saved_group.get("initial_lr") else 1.0
        for group, saved_group in zip(optimizer.param_groups, groups, strict=True)
    ]
    for group, saved_group, factor in zip(optimizer.param_groups, groups, factors, strict=True):
        if saved_group.get("initial_lr"):
            group["lr"] = saved_group["lr"] * factor
    if saved.get("restore_lr") is not None:
        scheduler.restore_lr = [rate * factor for rate, factor in zip(saved["restore_lr"], factors, strict=True)]


def read_resumed(config: TrainConfig) -> dict[str, Any]:
    """The --resume checkpoint, refused unless it is one of this trainer's, of a run with the same `RESUME_FIXED`."""
    path = config.resume
    ckpt = read_file(path, unsafe_load=config.unsafe_load)
    if "epoch" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this trainer; use --initial-checkpoint for weights"
        )
    # The classes of the file's head, whether that run named them (--num-classes) or took them from its data.
    trained = {**(ckpt.get("args") or {}), "num_classes": ckpt.get("num_classes")}
    wanted = config.as_dict()
    for key in RESUME_FIXED:
        if key == "num_classes" and wanted.get(key) is None:
            continue  # from this run's data, compared with the head by `restore` once the data is read
        if key in trained and trained[key] != wanted.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"--resume {path}: that run has {flag} {_shown(trained[key])}, this command {_shown(wanted.get(key))}; "
                "a resumed run keeps its model, class count, input channels, input size, optimizer and layer decay "
                "(start a new run from its weights with --initial-checkpoint)"
            )
    return ckpt


def _names(names: list[str], shown: int = 4) -> str:
    """The first class names, in order."""
    return ", ".join(names[:shown]) + (f" ... ({len(names)})" if len(names) > shown else "")


def _shown(value: Any) -> str:
    if value is None:
        return "unset (the default)"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def restore(state: TrainState, ckpt: dict[str, Any], path: str, restore_optimizer: bool = True) -> None:
    """Load the learned state of a training checkpoint (`read_resumed`) into `state`.

    Model, EMA, optimizer state, scaler, epoch, best metric and summary rows come from the file; the optimizer's
    hyper-parameters and the schedule stay as this run's flags built them, but for a plateau schedule's learned state
    and the rate it reduced to (`restore_plateau`)."""
    model = state.model
    trained = (ckpt.get("model_name"), ckpt.get("num_classes"))
    if trained != (model.model_name, model.num_classes):
        raise CheckpointError(
            f"{path} is a run of {trained[0]} with {trained[1]} classes; this run is {model.model_name} with "
            f"{model.num_classes} classes: resume with the flags of that run, or start from its weights with "
            "--initial-checkpoint"
        )
    saved_names = [str(name) for name in ckpt.get("class_names") or []]
    if saved_names and state.class_names and saved_names != state.class_names:
        # The head's rows are that run's classes: read as others, the record would mislabel every one of them.
        raise UsageError(
            f"--resume {path}: that run's classes are {_names(saved_names)}, this data's {_names(state.class_names)} "
            "(another --class-map or dataset): resume on that run's classes, or start from its weights with "
            "--initial-checkpoint"
        )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as error:  # same name and classes, other constructor overrides
        raise CheckpointError(f"{path} does not fit this run's model: {str(error).splitlines()[0]}") from None
    if state.ema is not None:
        state.ema.module.load_state_dict(ckpt.get("state_dict_ema", ckpt["state_dict"]))
    if restore_optimizer:
        # torch restores each group's hyper-parameters with its state ('lr', timm's 'initial_lr', weight decay ...):
        # put this run's back, so that a changed --lr or --weight-decay takes effect and the rebuilt schedule wins.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in state.optimizer.param_groups]
        state.optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(state.optimizer.param_groups, settings, strict=True):
            group.update(own)
        if state.scaler is not None and "scaler" in ckpt:
            state.scaler.load_state_dict(ckpt["scaler"])
    # Other schedules are functions of the epoch, rebuilt from the flags; a plateau schedule has learned state too,
    # its rate among it.
    if isinstance(state.scheduler, PlateauLRScheduler) and "best" in ckpt.get("scheduler", {}):
        restore_plateau(state.scheduler, state.optimizer, ckpt)
    state.epoch = ckpt["epoch"] + 1
    state.num_updates = ckpt["num_updates"]
    state.best_metric, state.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
    state.history = list(ckpt.get("history", []))


def update_checkpoint_history(
    ckpt: dict[str, Any], history: list[dict[str, Any]], output: Path, eval_metric: str, keep: int, ema: bool = False
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
    column = f"{'ema_' if ema else ''}eval_{eval_metric}"  # the EMA's when it is evaluated, as for model_best
    # Rows of epochs trained before the EMA was evaluated beside the model (older runs) hold the EMA's in eval_*.
    ranked = sorted(candidates, key=lambda row: (sign * row.get(column, row[f"eval_{eval_metric}"]), row["epoch"]))
    kept = [row["epoch"] for row in ranked[:keep]]
    if epoch in kept:
        atomic_save(ckpt, output / f"checkpoint-{epoch}.pth.tar")
    for old_epoch, path in on_disk.items():
        if old_epoch not in kept:
            path.unlink()
    return kept


def train_one_epoch(
    config: TrainConfig, run_state: RunState, data: TrainingData, state: TrainState, train_model: nn.Module
) -> float:
    """One pass over the training data; returns the mean loss over all ranks. Stops at a non-finite loss.

    The losses stay on the device and are read (checked, shown on the bar or logged) every --log-interval steps and
    at the epoch's end: the host never waits for the device in between."""
    train_model.train()
    context = run_state.context
    device, loader, mixup = context.device, data.train_loader, data.mixup
    window: list[torch.Tensor] = []  # the losses since the last read, on the device
    total_loss, steps, images_seen, since = 0.0, 0, 0, time.perf_counter()
    epoch_start_updates = state.num_updates
    desc = f"epoch {state.epoch}/{state.num_epochs - 1}"
    bar = progress_bar(loader, show=not config.no_progress and context.is_primary, desc=desc, dynamic_ncols=True)
    log = context.is_primary and bar.disable  # no bar drawn (a pipe, --no-progress): progress lines instead
    # As timm's train.py: a second-order optimizer (adahessian) differentiates the gradients again.
    second_order = getattr(state.optimizer, "is_second_order", False)
    clipped = clip_parameters(state.model, config.clip_mode)
    for (images, targets), last in trained_batches(bar, mixup, context):
        images = images.to(device, dtype=input_dtype(config), non_blocking=True, memory_format=memory_format(config))
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        # --grad-accum-steps: an update every `accum` batches (and at the epoch's end, over the batches left), each
        # batch's loss scaled so that the update is the one of their union, as timm's train.py does.
        position = steps % config.grad_accum_steps
        left = len(loader) - (steps - position)
        accum = min(config.grad_accum_steps, left) if left > 0 else config.grad_accum_steps
        if last and position + 1 < accum:
            # Skipped batches left the epoch's last group short: it still makes its update (its gradients would
            # otherwise leak into the next epoch), the mean of the batches it has.
            with torch.no_grad():
                for parameter in state.model.parameters():
                    if parameter.grad is not None:
                        parameter.grad.mul_(accum / (position + 1))
            accum = position + 1
        update = position + 1 == accum
        # Between updates DDP keeps the gradients local: one all-reduce per update.
        with (
            contextlib.nullcontext() if update or not context.distributed else train_model.no_sync(),
            autocast(device, config.amp, config.amp_dtype),
        ):
            loss = data.criterion(train_model(images), targets)
        window.append(loss.detach())
        if state.scaler is not None:
            state.scaler(
                loss / accum,
                state.optimizer,
                clip_grad=config.clip_grad,
                clip_mode=config.clip_mode,
                parameters=clipped,
                create_graph=second_order,
                need_update=update,
            )
        else:
            (loss / accum).backward(create_graph=second_order)
            if update:
                if config.clip_grad is not None:
                    dispatch_clip_grad(clipped, config.clip_grad, mode=config.clip_mode)
                state.optimizer.step()
        steps += 1
        images_seen += len(images) * context.world_size
        if update:
            state.optimizer.zero_grad(set_to_none=True)
            state.num_updates += 1
            if state.ema is not None:
                state.ema.update(state.model, step=state.num_updates)
            if state.scheduler is not None:
                state.scheduler.step_update(num_updates=state.num_updates)
            if config.synchronize_step and device.type == "cuda":
                torch.cuda.synchronize(device)
            if config.recovery_interval and context.is_primary and state.num_updates % config.recovery_interval == 0:
                save_recovery(config, run_state, state, epoch_start_updates)
        if steps % config.log_interval:
            continue
        # A non-finite loss is seen here, up to log_interval - 1 updates after it happened: those updates ran on
        # non-finite gradients, which is harmless because the run stops before any checkpoint is written from them
        # (last.pth.tar is saved at the epoch's end, after the final read below).
        recent = read_losses(window, context, state.epoch, steps)
        total_loss += recent
        lr, rate = _current_lr(state.optimizer), images_seen / (time.perf_counter() - since)
        if log:
            _logger.info(
                "%s  step %d/%d  loss %.4f  lr %.2e  %.1f img/s",
                desc,
                steps,
                len(loader),
                recent / config.log_interval,
                lr,
                rate,
            )
        bar.set_postfix(loss=f"{total_loss / steps:.4f}", lr=f"{lr:.2e}", refresh=False)
        if config.save_images and context.is_primary:
            save_image(images.float(), run_state.output / f"train-batch-{steps}.jpg", padding=0, normalize=True)
        images_seen, since = 0, time.perf_counter()
    bar.close()
    if steps == 0:
        raise ValueError("the training loader yielded no batch: fewer images than one batch (drop_last)?")
    if window:
        total_loss += read_losses(window, context, state.epoch, steps)
    return total_loss / steps


def trained_batches(
    batches: Iterable[Any], mixup: Mixup | None, context: DistributedContext
) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], bool]]:
    """The batches a training epoch steps on, each with whether it is the epoch's last: one is read ahead, so that
    the last accumulated group closes even when the batches after it were skipped."""
    held = None
    for batch in batches:
        # None: every image of the batch was unreadable (and counted by the dataset).
        if batch is not None and mixup is not None and len(batch[0]) % 2:
            # A skipped unreadable image left an odd batch; timm's mixup needs pairs.
            batch = (batch[0][:-1], batch[1][:-1]) if len(batch[0]) > 1 else None
        # All ranks skip together: one sitting a step out would leave the others waiting in the gradient all-reduce.
        if not on_every_rank(batch is not None, context):
            continue
        if held is not None:
            yield held, False
        held = batch
    if held is not None:
        yield held, True


def clip_parameters(model: nn.Module, clip_mode: str) -> list[nn.Parameter]:
    """The parameters --clip-grad clips: all, but the classifier's with --clip-mode agc, as timm's train.py
    (`model_parameters(model, exclude_head=True)`: adaptive clipping is not meant for the final layer)."""
    if "agc" not in clip_mode:
        return list(model.parameters())
    head = {id(parameter) for parameter in model.get_classifier().parameters()}
    return [parameter for parameter in model.parameters() if id(parameter) not in head]


def input_dtype(config: TrainConfig) -> torch.dtype | None:
    """The dtype the images are fed in: --model-dtype's (None: as loaded, float32)."""
    return getattr(torch, config.model_dtype) if config.model_dtype else None


def memory_format(config: TrainConfig) -> torch.memory_format:
    """--channels-last's layout of the images, else the loader's."""
    return torch.channels_last if config.channels_last else torch.preserve_format


def save_recovery(config: TrainConfig, run_state: RunState, state: TrainState, epoch_start_updates: int) -> None:
    """recovery.pth.tar: this update's weights, optimizer and EMA, which `--resume` restarts its epoch from (timm's
    --recovery-interval): a way back after a crash mid-epoch, not an exact replay (last.pth.tar is)."""
    ckpt = checkpoint_dict(state, config.as_dict())
    # Recorded as the epoch before, so that a resume from it starts this epoch again.
    ckpt.update(epoch=state.epoch - 1, num_updates=epoch_start_updates, recovery=True)
    atomic_save(ckpt, run_state.output / RECOVERY_FILE)


def read_losses(window: list[torch.Tensor], context: DistributedContext, epoch: int, last_step: int) -> float:
    """The sum of the per-step losses in `window` (each averaged over the ranks), read from the device at once, and
    the window emptied; raises `NonFiniteLossError` naming the first step whose loss is not finite.

    One all-reduce per read, in step with every rank: all see the same losses, so all stop together and none waits
    forever in a collective."""
    losses = all_reduce_mean(torch.stack(window).double(), context).tolist()
    window.clear()
    first_step = last_step - len(losses) + 1
    for offset, value in enumerate(losses):
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite training loss ({value}) at epoch {epoch}, step {first_step + offset}", epoch
            )
    return sum(losses)


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    groups = optimizer.param_groups
    return sum(group["lr"] for group in groups) / len(groups)


def build_training_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The model with its starting weights: released (--pretrained), a file (--initial-checkpoint), or fresh."""
    # timm's --drop-connect is the deprecated name of --drop-path.
    drop_path = config.drop_connect if config.drop_connect is not None and not config.drop_path else config.drop_path
    try:
        model = create_model(
            config.model,
            pretrained=config.pretrained,
            num_classes=num_classes,
            drop_path_rate=drop_path,
            in_chans=config.input_channels,
            drop_rate=config.drop,
            rnn_impl=config.rnn_impl,
            **(config.model_kwargs or {}),
        )
    except TypeError as error:  # an unknown --model-kwargs key, or a value of the wrong type
        if not config.model_kwargs:
            raise
        raise UsageError(f"--model-kwargs: {error}; the keys are SequencerConfig's fields") from None
    if source := config.checkpoint or config.pretrained_path:  # not with --pretrained: `check_config` refuses both
        load_pretrained(model, source, use_ema=config.use_ema, unsafe_load=config.unsafe_load)
    if config.head_init_scale is not None or config.head_init_bias is not None:
        # As timm's train.py: after all starting weights (its create_model loads --pretrained, --pretrained-path and
        # --initial-checkpoint), so that the flags act on the head the run starts from, fitted or fresh.
        with torch.no_grad():
            head = model.get_classifier()
            if config.head_init_scale is not None:
                head.weight.mul_(config.head_init_scale)
                head.bias.mul_(config.head_init_scale)
            if config.head_init_bias is not None:
                head.bias.fill_(config.head_init_bias)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def output_folder(config: TrainConfig) -> Path:
    """--output[/--experiment]; by default the resumed run's folder, else output/train/<experiment>, as timm's
    train.py, or output/train/<date>-<model>-<size>."""
    if config.output:
        return Path(config.output) / config.experiment if config.experiment else Path(config.output)
    if config.resume == AUTO_RESUME:
        raise UsageError(
            "--resume auto continues the run in -o/--output: name that folder (the default one is new at every start)"
        )
    if config.resume:
        # The run goes on where its checkpoint lies, which already is output/train/<experiment> for a run started
        # with --experiment: appending it again would start a new run in a sub-folder of the old one.
        return Path(config.resume).parent
    size = config.img_size or (config.input_size[-1] if config.input_size else "default")
    return Path("output/train") / (config.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{size}")


def resume_source(config: TrainConfig, output: Path) -> str:
    """The checkpoint to resume from: --resume's, or for `--resume auto` the output folder's last.pth.tar when there
    is one, else none (''), so that one unchanged command line serves every restart of a preemptible job."""
    if config.resume != AUTO_RESUME:
        return config.resume
    last = output / "last.pth.tar"
    return str(last) if last.is_file() else ""


def check_output_folder(config: TrainConfig, output: Path, auto_resume: bool = False) -> None:
    """Refuse a new run in a folder that holds one (its files would be overwritten): only --resume continues there.

    The folder may hold this same command's args.yaml alone, written by a start that stopped before its first
    checkpoint, with nothing learned to lose (`check_writable` refuses a folder that cannot be written)."""
    held = [name for name in RUN_FILES if (output / name).exists()]
    held += sorted(path.name for path in output.glob("checkpoint-*.pth.tar"))
    if not held or (config.resume and Path(config.resume).resolve().parent == output.resolve()):
        return
    if held == ["args.yaml"]:
        with contextlib.suppress(OSError, yaml.YAMLError):  # an args.yaml that cannot be read is not this command's
            if yaml.safe_load((output / "args.yaml").read_text()) == config.as_dict():
                return
    listed = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "")
    if auto_resume:
        raise UsageError(
            f"--resume auto: {output} holds {listed} but no last.pth.tar to continue from, and not as this command "
            "would have left it; pass another -o/--output"
        )
    source = f" (-c {config.config} names it as its output)" if config.config else ""
    raise UsageError(
        f"{output} already holds a run{source}: {listed}; continue it with --resume {output / 'last.pth.tar'}, "
        "or pass another -o/--output (or --experiment NAME for a sub-folder)"
    )


def save_epoch_files(
    config: TrainConfig, run_state: RunState, ckpt: dict[str, Any], history: list[dict[str, Any]], is_best: bool
) -> None:
    """What an epoch writes after last.pth.tar: model_best.pth.tar (if `is_best`), its checkpoint-EPOCH.pth.tar
    (--checkpoint-hist), summary.csv and the training curves."""
    output = run_state.output
    if is_best:
        atomic_save(ckpt, output / "model_best.pth.tar")
    if config.checkpoint_hist:
        update_checkpoint_history(
            ckpt, history, output, config.eval_metric, config.checkpoint_hist, ema=evaluates_ema(config)
        )
    # summary.csv is rewritten whole (and atomically) from the recorded history.
    fields = SUMMARY_FIELDS + (EMA_FIELDS if any(EMA_FIELDS[0] in row for row in history) else ())
    write_csv(history, output / "summary.csv", fields)
    plot_training_curves(history, output / CURVES_FILE, title=run_state.title)


def train(config: TrainConfig | str | os.PathLike | None = None, **fields: Any) -> dict[str, Any]:
    """`sequencer train` from Python: a `TrainConfig`, or its fields as keywords (with `config` a YAML file of fields,
    as -c, that the keywords override); returns the last epoch's summary row (module doc)."""
    if isinstance(config, TrainConfig):
        config = replace(config, **fields)
    else:
        config = TrainConfig.from_keywords({**fields, **({"config": config} if config else {})})
    config, output, auto_resume = prepare_run(config)
    with process_group(config.device) as context, _stops_logged(context, output):
        run_state = RunState(context, output, auto_resume, resumed=start_process(config, context, auto_resume))
        data = build_data(config, context)
        state = build_state(config, run_state, data)
        return {**run_epochs(config, run_state, data, state), "output": output}


@dataclass
class RunState:
    """Where this process runs the config: its process group, the run's folder, and the checkpoint it resumes."""

    context: DistributedContext
    output: Path
    auto_resume: bool  # --resume auto
    resumed: dict[str, Any] | None = None  # the --resume checkpoint, read (`read_resumed`)
    title: str = ""  # of the training curves: the model and the data
    tracker: RunTracker | None = None  # W&B / TensorBoard, on rank 0


def prepare_run(config: TrainConfig) -> tuple[TrainConfig, Path, bool]:
    """The run's resolved config, its output folder and whether --resume is auto, every refusal made before any
    work."""
    # First: a backend module registers the device that --device (and so the process group) names.
    import_device_modules(config.device_modules)
    # Before the process group is joined: torchrun's WORLD_SIZE already gives the global batch.
    config = resolve(config, launched_world_size())
    check_config(config)
    output = output_folder(config)
    auto_resume = config.resume == AUTO_RESUME
    config = replace(config, resume=resume_source(config, output))
    check_output_folder(config, output, auto_resume=auto_resume and not config.resume)
    check_writable(output)
    return config, output, auto_resume


def check_writable(output: Path) -> None:
    """Refuse an output folder this process cannot create or write into, before any work."""
    existing = next(folder for folder in (output.absolute(), *output.absolute().parents) if folder.exists())
    try:  # a probe, not os.access: root passes every permission check, but not a read-only file system
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(
            f"cannot write the run into {output}: {existing} is not a writable folder ({error.strerror}); "
            "pass -o/--output"
        ) from None


def start_process(config: TrainConfig, context: DistributedContext, auto_resume: bool) -> dict[str, Any] | None:
    """Say where the run starts, warn of an emulated bfloat16, set the threads; returns the --resume checkpoint."""
    if context.is_primary:
        if auto_resume:
            _logger.info(
                "--resume auto: %s",
                f"continuing from {config.resume}" if config.resume else "no last.pth.tar, a new run",
            )
        for note in no_effect_notes(config):
            _logger.info("%s", note)
        if config.model_ema and not evaluates_ema(config):
            _logger.info(
                "--model-ema-force-cpu: the EMA is kept on the CPU and not evaluated, as in timm's train.py; "
                "model_best is the raw weights' best (score the EMA afterwards with validate --use-ema)"
            )
        if config.amp:
            warn_if_emulated_bfloat16(context.device, config.amp_dtype)
    resumed = read_resumed(config) if config.resume else None
    set_threads(config.threads)
    return resumed


# timm's flags that cannot change a Sequencer run, and why; each says so at the start when set.
NO_EFFECT = {
    "bn_momentum": "Sequencer has no BatchNorm (its norms are LayerNorms)",
    "bn_eps": "Sequencer has no BatchNorm (its norms are LayerNorms)",
    "sync_bn": "Sequencer has no BatchNorm to synchronise",
    "dist_bn": "Sequencer has no BatchNorm statistics to distribute",
    "split_bn": "Sequencer has no BatchNorm to split",
    "drop_block": "DropBlock drops regions of CNN feature maps; Sequencer has none",
    "fast_norm": "Sequencer's LayerNorms are torch's, not timm's fast-norm layers",
    "no_prefetcher": "there is no prefetcher here: the loader's workers normalise, mixup runs on the batch",
    "local_rank": "each process takes its device from torchrun's LOCAL_RANK",
    "gp": "avg is Sequencer's only global pool",
}


# timm's flags that refine another one, which must be on for them to act.
NEEDS: dict[str, tuple[Callable[[TrainConfig], bool], str]] = {
    "bce_sum": (lambda c: c.bce_loss, "--bce-loss"),
    "bce_target_thresh": (lambda c: c.bce_loss, "--bce-loss"),
    "bce_pos_weight": (lambda c: c.bce_loss, "--bce-loss"),
    "resplit": (lambda c: c.aug_splits > 0, "--aug-splits"),
    "lr_noise_pct": (lambda c: c.lr_noise is not None, "--lr-noise"),
    "lr_noise_std": (lambda c: c.lr_noise is not None, "--lr-noise"),
    "lr_cycle_mul": (lambda c: c.lr_cycle_limit > 1, "--lr-cycle-limit above 1"),
    "lr_cycle_decay": (lambda c: c.lr_cycle_limit > 1, "--lr-cycle-limit above 1"),
    "patience_epochs": (lambda c: c.sched == "plateau", "--sched plateau"),
    "torchcompile_mode": (lambda c: bool(c.torchcompile), "--torchcompile"),
    "fuser": (lambda c: c.torchscript, "--torchscript (it picks TorchScript's fuser)"),
    "model_ema_decay": (lambda c: c.model_ema, "--model-ema"),
    "model_ema_warmup": (lambda c: c.model_ema, "--model-ema"),
    "model_ema_force_cpu": (lambda c: c.model_ema, "--model-ema"),
}


def no_effect_notes(config: TrainConfig) -> list[str]:
    """One line per flag set that changes nothing for this model or this data."""
    defaults = TrainConfig()
    notes = [
        f"--{key.replace('_', '-')} has no effect: {why}"
        for key, why in NO_EFFECT.items()
        if getattr(config, key) != getattr(defaults, key)
    ]
    for key, (needed, why) in NEEDS.items():
        if getattr(config, key) != getattr(defaults, key) and not needed(config):
            notes.append(f"--{key.replace('_', '-')} has no effect without {why}")
    if (info := optimizer_info(config.opt)) is not None:  # timm leaves out what the optimizer does not take
        for flag, value, taken in (
            ("--opt-betas", config.opt_betas, info.has_betas),
            ("--opt-eps", config.opt_eps, info.has_eps),
        ):
            if value is not None and not taken:
                notes.append(f"{flag} has no effect: --opt {config.opt} takes no {flag.removeprefix('--opt-')}")
    source, _ = _dataset_source(config)
    unused = unused_data_flags(
        source,
        num_samples=config.train_num_samples or config.val_num_samples,
        repeats=config.epoch_repeats,
        input_key=config.input_key,
        target_key=config.target_key,
        trust_remote_code=config.dataset_trust_remote_code,
    )
    return notes + [
        f"{flag} has no effect on {source or 'the built-in digits'}: it is for streamed datasets" for flag in unused
    ]


@contextlib.contextmanager
def _stops_logged(context: DistributedContext, output: Path) -> Iterator[None]:
    """Log why a run stopped before its end, a non-finite loss or an interruption, and what it leaves to go on from:
    the checkpoint to resume from, or (none written yet) the same command again."""
    last = output / "last.pth.tar"
    again = "no checkpoint was written yet: the same command starts the run again"
    try:
        yield
    except NonFiniteLossError as error:
        # The folder held no run before this one (or the resumed one): its last.pth.tar is of the epoch before.
        kept = f"the last good checkpoint is kept: {last} (epoch {error.epoch - 1})" if last.is_file() else again
        if context.is_primary:  # every process stops on the same loss (it is all-reduced): one line says so
            _logger.error("stopping: %s; %s. Lower --lr, set --clip-grad, or check the data.", error, kept)
        raise
    except KeyboardInterrupt:
        if context.is_primary:
            _logger.error("interrupted; %s", f"continue with --resume {last}" if last.is_file() else again)
        raise


def build_data(config: TrainConfig, context: DistributedContext) -> TrainingData:
    """The splits, checked before any model is built, their loaders, mixup and loss (transforms: `set_transforms`)."""
    train_set, val_set, num_classes = read_datasets(config, context)
    loader_options = dict(
        pin_memory=True if config.pin_mem else None,  # None: pinned when CUDA is there, as without the flag
        persistent_workers=config.use_multi_epochs_loader,
        worker_seeding=config.worker_seeding,
    )
    # --aug-splits: each image as a clean copy and augmented ones (timm's AugMixDataset), the splits one after another
    # in the batch, as JsdCrossEntropy reads them.
    splits = SplitsDataset(train_set, num_splits=config.aug_splits) if config.aug_splits else None
    train_loader = create_loader(
        splits or train_set,
        config.batch_size,
        config.workers,
        shuffle=True,
        distributed=context.distributed,
        drop_last=True,
        collate_fn=collate_splits if splits else None,
        repeats=config.aug_repeats,
        **loader_options,
    )
    if not isinstance(train_set, IterableDataset) and not len(train_loader):
        # timm's --aug-repeats sampler gives each process a whole number of 256-image blocks, fewer than the split.
        images = len(train_loader.sampler)
        raise UsageError(
            f"--aug-repeats {config.aug_repeats} gives each process {images} images an epoch, fewer than one batch of "
            f"{config.batch_size}: lower -b/--batch-size to {images} or less"
        )
    val_loader = create_loader(
        val_set, config.validation_batch_size, config.workers, distributed=context.distributed, **loader_options
    )
    mixup, criterion = training_loss(config, num_classes)
    source, _ = _dataset_source(config)
    return TrainingData(train_set, val_set, train_loader, val_loader, num_classes, source, criterion, mixup)


class SplitsDataset(AugMixDataset):
    """timm's AugMixDataset, passing on the None that our datasets give for an unreadable image (skipped in
    `collate_splits`, as the plain loader skips it)."""

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], int] | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        image, target = sample
        augmented = [self._normalize(self.augmentation(image)) for _ in range(self.num_splits - 1)]
        return (self._normalize(image), *augmented), target


def collate_splits(
    batch: list[tuple[tuple[torch.Tensor, ...], int] | None],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A batch of --aug-splits copies: split 0 of every image, then split 1, ...; the targets repeated to match."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    splits = len(batch[0][0])
    images = torch.cat([torch.stack([item[0][k] for item in batch]) for k in range(splits)])
    return images, torch.tensor([item[1] for item in batch]).repeat(splits)


def read_datasets(config: TrainConfig, context: DistributedContext) -> tuple[Dataset, Dataset, int]:
    """The training and held-out splits and the class count, refused in one line when they do not fit the flags."""
    source, data_dir = _dataset_source(config)
    # The built-in digits are upscaled once, straight to the input size (8 -> 16 px), not twice through a 32 px copy.
    digits_size = config.input_size[-1] if config.input_size else config.img_size or 32
    common = dict(
        data_dir=data_dir,
        download=config.dataset_download,
        img_size=digits_size,
        class_map=config.class_map or None,
        input_img_mode=None if config.image_mode == "RGB" else config.image_mode,
        input_key=config.input_key,
        target_key=config.target_key,
        trust_remote_code=config.dataset_trust_remote_code,
    )
    train_set = build_dataset(
        source,
        config.train_split,
        train=True,
        batch_size=config.batch_size,
        seed=config.seed,
        num_samples=config.train_num_samples,
        repeats=config.epoch_repeats,
        **common,
    )
    val_set = build_dataset(source, config.val_split, num_samples=config.val_num_samples, **common)
    if list(train_set.classes) != list(val_set.classes):
        only = sorted(set(train_set.classes) ^ set(val_set.classes))[:5]
        raise UsageError(
            f"the {config.train_split} and {config.val_split} splits have different classes "
            f"({len(train_set.classes)} vs {len(val_set.classes)}; in one split only: {', '.join(only) or 'none'})"
        )
    found = len(train_set.classes)
    num_classes = config.num_classes or found
    if not num_classes:
        raise UsageError(f"--dataset {source}: its labels name no classes; pass --num-classes")
    if found and num_classes != found:
        # A larger head trains classes no image has; a smaller one cannot hold the labels.
        raise UsageError(f"--num-classes {num_classes}, but the {config.train_split} split has {found} classes")
    if num_classes < 2:
        raise UsageError(f"the {config.train_split} split has one class: a classifier needs at least two")
    # drop_last: a split smaller than one global batch would train on nothing and fail mid-run.
    global_batch = config.batch_size * context.world_size
    # A streamed set (timm's readers) pads every process's share to whole batches instead.
    if not isinstance(train_set, IterableDataset) and len(train_set) < global_batch:
        raise UsageError(
            f"the {config.train_split} split has {len(train_set)} images, fewer than one batch of {global_batch} "
            f"({config.batch_size} x {context.world_size} process(es)); lower -b/--batch-size"
        )
    return train_set, val_set, num_classes


def training_loss(config: TrainConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's mixup / cutmix when either is on, and the loss that fits, chosen as timm's train.py chooses: JSD over
    augmentation splits, BCE, soft-target or label-smoothed cross-entropy, or plain."""
    bce = dict(target_threshold=config.bce_target_thresh, sum_classes=config.bce_sum, pos_weight=config.bce_pos_weight)
    mixup = None
    if config.mixup > 0 or config.cutmix > 0 or config.cutmix_minmax is not None:
        mixup = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            cutmix_minmax=config.cutmix_minmax,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            mode=config.mixup_mode,
            label_smoothing=config.smoothing,
            num_classes=num_classes,
        )
    if config.jsd_loss:
        return mixup, JsdCrossEntropy(num_splits=config.aug_splits, smoothing=config.smoothing)
    if mixup is not None:  # the smoothing is in mixup's soft targets
        return mixup, BinaryCrossEntropy(**bce) if config.bce_loss else SoftTargetCrossEntropy()
    if config.bce_loss:
        return None, BinaryCrossEntropy(smoothing=config.smoothing, **bce)
    return None, LabelSmoothingCrossEntropy(smoothing=config.smoothing) if config.smoothing else nn.CrossEntropyLoss()


def set_transforms(data: TrainingData, model: nn.Module, config: TrainConfig) -> None:
    """The model's preprocessing on both splits, timm's augmentations on the training one."""
    # Validation resizes with --interpolation, training with --train-interpolation.
    overrides = input_overrides(config, "interpolation")
    channels = image_channels(config.image_mode)
    if channels != 3:
        model_input = data_config(model, **overrides)
        overrides["input_size"] = (channels, *model_input["input_size"][1:])
        overrides["mean"] = config.mean or per_channel(model_input["mean"], channels)
        overrides["std"] = config.std or per_channel(model_input["std"], channels)
    # The loader's dataset: the training split, or its --aug-splits wrapper, which takes timm's three-part transform.
    data.train_loader.dataset.transform = create_transform(
        model,
        train=True,
        **overrides,
        interpolation=config.train_interpolation,
        no_aug=config.no_aug,
        scale=tuple(config.scale),
        ratio=tuple(config.ratio),
        hflip=config.hflip,
        vflip=config.vflip,
        color_jitter=config.color_jitter,
        auto_augment=config.aa,
        re_prob=config.reprob,
        re_mode=config.remode,
        re_count=config.recount,
        separate=config.aug_splits > 0,
        re_num_splits=config.aug_splits if config.resplit else 0,
        **{
            key: getattr(config, key)
            for key in ("train_crop_mode", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob")
            if getattr(config, key) is not None
        },
    )
    data.val_set.transform = create_transform(model, train=False, interpolation=config.interpolation, **overrides)
    # What the run evaluates at and on becomes the model's own, so every checkpoint records it (`record_of`).
    evaluated = data_config(model, interpolation=config.interpolation, **overrides)
    model.pretrained_cfg.update({key: evaluated[key] for key in RECORD_INPUT_KEYS})
    # The run's weights are its own: not the EMA or the average its --initial-checkpoint may have held.
    model.pretrained_cfg.update(ema=False, averaged_from=[])
    if data.train_set.classes:
        model.pretrained_cfg["label_names"] = [str(c) for c in data.train_set.classes]


def per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Statistics for `channels` channels: as given when they count that many (a grayscale model's own), else their
    mean for each (ImageNet's RGB statistics for a grayscale input)."""
    return tuple(values) if len(values) == channels else (sum(values) / len(values),) * channels


def build_state(config: TrainConfig, run_state: RunState, data: TrainingData) -> TrainState:
    """The model and its optimizer, gradient scaler, EMA and schedule, restored from `resumed` (--resume) if any."""
    # The same initial weights on every rank, so that each rank's EMA copy starts equal too.
    seed_epoch(config.seed, -1, 0)
    model = build_training_model(config, data.num_classes)
    set_transforms(data, model, config)
    device = run_state.context.device
    model.to(device, dtype=input_dtype(config), memory_format=memory_format(config))
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=config), **(config.opt_kwargs or {}))
    except TypeError as error:  # an argument the optimizer does not take
        raise UsageError(f"--opt-kwargs: {error}") from None
    float16 = config.amp and amp_dtype(device, config.amp_dtype) == torch.float16
    scaler = NativeScaler(device=device.type) if float16 else None
    ema = None
    if config.model_ema:
        ema = ModelEmaV3(
            model,
            decay=config.model_ema_decay,
            use_warmup=config.model_ema_warmup,
            device=torch.device("cpu") if config.model_ema_force_cpu else None,
        )
    updates_per_epoch = math.ceil(len(data.train_loader) / config.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        **scheduler_kwargs(config, decreasing_metric=config.eval_metric == "loss"),
        updates_per_epoch=updates_per_epoch,
    )
    class_names = [str(c) for c in data.train_set.classes]
    state = TrainState(model, optimizer, scheduler, scaler, ema, num_epochs, class_names=class_names)
    set_start(config, run_state, state, updates_per_epoch)
    return state


def set_start(config: TrainConfig, run_state: RunState, state: TrainState, updates_per_epoch: int) -> None:
    """Put `state` where the run starts: the resumed checkpoint's next epoch, or --start-epoch, the schedule with it."""
    resumed = run_state.resumed
    if resumed is not None:
        restore(state, resumed, config.resume, not config.no_resume_opt)
    if config.start_epoch is not None:
        # As timm's train.py: the updates of the epochs before, for a per-update schedule and the EMA's warm-up.
        state.epoch = config.start_epoch
        state.num_updates = config.start_epoch * updates_per_epoch
    # --resume auto leaves a run whose schedule has ended as it is, rather than refuse it: restarting a finished job
    # is no error.
    if state.epoch >= state.num_epochs and not (resumed is not None and run_state.auto_resume):
        raise UsageError(
            f"the schedule ended at epoch {state.num_epochs - 1} (epochs 0-{state.num_epochs - 1}: --epochs "
            f"{config.epochs}{f' + --cooldown-epochs {config.cooldown_epochs}' if config.cooldown_epochs else ''}) "
            f"and the run would start at epoch {state.epoch}; raise --epochs"
        )
    state.history = [row for row in state.history if row["epoch"] < state.epoch]
    if state.scheduler is not None and state.epoch > 0:
        # timm's schedulers are functions of time: set the learning rate for where the run resumes.
        if config.sched_on_updates:
            state.scheduler.step_update(state.num_updates)
        else:
            state.scheduler.step(state.epoch)


def run_epochs(config: TrainConfig, run_state: RunState, data: TrainingData, state: TrainState) -> dict[str, Any]:
    """Train, evaluate and checkpoint each epoch left in the schedule; returns the last row with the best and skips."""
    context = run_state.context
    train_model = training_module(state.model, config, context)
    run_state.title = f"{config.model} on {data.source or 'digits'}"
    if context.is_primary:
        start_output(config, run_state, data, state)
        if state.epoch < state.num_epochs:  # a finished run under --resume auto trains, and tracks, nothing
            tracking = {name: getattr(config, name) for name in TRACKING_OPTIONS}
            run_state.tracker = RunTracker.open(run_state.output, config.as_dict(), state.epoch, **tracking)
    row: dict[str, Any] = state.history[-1] if state.history else {}
    with run_state.tracker or contextlib.nullcontext():  # closed at the end; an error marks the W&B run failed
        for epoch in range(state.epoch, state.num_epochs):
            state.epoch = epoch
            train_loss, metrics = run_epoch(config, run_state, data, state, train_model)
            row = record_epoch(config, run_state, state, train_loss, metrics) or row
    skipped = sum(images_skipped(dataset, context) for dataset in (data.train_set, data.val_set))
    if skipped and context.is_primary:
        _logger.warning("%d unreadable image(s) were skipped (see the warnings above)", skipped)
    return {**row, "best_metric": state.best_metric, "best_epoch": state.best_epoch, "num_skipped": skipped}


def images_skipped(dataset: Dataset, context: DistributedContext) -> int:
    """The unreadable images of `dataset` that any process met, each once: a process's share of the images changes
    from epoch to epoch, so the processes' counts would add up the same image."""
    skipped = getattr(dataset, "skipped", None)
    if skipped is None:  # the digits, streamed sets: their count is the processes' sum
        return all_reduce_sum(getattr(dataset, "num_skipped", 0), context)
    return int(all_reduce_max(skipped.mask, context).sum())


def training_module(model: nn.Module, config: TrainConfig, context: DistributedContext) -> nn.Module:
    """What the training steps call: the model, under DDP when distributed, compiled when --torchcompile asks."""
    if config.torchscript:  # the scripted module shares the model's parameters: checkpoints keep the plain model
        if config.fuser:
            set_jit_fuser(config.fuser)
        model = torch.jit.script(model)
    if context.distributed:
        device = context.device
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=not config.no_ddp_bb
        )
    # After DDP, as timm does, so that its gradient buckets are compiled too; checkpoints keep the plain model.
    return compile_model(model, config.torchcompile, config.torchcompile_mode) if config.torchcompile else model


def start_output(config: TrainConfig, run_state: RunState, data: TrainingData, state: TrainState) -> None:
    """Rank 0's start: args.yaml, the files a run stopped right after its last.pth.tar left out, and what comes."""
    output, resumed = run_state.output, run_state.resumed
    output.mkdir(parents=True, exist_ok=True)
    (output / "args.yaml").write_text(yaml.safe_dump(config.as_dict(), sort_keys=False))
    history = state.history
    # A run stopped (killed, preempted) between last.pth.tar and the files written after it: complete them. Not from
    # recovery.pth.tar: it holds the next epoch's weights mid-way, under this epoch's number.
    if resumed is not None and not resumed.get("recovery") and history and history[-1]["epoch"] == resumed["epoch"]:
        save_epoch_files(config, run_state, resumed, history, is_best=resumed["best_epoch"] == resumed["epoch"])
    if state.epoch >= state.num_epochs:  # only a finished run under --resume auto (`set_start`)
        _logger.info(
            "--resume auto: the run finished at epoch %d, the last of its schedule; nothing to train", state.epoch - 1
        )
        return
    if config.sched != "none" and config.warmup_epochs + config.cooldown_epochs >= config.epochs:
        _logger.warning(
            "--epochs %d with --warmup-epochs %d and --cooldown-epochs %d: the schedule runs %d epochs, most of them "
            "warming up to --lr or cooling down at --min-lr (lower those, or raise --epochs)",
            config.epochs,
            config.warmup_epochs,
            config.cooldown_epochs,
            state.num_epochs,
        )
    _logger.info(
        "training %s (%d classes, input %s) on %s: %d train / %d held-out images, epochs %d-%d (counted from 0 "
        "as in summary.csv and checkpoint-EPOCH.pth.tar), %d process(es) on %s; output in %s",
        config.model,
        data.num_classes,
        "x".join(map(str, state.model.pretrained_cfg["input_size"])),  # what `set_transforms` made the model's
        data.source or "the built-in digits",
        len(data.train_set),
        len(data.val_set),
        state.epoch,
        state.num_epochs - 1,
        run_state.context.world_size,
        run_state.context.device,
        output,
    )


def run_epoch(
    config: TrainConfig, run_state: RunState, data: TrainingData, state: TrainState, train_model: nn.Module
) -> tuple[float, dict[str, float]]:
    """Train epoch `state.epoch`, seeded to replay exactly after a resume, and evaluate; returns loss and metrics."""
    epoch, context = state.epoch, run_state.context
    seed_epoch(config.seed, epoch, context.rank)
    if isinstance(data.train_set, IterableDataset):
        data.train_set.set_epoch(epoch)  # the shard shuffle of timm's streamed readers
    elif hasattr(data.train_loader.sampler, "set_epoch"):  # DDP's, or --aug-repeats' (in one process too)
        data.train_loader.sampler.set_epoch(epoch)
    if data.mixup is not None and config.mixup_off_epoch and epoch >= config.mixup_off_epoch:
        data.mixup.mixup_enabled = False
    train_loss = train_one_epoch(config, run_state, data, state, train_model)
    if (epoch + 1) % config.val_interval and epoch + 1 < state.num_epochs:
        return train_loss, {}  # --val-interval: not evaluated (nor checkpointed) this epoch
    models = {"": state.model} | ({"ema_": state.ema.module} if evaluates_ema(config) else {})
    metrics = {}
    for prefix, model in models.items():
        label = (
            "" if config.no_progress or not context.is_primary else f"held-out, epoch {epoch}{' (EMA)' * bool(prefix)}"
        )
        scores = evaluate(
            model,
            data.val_loader,
            context.device,
            config.amp,
            config.amp_dtype,
            context.distributed,
            progress=label,
            tta=config.tta,
            input_dtype=input_dtype(config),
        )
        metrics.update({f"{prefix}{key}": value for key, value in scores.items()})
    return train_loss, metrics


def evaluates_ema(config: TrainConfig) -> bool:
    """Whether the EMA is evaluated each epoch: not when --model-ema-force-cpu keeps it off the batches' device."""
    return config.model_ema and not config.model_ema_force_cpu


def record_epoch(
    config: TrainConfig, run_state: RunState, state: TrainState, train_loss: float, metrics: dict[str, float]
) -> dict[str, Any]:
    """The epoch's summary row (returned), the schedule stepped, the best updated; rank 0 saves and logs the epoch.

    An epoch --val-interval leaves unevaluated (no metrics) steps the schedule only, as timm's train.py."""
    epoch, output = state.epoch, run_state.output
    if not metrics:
        if state.scheduler is not None:
            state.scheduler.step(epoch + 1, None)
        if run_state.context.is_primary:
            _logger.info(
                "epoch %d/%d  train loss %.4f  (not evaluated: --val-interval %d)",
                epoch,
                state.num_epochs - 1,
                train_loss,
                config.val_interval,
            )
        return {}
    row = dict(
        epoch=epoch,
        train_loss=round(train_loss, 6),
        eval_loss=round(metrics["loss"], 6),
        eval_top1=round(metrics["top1"], 4),
        eval_top5=round(metrics["top5"], 4),
        lr=_current_lr(state.optimizer),  # the rate this epoch ended at (timm's summary), before the next is set
    )
    ema_scored = "ema_loss" in metrics
    if ema_scored:
        row.update(
            ema_eval_loss=round(metrics["ema_loss"], 6),
            ema_eval_top1=round(metrics["ema_top1"], 4),
            ema_eval_top5=round(metrics["ema_top5"], 4),
        )
    # The EMA's metric picks model_best when it is evaluated, as in timm's train.py; the log says so.
    metric = metrics[f"{'ema_' if ema_scored else ''}{config.eval_metric}"]
    if state.scheduler is not None:
        state.scheduler.step(epoch + 1, metric)
    state.history.append(row)
    best = state.best_metric
    is_best = best is None or (metric < best if config.eval_metric == "loss" else metric > best)
    if is_best:
        state.best_metric, state.best_epoch = metric, epoch
    if run_state.context.is_primary:
        if run_state.tracker is not None:
            # Before last.pth.tar: a run killed between the two replays this epoch, and it is counted once.
            run_state.tracker.log_epoch(row)
        ckpt = checkpoint_dict(state, config.as_dict())
        atomic_save(ckpt, output / "last.pth.tar")
        save_epoch_files(config, run_state, ckpt, state.history, is_best=is_best)
        ema = (
            f"  EMA: loss {metrics['ema_loss']:.4f}  top-1 {metrics['ema_top1']:.2f}  top-5 {metrics['ema_top5']:.2f}"
            if ema_scored
            else ""
        )
        _logger.info(
            "epoch %d/%d  train loss %.4f  held-out loss %.4f  top-1 %.2f  top-5 %.2f%s  lr %.2e%s",
            epoch,
            state.num_epochs - 1,
            train_loss,
            metrics["loss"],
            metrics["top1"],
            metrics["top5"],
            ema,
            row["lr"],
            f"  (best{' by the EMA' if ema_scored else ''})" if is_best else "",
        )
    return row


def run(args: argparse.Namespace) -> int:
    """`sequencer train`: `train` with the command line's flags, then the held-out top-1; returns the exit code."""
    start = time.perf_counter()
    # torchrun's rank of this process, as the process group will give it: only rank 0 logs progress and prints.
    primary = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if primary else logging.WARNING, format="%(message)s")
    try:
        result = train(TrainConfig(**{key: value for key, value in vars(args).items() if key != "command"}))
    except NonFiniteLossError:
        return 1
    except KeyboardInterrupt:
        return 130
    if primary and "eval_top1" in result:
        ema = f", EMA {result['ema_eval_top1']:.2f}%" if "ema_eval_top1" in result else ""
        best_of = " of the EMA (validate it with --use-ema)" if ema else ""
        print(
            f"held-out top-1 {result['eval_top1']:.2f}%{ema} (top-5 {result['eval_top5']:.2f}%) after epoch "
            f"{result['epoch']}; best {args.eval_metric}{best_of} {result['best_metric']:.2f} at epoch "
            f"{result['best_epoch']} (model_best.pth.tar); {time.perf_counter() - start:.1f} s; output in "
            f"{result['output']}"
        )
    return 0
