"""`TrainConfig`: every flag of `sequencer train` as a field, with its default, range and help once. The command's
parser is built from these fields (`add_arguments`), `sequencer.train.train` takes the config (or its fields as
keywords), and a run's args.yaml is the config written out (`TrainConfig.as_dict`) and read back (`from_yaml`).

The flags are timm's train.py's, with its meanings; those whose default depends on the data (None here) take the
digits demo's without DATA and the authors' train.py (timm 0.5.4) defaults with it (`sequencer.choices`).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from sequencer.choices import (
    CLIP_MODES,
    DIGITS_NAMES,
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
from sequencer.config import (
    Compilation,
    DatasetSource,
    InputOverrides,
    KeyValues,
    ModelSource,
    Runtime,
    add_fields,
    bounded,
    option,
    option_names,
    parser_of,
    read_config_file,
    writable_path,
)
from sequencer.errors import UsageError


def _recipe(key: str) -> str:
    return f" (default: {TIMM_RECIPE[key]}; digits demo: {DIGITS_RECIPE[key]})"


@dataclass(frozen=True)
class TrainConfig(Compilation, Runtime, InputOverrides, ModelSource, DatasetSource):
    """The flags of `sequencer train` (`sequencer train --help` says what each does), keyword by dest."""

    # The groups shared with the other commands, with train's own defaults.
    data: str | None = option(
        "data",
        nargs="?",
        metavar="DATA",
        group="data",
        help="dataset root with train/<class>/* and val/<class>/*; none: the built-in digits demo",
    )
    model: str | None = option("--model", group="model", help="model name (see `sequencer summary`)" + _recipe("model"))
    checkpoint: str = option(
        "--initial-checkpoint",
        "--checkpoint",
        default="",
        group="model",
        help="start from these weights; a head of another size is re-initialised",
    )
    batch_size: int | None = option(
        "-b",
        "--batch-size",
        type=bounded(int, min=1),
        group="runtime",
        help="batch size per process" + _recipe("batch_size"),
    )
    workers: int | None = option(
        "-j",
        "--workers",
        type=bounded(int, min=0),
        group="runtime",
        help="data-loading worker processes" + _recipe("workers"),
    )

    config: str = option(
        "-c",
        "--config",
        default="",
        metavar="YAML",
        group="data",
        help="take the flags from this file (a run's args.yaml, as timm's train.py writes); the command line wins",
    )
    train_split: str = option("--train-split", default="train", group="data", help="training split")
    val_split: str = option(
        "--val-split", default="validation", group="data", help="held-out split (val/ or validation/ folder)"
    )

    pretrained: bool = option(
        "--pretrained",
        default=False,
        action="store_true",
        group="model",
        help="start from the released ImageNet weights",
    )
    resume: str = option(
        "--resume",
        default="",
        metavar="PATH|auto",
        group="model",
        help="continue a run from its last.pth.tar: its weights, optimizer state, EMA and epoch; the schedule and "
        "every other setting follow these flags (model, classes, input size, optimizer and layer decay must match). "
        "auto: -o/--output's last.pth.tar when there is one, else a new run there, so that one unchanged command "
        "serves every restart (torchrun --max-restarts, a requeued job)",
    )
    no_resume_opt: bool = option(
        "--no-resume-opt",
        default=False,
        action="store_true",
        group="model",
        help="with --resume, do not restore optimizer state",
    )
    start_epoch: int | None = option(
        "--start-epoch", type=int, group="model", help="epoch to start at (default: 0 or resumed)"
    )
    drop: float = option("--drop", default=0.0, type=bounded(float, min=0, max=1), group="model", help="dropout rate")
    drop_path: float = option(
        "--drop-path",
        default=0.0,
        type=bounded(float, min=0, max=1),
        group="model",
        help="stochastic depth rate (linear over blocks)",
    )
    grad_checkpointing: bool = option(
        "--grad-checkpointing",
        default=False,
        action="store_true",
        group="model",
        help="recompute activations to save memory",
    )
    rnn_impl: str = option(
        "--rnn-impl",
        default="auto",
        choices=IMPLEMENTATIONS,
        group="model",
        help="how the mixers run their recurrences: auto is nn.LSTM in eager mode and the rnn2d op under "
        "--torchcompile; fused is the CPU path that trains faster at larger batches (BENCHMARKS.md)",
    )
    validation_batch_size: int | None = option(
        "-vb", "--validation-batch-size", type=bounded(int, min=1), group="runtime", help="default: --batch-size"
    )

    opt: str | None = option(
        "--opt", group="optimizer", help="timm optimizer name: adamw, sgd, lamb, ..." + _recipe("opt")
    )
    opt_eps: float | None = option("--opt-eps", type=float, group="optimizer", help="optimizer epsilon")
    opt_betas: tuple[float, ...] | None = option(
        "--opt-betas", type=float, nargs="+", group="optimizer", help="optimizer betas"
    )
    momentum: float = option(
        "--momentum", default=0.9, type=bounded(float, min=0, max=1), group="optimizer", help="SGD momentum"
    )
    weight_decay: float | None = option(
        "--weight-decay", type=bounded(float, min=0), group="optimizer", help="weight decay" + _recipe("weight_decay")
    )
    clip_grad: float | None = option(
        "--clip-grad",
        type=bounded(float, above=0),
        group="optimizer",
        help="clip gradients at this norm (value, agc)",
    )
    clip_mode: str = option(
        "--clip-mode", default="norm", choices=CLIP_MODES, group="optimizer", help="gradient clipping mode"
    )
    layer_decay: float | None = option(
        "--layer-decay", type=float, group="optimizer", help="layer-wise learning-rate decay"
    )

    sched: str = option(
        "--sched", default="cosine", choices=SCHEDULERS, group="learning-rate schedule", help="timm scheduler"
    )
    sched_on_updates: bool | None = option(
        "--sched-on-updates",
        action="store_true",
        group="learning-rate schedule",
        help="step the schedule every update, not every epoch" + _recipe("sched_on_updates"),
    )
    lr: float | None = option(
        "--lr",
        type=bounded(float, min=0),  # 0 is legitimate: a run that only checks loading or evaluates
        group="learning-rate schedule",
        help=f"learning rate (default: --lr-base scaled by the global batch; digits demo: {DIGITS_RECIPE['lr']})",
    )
    lr_base: float = option(
        "--lr-base",
        default=0.1,
        type=bounded(float, min=0),
        group="learning-rate schedule",
        help="learning rate at --lr-base-size images per step",
    )
    lr_base_size: int = option(
        "--lr-base-size",
        default=256,
        type=bounded(int, min=1),
        group="learning-rate schedule",
        help="global batch size of --lr-base",
    )
    lr_base_scale: str = option(
        "--lr-base-scale",
        default="",
        choices=LR_BASE_SCALES,
        group="learning-rate schedule",
        help="scaling rule of --lr-base (default: sqrt for adaptive optimizers, else linear)",
    )
    warmup_lr: float | None = option(
        "--warmup-lr",
        type=bounded(float, min=0),
        group="learning-rate schedule",
        help="learning rate at the start of warm-up" + _recipe("warmup_lr"),
    )
    min_lr: float | None = option(
        "--min-lr",
        type=bounded(float, min=0),
        group="learning-rate schedule",
        help="floor of the schedule and rate of the cool-down" + _recipe("min_lr"),
    )
    epochs: int | None = option(
        "--epochs",
        type=bounded(int, min=1),
        group="learning-rate schedule",
        help="epochs of the schedule; --cooldown-epochs more follow at --min-lr" + _recipe("epochs"),
    )
    warmup_epochs: int | None = option(
        "--warmup-epochs",
        type=bounded(int, min=0),
        group="learning-rate schedule",
        help="linear warm-up epochs" + _recipe("warmup_epochs"),
    )
    warmup_prefix: bool = option(
        "--warmup-prefix",
        default=False,
        action="store_true",
        group="learning-rate schedule",
        help="warm-up before, not within, --epochs",
    )
    cooldown_epochs: int | None = option(
        "--cooldown-epochs",
        type=bounded(int, min=0),
        group="learning-rate schedule",
        help="epochs at --min-lr after the schedule, as timm 0.5.4" + _recipe("cooldown_epochs"),
    )
    decay_epochs: float = option(
        "--decay-epochs",
        default=100,
        type=float,
        group="learning-rate schedule",
        help="step schedule: epochs between decays",
    )
    decay_milestones: tuple[int, ...] = option(
        "--decay-milestones",
        default=(90, 180, 270),
        type=int,
        nargs="+",
        group="learning-rate schedule",
        help="multistep schedule: epochs to decay at",
    )
    decay_rate: float = option(
        "--decay-rate",
        "--dr",
        default=0.1,
        type=float,
        group="learning-rate schedule",
        help="step / multistep decay factor",
    )

    no_aug: bool = option(
        "--no-aug",
        default=False,
        action="store_true",
        group="augmentation and regularisation",
        help="no training augmentation",
    )
    scale: tuple[float, float] | None = option(
        "--scale",
        type=bounded(float, above=0, max=1),
        nargs=2,
        group="augmentation and regularisation",
        help="random-resized-crop area range" + _recipe("scale"),
    )
    ratio: tuple[float, float] = option(
        "--ratio",
        default=(3 / 4, 4 / 3),
        type=bounded(float, above=0),
        nargs=2,
        group="augmentation and regularisation",
        help="random-resized-crop aspect range",
    )
    hflip: float | None = option(
        "--hflip",
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="horizontal flip probability" + _recipe("hflip"),
    )
    vflip: float = option(
        "--vflip",
        default=0.0,
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="vertical flip probability",
    )
    color_jitter: float | None = option(
        "--color-jitter",
        type=float,
        group="augmentation and regularisation",
        help="colour jitter strength" + _recipe("color_jitter"),
    )
    aa: str | None = option(
        "--aa",
        group="augmentation and regularisation",
        help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1",
    )
    train_interpolation: str | None = option(
        "--train-interpolation",
        choices=TRAIN_INTERPOLATIONS,
        group="augmentation and regularisation",
        help="training resize interpolation" + _recipe("train_interpolation"),
    )
    reprob: float = option(
        "--reprob",
        default=0.0,
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="random-erasing probability",
    )
    remode: str = option(
        "--remode",
        default="pixel",
        choices=ERASING_MODES,
        group="augmentation and regularisation",
        help="random-erasing mode",
    )
    recount: int = option(
        "--recount",
        default=1,
        type=bounded(int, min=1),
        group="augmentation and regularisation",
        help="random-erasing count",
    )
    mixup: float = option(
        "--mixup",
        default=0.0,
        type=bounded(float, min=0),
        group="augmentation and regularisation",
        help="mixup alpha (on when > 0)",
    )
    cutmix: float = option(
        "--cutmix",
        default=0.0,
        type=bounded(float, min=0),
        group="augmentation and regularisation",
        help="cutmix alpha (on when > 0)",
    )
    cutmix_minmax: tuple[float, float] | None = option(
        "--cutmix-minmax",
        type=bounded(float, above=0, max=1),
        nargs=2,
        group="augmentation and regularisation",
        help="cutmix box ratio range",
    )
    mixup_prob: float = option(
        "--mixup-prob",
        default=1.0,
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="probability of mixup or cutmix per batch",
    )
    mixup_switch_prob: float = option(
        "--mixup-switch-prob",
        default=0.5,
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="probability of cutmix instead of mixup",
    )
    mixup_mode: str = option(
        "--mixup-mode",
        default="batch",
        choices=MIXUP_MODES,
        group="augmentation and regularisation",
        help="mixup granularity",
    )
    mixup_off_epoch: int = option(
        "--mixup-off-epoch",
        default=0,
        type=int,
        group="augmentation and regularisation",
        help="turn mixup off from this epoch (0: never)",
    )
    smoothing: float = option(
        "--smoothing",
        default=0.1,
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="label smoothing",
    )

    model_ema: bool = option(
        "--model-ema",
        default=False,
        action="store_true",
        group="model EMA",
        help="keep an exponential moving average of the weights",
    )
    model_ema_decay: float = option(
        "--model-ema-decay", default=0.9998, type=bounded(float, min=0, max=1), group="model EMA", help="EMA decay"
    )
    model_ema_warmup: bool = option(
        "--model-ema-warmup",
        default=False,
        action="store_true",
        group="model EMA",
        help="ramp the EMA decay up over the first steps",
    )
    model_ema_force_cpu: bool = option(
        "--model-ema-force-cpu", default=False, action="store_true", group="model EMA", help="keep the EMA on the CPU"
    )

    seed: int = option("--seed", default=42, type=int, group="output", help="random seed (per epoch and rank)")
    output: str = option(
        "-o",
        "--output",
        default="",
        type=functools.partial(writable_path, kind="folder"),
        metavar="PATH",
        group="output",
        help="output folder (default: output/train/<date>-<model>-<size>)",
    )
    experiment: str = option(
        "--experiment",
        default="",
        group="output",
        help="sub-folder of --output for this run (without -o: output/train/NAME)",
    )
    eval_metric: str = option(
        "--eval-metric",
        default="top1",
        choices=EVAL_METRICS,
        group="output",
        help="metric that picks model_best.pth.tar",
    )
    checkpoint_hist: int = option(
        "--checkpoint-hist",
        default=10,
        type=bounded(int, min=0),
        metavar="N",
        group="output",
        help="keep the N best epochs as checkpoint-EPOCH.pth.tar, ranked by --eval-metric, for `sequencer average` "
        "(0: none; default: 10, as timm)",
    )
    log_interval: int = option(
        "--log-interval",
        default=50,
        type=bounded(int, min=1),
        metavar="N",
        group="output",
        help="every N steps, log the loss, learning rate and images/s when no progress bar is drawn (a pipe, "
        "--no-progress); the loss is read from the device and checked for NaN only then, not at every step",
    )
    no_progress: bool = option(
        "--no-progress", default=False, action="store_true", group="output", help="no progress bar"
    )

    # The rest of timm 1.0's train.py flags, with its meanings and defaults.
    class_map: str = option(
        "--class-map", default="", metavar="FILE", group="data", help="class name -> index file: train on these classes"
    )
    input_img_mode: str | None = option(
        "--input-img-mode",
        group="data",
        help="PIL mode images are read in (default: RGB for 3 input channels, L for 1), e.g. L with --in-chans 1",
    )
    train_num_samples: int | None = option(
        "--train-num-samples", type=bounded(int, min=1), group="data", help="images of a streamed training split"
    )
    val_num_samples: int | None = option(
        "--val-num-samples", type=bounded(int, min=1), group="data", help="images of a streamed held-out split"
    )
    input_key: str | None = option("--input-key", group="data", help="streamed datasets: the image field")
    target_key: str | None = option("--target-key", group="data", help="streamed datasets: the label field")
    dataset_trust_remote_code: bool = option(
        "--dataset-trust-remote-code",
        default=False,
        action="store_true",
        group="data",
        help="hfds/: run the dataset's code",
    )
    epoch_repeats: float = option(
        "--epoch-repeats",
        default=0.0,
        type=bounded(float, min=0),
        group="data",
        help="streamed training split: passes over it per epoch (0: one)",
    )
    pretrained_path: str | None = option(
        "--pretrained-path", group="model", help="start from these weights as pretrained ones (the head adapted)"
    )
    gp: str | None = option("--gp", choices=("avg",), group="model", help="global pool: avg, the one Sequencer has")
    drop_connect: float | None = option(
        "--drop-connect", type=bounded(float, min=0, max=1), group="model", help="deprecated name of --drop-path"
    )
    drop_block: float | None = option("--drop-block", type=float, group="model", help="DropBlock rate (CNNs only)")
    model_kwargs: dict[str, Any] | None = option(
        "--model-kwargs", nargs="*", action=KeyValues, metavar="KEY=VALUE", group="model", help="more model arguments"
    )
    head_init_scale: float | None = option(
        "--head-init-scale", type=float, group="model", help="multiply the head's initial weights and bias by this"
    )
    head_init_bias: float | None = option(
        "--head-init-bias", type=float, group="model", help="initial value of the head's bias"
    )
    grad_accum_steps: int = option(
        "--grad-accum-steps",
        default=1,
        type=bounded(int, min=1),
        group="runtime",
        help="accumulate the gradients of N batches per update (the --lr-base scaling counts them)",
    )
    channels_last: bool = option(
        "--channels-last", default=False, action="store_true", group="runtime", help="channels-last memory layout"
    )
    model_dtype: str | None = option(
        "--model-dtype",
        choices=("float32", "float16", "bfloat16"),
        group="runtime",
        help="train the weights in this dtype (not with --amp)",
    )
    torchcompile_mode: str | None = option(
        "--torchcompile-mode", group="compilation", help="torch.compile mode: default, reduce-overhead, max-autotune"
    )
    torchscript: bool = option(
        "--torchscript", default=False, action="store_true", group="compilation", help="train the TorchScript model"
    )
    synchronize_step: bool = option(
        "--synchronize-step", default=False, action="store_true", group="runtime", help="wait for the device every step"
    )
    no_ddp_bb: bool = option(
        "--no-ddp-bb", default=False, action="store_true", group="runtime", help="DDP without broadcasting buffers"
    )
    device_modules: tuple[str, ...] | None = option(
        "--device-modules", nargs="+", group="runtime", help="modules to import first (out-of-tree device backends)"
    )
    local_rank: int = option("--local_rank", default=0, type=int, group="runtime", help="set by old launchers")
    pin_mem: bool = option(
        "--pin-mem", default=False, action="store_true", group="runtime", help="page-locked loader memory (GPU copies)"
    )
    use_multi_epochs_loader: bool = option(
        "--use-multi-epochs-loader",
        default=False,
        action="store_true",
        group="runtime",
        help="keep the loader's workers from epoch to epoch",
    )
    no_prefetcher: bool = option(
        "--no-prefetcher", default=False, action="store_true", group="runtime", help="timm's CUDA prefetcher off"
    )
    worker_seeding: str = option(
        "--worker-seeding", default="all", choices=("all", "part"), group="runtime", help="loader workers' seeding"
    )
    fuser: str = option("--fuser", default="", group="runtime", help="TorchScript fuser")
    fast_norm: bool = option(
        "--fast-norm", default=False, action="store_true", group="runtime", help="timm's fast norm layers"
    )
    layer_decay_min_scale: float = option(
        "--layer-decay-min-scale", default=0.0, type=float, group="optimizer", help="floor of --layer-decay's scales"
    )
    layer_decay_no_opt_scale: float | None = option(
        "--layer-decay-no-opt-scale",
        type=float,
        group="optimizer",
        help="layers whose --layer-decay scale is below this are frozen",
    )
    opt_kwargs: dict[str, Any] | None = option(
        "--opt-kwargs",
        nargs="*",
        action=KeyValues,
        metavar="KEY=VALUE",
        group="optimizer",
        help="more optimizer arguments",
    )
    lr_noise: tuple[float, ...] | None = option(
        "--lr-noise",
        type=float,
        nargs="+",
        metavar="PCT",
        group="learning-rate schedule",
        help="learning-rate noise on (and off) at these fractions of the epochs",
    )
    lr_noise_pct: float = option(
        "--lr-noise-pct", default=0.67, type=float, group="learning-rate schedule", help="noise limit (fraction)"
    )
    lr_noise_std: float = option(
        "--lr-noise-std", default=1.0, type=float, group="learning-rate schedule", help="noise std-dev"
    )
    lr_cycle_mul: float = option(
        "--lr-cycle-mul", default=1.0, type=float, group="learning-rate schedule", help="length factor of each cycle"
    )
    lr_cycle_decay: float = option(
        "--lr-cycle-decay", default=0.5, type=float, group="learning-rate schedule", help="peak factor of each cycle"
    )
    lr_cycle_limit: int = option(
        "--lr-cycle-limit", default=1, type=bounded(int, min=1), group="learning-rate schedule", help="cycles (> 1: on)"
    )
    lr_k_decay: float = option(
        "--lr-k-decay", default=1.0, type=float, group="learning-rate schedule", help="k-decay of cosine / poly"
    )
    patience_epochs: int = option(
        "--patience-epochs",
        default=10,
        type=bounded(int, min=0),
        group="learning-rate schedule",
        help="plateau schedule: epochs without improvement before a decay",
    )
    train_crop_mode: str | None = option(
        "--train-crop-mode", group="augmentation and regularisation", help="timm's training crop (rrc, rkrc, rkrr)"
    )
    color_jitter_prob: float | None = option(
        "--color-jitter-prob",
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="probability of colour jitter",
    )
    grayscale_prob: float | None = option(
        "--grayscale-prob", type=bounded(float, min=0, max=1), group="augmentation and regularisation", help="grayscale"
    )
    gaussian_blur_prob: float | None = option(
        "--gaussian-blur-prob",
        type=bounded(float, min=0, max=1),
        group="augmentation and regularisation",
        help="probability of Gaussian blur",
    )
    aug_repeats: float = option(
        "--aug-repeats",
        default=0,
        type=bounded(float, min=0),
        group="augmentation and regularisation",
        help="repeated augmentation: each image N times per epoch, on different ranks (0: off)",
    )
    aug_splits: int = option(
        "--aug-splits",
        default=0,
        type=bounded(int, min=0),
        group="augmentation and regularisation",
        help="augmentation splits (0 or >= 2): a clean and N-1 augmented copies of each image, as AugMix",
    )
    jsd_loss: bool = option(
        "--jsd-loss",
        default=False,
        action="store_true",
        group="augmentation and regularisation",
        help="Jensen-Shannon divergence + CE loss over the --aug-splits",
    )
    bce_loss: bool = option(
        "--bce-loss",
        default=False,
        action="store_true",
        group="augmentation and regularisation",
        help="binary cross-entropy",
    )
    bce_sum: bool = option(
        "--bce-sum",
        default=False,
        action="store_true",
        group="augmentation and regularisation",
        help="BCE summed over classes",
    )
    bce_target_thresh: float | None = option(
        "--bce-target-thresh", type=float, group="augmentation and regularisation", help="binarise BCE targets at this"
    )
    bce_pos_weight: float | None = option(
        "--bce-pos-weight", type=float, group="augmentation and regularisation", help="BCE weight of positive targets"
    )
    resplit: bool = option(
        "--resplit",
        default=False,
        action="store_true",
        group="augmentation and regularisation",
        help="no random erasing on the first (clean) --aug-splits split",
    )
    bn_momentum: float | None = option("--bn-momentum", type=float, group="BatchNorm", help="BatchNorm momentum")
    bn_eps: float | None = option("--bn-eps", type=float, group="BatchNorm", help="BatchNorm epsilon")
    sync_bn: bool = option("--sync-bn", default=False, action="store_true", group="BatchNorm", help="synchronised BN")
    dist_bn: str = option("--dist-bn", default="reduce", group="BatchNorm", help="BN statistics across processes")
    split_bn: bool = option("--split-bn", default=False, action="store_true", group="BatchNorm", help="BN per split")
    val_interval: int = option(
        "--val-interval",
        default=1,
        type=bounded(int, min=1),
        metavar="N",
        group="output",
        help="evaluate and checkpoint every N epochs (and after the last)",
    )
    recovery_interval: int = option(
        "--recovery-interval",
        default=0,
        type=bounded(int, min=0),
        metavar="N",
        group="output",
        help="every N updates write recovery.pth.tar; --resume from it restarts its epoch with its weights (0: off)",
    )
    tta: int = option(
        "--tta",
        default=0,
        type=bounded(int, min=0, max=2),
        group="output",
        help="test-time augmentation at evaluation: 2 averages the logits of each image and its mirror (0, 1: off)",
    )
    save_images: bool = option(
        "--save-images", default=False, action="store_true", group="output", help="save each logged batch as a JPEG"
    )
    log_wandb: bool = option(
        "--log-wandb", default=False, action="store_true", group="output", help="log every epoch to Weights & Biases"
    )
    wandb_project: str | None = option("--wandb-project", group="output", help="W&B project (default: the experiment)")
    wandb_tags: tuple[str, ...] = option("--wandb-tags", default=(), nargs="+", group="output", help="W&B tags")
    wandb_resume_id: str = option("--wandb-resume-id", default="", group="output", help="W&B run to continue")
    log_tensorboard: bool = option(
        "--log-tensorboard",
        default=False,
        action="store_true",
        group="output",
        help="TensorBoard scalars per epoch in OUTPUT/tensorboard",
    )

    @classmethod
    def from_keywords(cls, options: dict[str, Any]) -> TrainConfig:
        """A config from keywords named as the fields (an unknown one refused, naming the closest), the rest at their
        defaults; `config`, a YAML file of fields (as -c), gives the defaults the keywords override."""
        names = [item.name for item in fields(cls)]
        for key in options:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(
                    f"train() got an unknown keyword argument {key!r}{hint}; its keywords are the fields of "
                    "TrainConfig, the dests of `sequencer train`'s flags (batch_size for -b/--batch-size)"
                )
        base = cls.from_yaml(os.fspath(options["config"])) if options.get("config") else cls()
        return replace(base, **options)

    @classmethod
    def from_yaml(cls, path: str) -> TrainConfig:
        """The config an args.yaml (or any YAML mapping of fields) holds, the fields it leaves out at their defaults."""
        return cls(**read_config_file(path, option_names(parser_of(cls)._actions)), config=path)

    def with_recipe(self) -> TrainConfig:
        """The data-dependent defaults (None) filled in: the digits demo's without DATA, the authors' with it."""
        recipe = DIGITS_RECIPE if self.is_digits else TIMM_RECIPE
        return replace(self, **{key: value for key, value in recipe.items() if getattr(self, key) is None})

    @property
    def image_mode(self) -> str:
        """The PIL mode images are read in: --input-img-mode, else timm's default for the input's channels."""
        channels = self.input_size[0] if self.input_size else self.in_chans
        return self.input_img_mode or ("RGB" if channels == 3 else "L")

    @property
    def is_digits(self) -> bool:
        """Whether the run trains on the built-in digits (no DATA, --data-dir or --dataset, or --dataset digits)."""
        return not (self.data or self.data_dir or self.dataset) or self.dataset.lower() in DIGITS_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`TrainConfig`'s fields as flags, under the epilog that says how the defaults follow the data."""
    demo = ", ".join(f"{k}={v}" for k, v in DIGITS_RECIPE.items())
    parser.epilog = (
        f"Without DATA (the digits demo) the defaults are {demo}; with data, the authors' train.py (timm 0.5.4) "
        "defaults apply "
        f"(model {TIMM_RECIPE['model']}, batch {TIMM_RECIPE['batch_size']}). Multi-GPU or multi-node: "
        "torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m sequencer train "
        "...; restartable (preemptible machines, SLURM): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun "
        "--max-restarts K ... -m sequencer train ... --output DIR --resume auto"
    )
    add_fields(parser, TrainConfig)
