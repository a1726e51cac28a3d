"""The flags of `sequencer train` and their data-dependent recipes, torch-free: the command's parser is built from
them (`sequencer.commands.train`) and the library's `sequencer.train.train` takes them as keyword arguments, the
ones a caller leaves out at these defaults."""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

from sequencer.errors import UsageError
from sequencer.options import (
    INTERPOLATIONS,
    add_compile_options,
    add_dataset_options,
    add_input_options,
    add_model_options,
    add_output_option,
    add_runtime_options,
    apply_config,
    check_bounds,
)

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
    min_lr=0.0,
    cooldown_epochs=0,
    sched_on_updates=True,
    hflip=0.0,
    scale=(0.8, 1.0),
    color_jitter=0.0,
    train_interpolation="bicubic",
    threads=1,
)
# The authors' train.py (timm 0.5.4) defaults, which their command lines rely on (SEQUENCER.md, "Recipes"); the
# flags whose default is the same for both recipes carry it in `add_arguments`.
TIMM_RECIPE: dict[str, Any] = dict(
    model="sequencer2d_s",
    img_size=None,
    batch_size=128,
    workers=2,
    epochs=300,
    opt="sgd",
    lr=None,
    weight_decay=2e-5,
    warmup_epochs=3,
    warmup_lr=1e-4,
    min_lr=1e-6,
    cooldown_epochs=10,
    sched_on_updates=False,
    hflip=0.5,
    scale=(0.08, 1.0),
    color_jitter=0.4,
    train_interpolation="random",
    threads=None,
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
    sched.add_argument(
        "--min-lr",
        type=float,
        default=None,
        help="floor of the schedule and rate of the cool-down" + _recipe_help("min_lr"),
    )
    sched.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of the schedule; --cooldown-epochs more follow at --min-lr" + _recipe_help("epochs"),
    )
    sched.add_argument(
        "--warmup-epochs", type=int, default=None, help="linear warm-up epochs" + _recipe_help("warmup_epochs")
    )
    sched.add_argument("--warmup-prefix", action="store_true", help="warm-up before, not within, --epochs")
    sched.add_argument(
        "--cooldown-epochs",
        type=int,
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
        choices=(*INTERPOLATIONS, "random"),
        help="training resize interpolation" + _recipe_help("train_interpolation"),
    )
    aug.add_argument("--reprob", type=float, default=0.0, help="random-erasing probability")
    aug.add_argument("--remode", default="pixel", choices=("const", "rand", "pixel"), help="random-erasing mode")
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
    add_output_option(misc, "", "output folder (default: output/train/<date>-<model>-<size>)", kind="folder")
    misc.add_argument("--experiment", default="", help="sub-folder of --output for this run")
    misc.add_argument(
        "--eval-metric", default="top1", choices=["top1", "top5", "loss"], help="metric that picks model_best.pth.tar"
    )
    misc.add_argument(
        "--checkpoint-hist",
        type=int,
        default=10,
        metavar="N",
        help="keep the N best epochs as checkpoint-EPOCH.pth.tar, ranked by --eval-metric, for `sequencer average` "
        "(0: none; default: 10, as timm)",
    )
    misc.add_argument(
        "--log-interval",
        type=int,
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
    values.update({key: _flag_value(actions[key], key, value) for key, value in options.items()})
    # The command line's namespace names its subcommand too, and args.yaml records every key of it.
    args = argparse.Namespace(command="train", **values)
    check_bounds(parser, args)
    return args


def _flag_value(action: argparse.Action, key: str, value: Any) -> Any:
    """`value` as its flag's parser would give it: paths as text, each item through the flag's type and choices."""
    if value is None or value == action.default:
        # None leaves the flag out; argparse never checks a default either (--interpolation's '' is no choice).
        return action.default
    if action.nargs == 0:  # --amp, --pretrained, ...: on or off
        if not isinstance(value, bool):
            raise UsageError(f"{key}={value!r}: expected True or False")
        return value
    several = action.nargs not in (None, "?")  # nargs 2, 3 or +: a sequence, as the flag takes several words
    if several != isinstance(value, list | tuple):
        raise UsageError(f"{key}={value!r}: expected {'a list of values' if several else 'one value, not a sequence'}")
    items = list(value) if several else [value]
    count = action.nargs if isinstance(action.nargs, int) else None  # None: one or more
    if several and (len(items) != count if count else not items):
        raise UsageError(f"{key}={value!r}: expected {count or 'one or more'} values")
    converted = []
    for item in items:
        if isinstance(item, os.PathLike):
            item = os.fspath(item)
        if action.type is not None:
            try:
                item = action.type(str(item))
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"{key}={value!r}: {error}") from None
            except (TypeError, ValueError):
                raise UsageError(f"{key}={value!r}: invalid {getattr(action.type, '__name__', '')} value") from None
        if action.choices is not None and item not in action.choices:
            raise UsageError(f"{key}={item!r}: expected one of {', '.join(map(repr, action.choices))}")
        converted.append(item)
    return converted if several else converted[0]
