"""The flags of `sequencer train`, torch-free: the command's parser is built from them (`sequencer.commands.train`),
and the library's `sequencer.train.train` takes them as keyword arguments, the ones a caller leaves out at these
defaults."""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

from sequencer.choices import (
    CLIP_MODES,
    DIGITS_RECIPE,
    ERASING_MODES,
    EVAL_METRICS,
    IMPLEMENTATIONS,
    LR_BASE_SCALES,
    MIXUP_MODES,
    SCHEDULERS,
    TIMM_RECIPE,
    TRAIN_INTERPOLATIONS,
)
from sequencer.errors import UsageError
from sequencer.options import (
    add_compile_options,
    add_dataset_options,
    add_input_options,
    add_model_options,
    add_output_option,
    add_runtime_options,
    apply_config,
    as_parsed,
    bounded,
)


def _recipe_help(key: str) -> str:
    return f" (default: {TIMM_RECIPE[key]}; digits demo: {DIGITS_RECIPE[key]})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """timm's train.py flags (those the paper's recipes and this trainer use), with timm's meanings."""
    demo = ", ".join(f"{k}={v}" for k, v in DIGITS_RECIPE.items())
    parser.epilog = (
        f"Without DATA (the digits demo) the defaults are {demo}; with data, the authors' train.py (timm 0.5.4) "
        "defaults apply "
        f"(model {TIMM_RECIPE['model']}, batch {TIMM_RECIPE['batch_size']}). Multi-GPU or multi-node: "
        "torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m sequencer train "
        "...; restartable (preemptible machines, SLURM): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun "
        "--max-restarts K ... -m sequencer train ... --output DIR --resume auto"
    )
    parser.add_argument(
        "-c",
        "--config",
        default="",
        metavar="YAML",
        help="take the flags from this file (a run's args.yaml, as timm's train.py writes); the command line wins",
    )
    data = add_dataset_options(
        parser, "dataset root with train/<class>/* and val/<class>/*; none: the built-in digits demo"
    )
    data.add_argument("--train-split", default="train", help="training split")
    data.add_argument("--val-split", default="validation", help="held-out split (val/ or validation/ folder)")

    add_model_options(parser, default_model=None)
    model = parser.add_argument_group("model (training)")
    model.add_argument(
        "--initial-checkpoint",
        dest="checkpoint",
        help="start from these weights (same as --checkpoint); a head of another size is re-initialised",
    )
    model.add_argument("--pretrained", action="store_true", help="start from the released ImageNet weights")
    model.add_argument(
        "--resume",
        default="",
        metavar="PATH|auto",
        help="continue a run from its last.pth.tar: its weights, optimizer state, EMA and epoch; the schedule and "
        "every other setting follow these flags (model, classes, input size, optimizer and layer decay must match). "
        "auto: -o/--output's last.pth.tar when there is one, else a new run there, so that one unchanged command "
        "serves every restart (torchrun --max-restarts, a requeued job)",
    )
    model.add_argument("--no-resume-opt", action="store_true", help="with --resume, do not restore optimizer state")
    model.add_argument("--start-epoch", type=int, default=None, help="epoch to start at (default: 0 or resumed)")
    model.add_argument("--drop", type=bounded(float, min=0, max=1), default=0.0, help="dropout rate")
    model.add_argument(
        "--drop-path", type=bounded(float, min=0, max=1), default=0.0, help="stochastic depth rate (linear over blocks)"
    )
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    model.add_argument(
        "--rnn-impl",
        choices=IMPLEMENTATIONS,
        default="auto",
        help="how the mixers run their recurrences: auto picks per device, and for CPU training by timing both paths "
        "at the first step, so two launches may round differently; reference (nn.LSTM) or fused pins it, for runs "
        "that must match bit for bit",
    )
    add_input_options(parser)
    add_runtime_options(parser)
    add_compile_options(parser)
    parser.set_defaults(batch_size=None, workers=None)
    parser.add_argument(
        "-vb", "--validation-batch-size", type=bounded(int, min=1), default=None, help="default: --batch-size"
    )

    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--opt", default=None, help="timm optimizer name: adamw, sgd, lamb, ..." + _recipe_help("opt"))
    opt.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    opt.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    opt.add_argument("--momentum", type=bounded(float, min=0, max=1), default=0.9, help="SGD momentum")
    opt.add_argument(
        "--weight-decay", type=bounded(float, min=0), default=None, help="weight decay" + _recipe_help("weight_decay")
    )
    opt.add_argument(
        "--clip-grad", type=bounded(float, above=0), default=None, help="clip gradients at this norm (value, agc)"
    )
    opt.add_argument("--clip-mode", default="norm", choices=CLIP_MODES, help="gradient clipping mode")
    opt.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning-rate decay")

    sched = parser.add_argument_group("learning-rate schedule")
    sched.add_argument("--sched", default="cosine", choices=SCHEDULERS, help="timm scheduler")
    sched.add_argument(
        "--sched-on-updates",
        action="store_true",
        default=None,
        help="step the schedule every update, not every epoch" + _recipe_help("sched_on_updates"),
    )
    sched.add_argument(
        "--lr",
        type=bounded(float, min=0),  # 0 is legitimate: a run that only checks loading or evaluates
        default=None,
        help=f"learning rate (default: --lr-base scaled by the global batch; digits demo: {DIGITS_RECIPE['lr']})",
    )
    sched.add_argument(
        "--lr-base", type=bounded(float, min=0), default=0.1, help="learning rate at --lr-base-size images per step"
    )
    sched.add_argument("--lr-base-size", type=bounded(int, min=1), default=256, help="global batch size of --lr-base")
    sched.add_argument(
        "--lr-base-scale",
        default="",
        choices=LR_BASE_SCALES,
        help="scaling rule of --lr-base (default: sqrt for adaptive optimizers, else linear)",
    )
    sched.add_argument(
        "--warmup-lr",
        type=bounded(float, min=0),
        default=None,
        help="learning rate at the start of warm-up" + _recipe_help("warmup_lr"),
    )
    sched.add_argument(
        "--min-lr",
        type=bounded(float, min=0),
        default=None,
        help="floor of the schedule and rate of the cool-down" + _recipe_help("min_lr"),
    )
    sched.add_argument(
        "--epochs",
        type=bounded(int, min=1),
        default=None,
        help="epochs of the schedule; --cooldown-epochs more follow at --min-lr" + _recipe_help("epochs"),
    )
    sched.add_argument(
        "--warmup-epochs",
        type=bounded(int, min=0),
        default=None,
        help="linear warm-up epochs" + _recipe_help("warmup_epochs"),
    )
    sched.add_argument("--warmup-prefix", action="store_true", help="warm-up before, not within, --epochs")
    sched.add_argument(
        "--cooldown-epochs",
        type=bounded(int, min=0),
        default=None,
        help="epochs at --min-lr after the schedule, as timm 0.5.4" + _recipe_help("cooldown_epochs"),
    )
    sched.add_argument("--decay-epochs", type=float, default=100, help="step schedule: epochs between decays")
    sched.add_argument(
        "--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep schedule: epochs to decay at"
    )
    sched.add_argument("--decay-rate", type=float, default=0.1, help="step / multistep decay factor")

    aug = parser.add_argument_group("augmentation and regularisation (timm)")
    aug.add_argument("--no-aug", action="store_true", help="no training augmentation")
    aug.add_argument(
        "--scale",
        type=bounded(float, above=0, max=1),
        nargs=2,
        default=None,
        help="random-resized-crop area range" + _recipe_help("scale"),
    )
    aug.add_argument(
        "--ratio",
        type=bounded(float, above=0),
        nargs=2,
        default=[3 / 4, 4 / 3],
        help="random-resized-crop aspect range",
    )
    aug.add_argument(
        "--hflip",
        type=bounded(float, min=0, max=1),
        default=None,
        help="horizontal flip probability" + _recipe_help("hflip"),
    )
    aug.add_argument("--vflip", type=bounded(float, min=0, max=1), default=0.0, help="vertical flip probability")
    aug.add_argument(
        "--color-jitter", type=float, default=None, help="colour jitter strength" + _recipe_help("color_jitter")
    )
    aug.add_argument("--aa", default=None, help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    aug.add_argument(
        "--train-interpolation",
        default=None,
        choices=TRAIN_INTERPOLATIONS,
        help="training resize interpolation" + _recipe_help("train_interpolation"),
    )
    aug.add_argument("--reprob", type=bounded(float, min=0, max=1), default=0.0, help="random-erasing probability")
    aug.add_argument("--remode", default="pixel", choices=ERASING_MODES, help="random-erasing mode")
    aug.add_argument("--recount", type=bounded(int, min=1), default=1, help="random-erasing count")
    aug.add_argument("--mixup", type=bounded(float, min=0), default=0.0, help="mixup alpha (on when > 0)")
    aug.add_argument("--cutmix", type=bounded(float, min=0), default=0.0, help="cutmix alpha (on when > 0)")
    aug.add_argument(
        "--cutmix-minmax", type=bounded(float, above=0, max=1), nargs=2, default=None, help="cutmix box ratio range"
    )
    aug.add_argument(
        "--mixup-prob", type=bounded(float, min=0, max=1), default=1.0, help="probability of mixup or cutmix per batch"
    )
    aug.add_argument(
        "--mixup-switch-prob",
        type=bounded(float, min=0, max=1),
        default=0.5,
        help="probability of cutmix instead of mixup",
    )
    aug.add_argument("--mixup-mode", default="batch", choices=MIXUP_MODES, help="mixup granularity")
    aug.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0: never)")
    aug.add_argument("--smoothing", type=bounded(float, min=0, max=1), default=0.1, help="label smoothing")

    ema = parser.add_argument_group("model EMA")
    ema.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    ema.add_argument("--model-ema-decay", type=bounded(float, min=0, max=1), default=0.9998, help="EMA decay")
    ema.add_argument("--model-ema-warmup", action="store_true", help="ramp the EMA decay up over the first steps")
    ema.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU")

    misc = parser.add_argument_group("output")
    misc.add_argument("--seed", type=int, default=42, help="random seed (per epoch and rank)")
    add_output_option(misc, "", "output folder (default: output/train/<date>-<model>-<size>)", kind="folder")
    misc.add_argument(
        "--experiment", default="", help="sub-folder of --output for this run (without -o: output/train/NAME)"
    )
    misc.add_argument(
        "--eval-metric", default="top1", choices=EVAL_METRICS, help="metric that picks model_best.pth.tar"
    )
    misc.add_argument(
        "--checkpoint-hist",
        type=bounded(int, min=0),
        default=10,
        metavar="N",
        help="keep the N best epochs as checkpoint-EPOCH.pth.tar, ranked by --eval-metric, for `sequencer average` "
        "(0: none; default: 10, as timm)",
    )
    misc.add_argument(
        "--log-interval",
        type=bounded(int, min=1),
        default=50,
        metavar="N",
        help="every N steps, log the loss, learning rate and images/s when no progress bar is drawn (a pipe, "
        "--no-progress); the loss is read from the device and checked for NaN only then, not at every step",
    )
    misc.add_argument("--no-progress", action="store_true", help="no progress bar")


def keyword_arguments(options: dict[str, Any]) -> argparse.Namespace:
    """A run's arguments from keywords named as the flags' dests, checked as their text is; the rest at the defaults."""
    parser = argparse.ArgumentParser(prog="sequencer train", add_help=False)
    add_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    for key in options:
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"train() got an unknown keyword argument {key!r}{hint}; its keywords are the dests of `sequencer "
                "train`'s flags (batch_size for -b/--batch-size)"
            )
    if options.get("config"):  # its values become the defaults, as -c makes them
        apply_config(parser, os.fspath(options["config"]))
    values = vars(parser.parse_args([]))
    for key, value in options.items():
        if value is None or value == values[key]:
            continue  # the flag left at its default, as not naming it on the command line does (argparse reads none)
        try:
            values[key] = as_parsed(parser, actions[key], value)
        except argparse.ArgumentError as error:
            raise UsageError(f"train({key}={value!r}): {error}") from None
    # The command line's namespace names its subcommand too, and args.yaml records every key of it.
    return argparse.Namespace(command="train", **values)
