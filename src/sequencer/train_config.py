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
    JIT_FUSERS,
    LR_BASE_SCALES,
    MIXUP_MODES,
    SCHEDULERS,
    TIMM_RECIPE,
    TRAIN_CROP_MODES,
    TRAIN_INTERPOLATIONS,
)
from sequencer.config import (
    COMPILATION,
    COUNT,
    DATA,
    FRACTION,
    MODEL,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    RUNTIME,
    Compilation,
    DatasetSource,
    FlagGroup,
    ImageInputOverrides,
    KeyValues,
    ModelSource,
    Runtime,
    add_fields,
    bounded,
    image_mode,
    option_names,
    parser_of,
    read_config_file,
    writable_path,
)
from sequencer.errors import UsageError

# timm's --lr-base and --lr-base-size: the defaults `resolve` gives them (None: not given, so that the digits demo's
# --lr gives way to them only when given).
LR_BASE, LR_BASE_SIZE = 0.1, 256


def _recipe(key: str) -> str:
    return f" (default: {TIMM_RECIPE[key]}; digits demo: {DIGITS_RECIPE[key]})"


# train's own flag groups, beside the shared ones (DATA, MODEL, RUNTIME, COMPILATION).
OPTIMIZER, SCHEDULE = FlagGroup("optimizer"), FlagGroup("learning-rate schedule")
AUG = FlagGroup("augmentation and regularisation")
EMA, OUTPUT, BATCHNORM = FlagGroup("model EMA"), FlagGroup("output"), FlagGroup("BatchNorm")


@dataclass(frozen=True)
class TrainConfig(Compilation, Runtime, ImageInputOverrides, ModelSource, DatasetSource):
    """The flags of `sequencer train` (`sequencer train --help` says what each does), keyword by dest."""

    # The groups shared with the other commands, with train's own defaults.
    data: str | None = DATA.option(
        "data",
        nargs="?",
        metavar="DATA",
        help="dataset root with train/<class>/* and val/<class>/*; none: the built-in digits demo",
    )
    model: str | None = MODEL.option("--model", help="model name (see `sequencer summary`)" + _recipe("model"))
    checkpoint: str = MODEL.option(
        "--initial-checkpoint",
        "--checkpoint",
        default="",
        help="start from these weights; a head of another size is re-initialised",
    )
    batch_size: int | None = RUNTIME.option(
        "-b", "--batch-size", type=POSITIVE_INT, help="batch size per process" + _recipe("batch_size")
    )
    workers: int | None = RUNTIME.option(
        "-j", "--workers", type=COUNT, help="data-loading worker processes" + _recipe("workers")
    )

    config: str = DATA.option(
        "-c",
        "--config",
        default="",
        metavar="YAML",
        help="take the flags from this file (a run's args.yaml, as timm's train.py writes); the command line wins",
    )
    train_split: str = DATA.option("--train-split", default="train", help="training split")
    val_split: str = DATA.option(
        "--val-split", default="validation", help="held-out split (val/ or validation/ folder)"
    )

    pretrained: bool = MODEL.switch("--pretrained", help="start from the released ImageNet weights")
    resume: str = MODEL.option(
        "--resume",
        default="",
        metavar="PATH|auto",
        help="continue a run from its last.pth.tar: its weights, optimizer state, EMA and epoch; the schedule and "
        "every other setting follow these flags (model, classes, input size, optimizer and layer decay must match). "
        "auto: -o/--output's last.pth.tar when there is one, else a new run there, so that one unchanged command "
        "serves every restart (torchrun --max-restarts, a requeued job)",
    )
    no_resume_opt: bool = MODEL.switch("--no-resume-opt", help="with --resume, do not restore optimizer state")
    start_epoch: int | None = MODEL.option("--start-epoch", type=int, help="epoch to start at (default: 0 or resumed)")
    drop: float = MODEL.option("--drop", default=0.0, type=PROBABILITY, help="dropout rate")
    drop_path: float = MODEL.option(
        "--drop-path", default=0.0, type=PROBABILITY, help="stochastic depth rate (linear over blocks)"
    )
    grad_checkpointing: bool = MODEL.switch("--grad-checkpointing", help="recompute activations to save memory")
    rnn_impl: str = MODEL.option(
        "--rnn-impl",
        default="auto",
        choices=IMPLEMENTATIONS,
        help="how the mixers run their recurrences: auto is nn.LSTM in eager mode and the rnn2d op under "
        "--torchcompile; fused is the CPU path that trains faster at larger batches (BENCHMARKS.md)",
    )
    validation_batch_size: int | None = RUNTIME.option(
        "-vb", "--validation-batch-size", type=POSITIVE_INT, help="default: --batch-size"
    )

    opt: str | None = OPTIMIZER.option("--opt", help="timm optimizer name: adamw, sgd, lamb, ..." + _recipe("opt"))
    opt_eps: float | None = OPTIMIZER.option("--opt-eps", type=NON_NEGATIVE, help="optimizer epsilon")
    opt_betas: tuple[float, ...] | None = OPTIMIZER.option(
        "--opt-betas", type=PROBABILITY, nargs="+", help="optimizer betas, as many as --opt takes (2 for adamw)"
    )
    momentum: float = OPTIMIZER.option("--momentum", default=0.9, type=PROBABILITY, help="SGD momentum")
    weight_decay: float | None = OPTIMIZER.option(
        "--weight-decay", type=NON_NEGATIVE, help="weight decay" + _recipe("weight_decay")
    )
    clip_grad: float | None = OPTIMIZER.option(
        "--clip-grad", type=POSITIVE, help="clip gradients at this norm (value, agc)"
    )
    clip_mode: str = OPTIMIZER.option("--clip-mode", default="norm", choices=CLIP_MODES, help="gradient clipping mode")
    layer_decay: float | None = OPTIMIZER.option("--layer-decay", type=float, help="layer-wise learning-rate decay")

    sched: str = SCHEDULE.option("--sched", default="cosine", choices=SCHEDULERS, help="timm scheduler")
    sched_on_updates: bool | None = SCHEDULE.option(
        "--sched-on-updates",
        action="store_true",
        help="step the schedule every update, not every epoch" + _recipe("sched_on_updates"),
    )
    lr: float | None = SCHEDULE.option(
        "--lr",
        type=NON_NEGATIVE,  # 0 is legitimate: a run that only checks loading or evaluates
        help=f"learning rate (default: --lr-base scaled by the global batch; digits demo: {DIGITS_RECIPE['lr']} "
        "unless an --lr-base* flag is given)",
    )
    lr_base: float | None = SCHEDULE.option(
        "--lr-base",
        type=NON_NEGATIVE,
        help=f"learning rate at --lr-base-size images per step (default: {LR_BASE})",
    )
    lr_base_size: int | None = SCHEDULE.option(
        "--lr-base-size", type=POSITIVE_INT, help=f"global batch size of --lr-base (default: {LR_BASE_SIZE})"
    )
    lr_base_scale: str = SCHEDULE.option(
        "--lr-base-scale",
        default="",
        choices=LR_BASE_SCALES,
        help="scaling rule of --lr-base (default: sqrt for adaptive optimizers, else linear)",
    )
    warmup_lr: float | None = SCHEDULE.option(
        "--warmup-lr", type=NON_NEGATIVE, help="learning rate at the start of warm-up" + _recipe("warmup_lr")
    )
    min_lr: float | None = SCHEDULE.option(
        "--min-lr", type=NON_NEGATIVE, help="floor of the schedule and rate of the cool-down" + _recipe("min_lr")
    )
    epochs: int | None = SCHEDULE.option(
        "--epochs",
        type=POSITIVE_INT,
        help="epochs of the schedule; --cooldown-epochs more follow at --min-lr" + _recipe("epochs"),
    )
    warmup_epochs: int | None = SCHEDULE.option(
        "--warmup-epochs", type=COUNT, help="linear warm-up epochs" + _recipe("warmup_epochs")
    )
    warmup_prefix: bool = SCHEDULE.switch("--warmup-prefix", help="warm-up before, not within, --epochs")
    cooldown_epochs: int | None = SCHEDULE.option(
        "--cooldown-epochs",
        type=COUNT,
        help="epochs at --min-lr after the schedule, as timm 0.5.4" + _recipe("cooldown_epochs"),
    )
    decay_epochs: float = SCHEDULE.option(
        "--decay-epochs", default=100, type=float, help="step schedule: epochs between decays"
    )
    decay_milestones: tuple[int, ...] = SCHEDULE.option(
        "--decay-milestones", default=(90, 180, 270), type=int, nargs="+", help="multistep schedule: epochs to decay at"
    )
    decay_rate: float = SCHEDULE.option(
        "--decay-rate", "--dr", default=0.1, type=float, help="step / multistep decay factor"
    )

    no_aug: bool = AUG.switch("--no-aug", help="no training augmentation")
    scale: tuple[float, float] | None = AUG.option(
        "--scale", type=FRACTION, nargs=2, help="random-resized-crop area range" + _recipe("scale")
    )
    ratio: tuple[float, float] = AUG.option(
        "--ratio", default=(3 / 4, 4 / 3), type=POSITIVE, nargs=2, help="random-resized-crop aspect range"
    )
    hflip: float | None = AUG.option("--hflip", type=PROBABILITY, help="horizontal flip probability" + _recipe("hflip"))
    vflip: float = AUG.option("--vflip", default=0.0, type=PROBABILITY, help="vertical flip probability")
    color_jitter: float | None = AUG.option(
        "--color-jitter", type=float, help="colour jitter strength" + _recipe("color_jitter")
    )
    aa: str | None = AUG.option("--aa", help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    train_interpolation: str | None = AUG.option(
        "--train-interpolation",
        choices=TRAIN_INTERPOLATIONS,
        help="training resize interpolation" + _recipe("train_interpolation"),
    )
    reprob: float = AUG.option("--reprob", default=0.0, type=PROBABILITY, help="random-erasing probability")
    remode: str = AUG.option("--remode", default="pixel", choices=ERASING_MODES, help="random-erasing mode")
    recount: int = AUG.option("--recount", default=1, type=POSITIVE_INT, help="random-erasing count")
    mixup: float = AUG.option("--mixup", default=0.0, type=NON_NEGATIVE, help="mixup alpha (on when > 0)")
    cutmix: float = AUG.option("--cutmix", default=0.0, type=NON_NEGATIVE, help="cutmix alpha (on when > 0)")
    cutmix_minmax: tuple[float, float] | None = AUG.option(
        "--cutmix-minmax", type=FRACTION, nargs=2, help="cutmix box ratio range"
    )
    mixup_prob: float = AUG.option(
        "--mixup-prob", default=1.0, type=PROBABILITY, help="probability of mixup or cutmix per batch"
    )
    mixup_switch_prob: float = AUG.option(
        "--mixup-switch-prob", default=0.5, type=PROBABILITY, help="probability of cutmix instead of mixup"
    )
    mixup_mode: str = AUG.option("--mixup-mode", default="batch", choices=MIXUP_MODES, help="mixup granularity")
    mixup_off_epoch: int = AUG.option(
        "--mixup-off-epoch", default=0, type=int, help="turn mixup off from this epoch (0: never)"
    )
    smoothing: float = AUG.option("--smoothing", default=0.1, type=PROBABILITY, help="label smoothing")

    model_ema: bool = EMA.switch("--model-ema", help="keep an exponential moving average of the weights")
    model_ema_decay: float = EMA.option("--model-ema-decay", default=0.9998, type=PROBABILITY, help="EMA decay")
    model_ema_warmup: bool = EMA.switch("--model-ema-warmup", help="ramp the EMA decay up over the first steps")
    model_ema_force_cpu: bool = EMA.switch("--model-ema-force-cpu", help="keep the EMA on the CPU")

    seed: int = OUTPUT.option("--seed", default=42, type=int, help="random seed (per epoch and rank)")
    output: str = OUTPUT.option(
        "-o",
        "--output",
        default="",
        type=functools.partial(writable_path, kind="folder"),
        metavar="PATH",
        help="output folder (default: output/train/<date>-<model>-<size>)",
    )
    experiment: str = OUTPUT.option(
        "--experiment",
        default="",
        help="sub-folder of --output for this run (without -o: output/train/NAME, or with --resume its run's folder)",
    )
    eval_metric: str = OUTPUT.option(
        "--eval-metric", default="top1", choices=EVAL_METRICS, help="metric that picks model_best.pth.tar"
    )
    checkpoint_hist: int = OUTPUT.option(
        "--checkpoint-hist",
        default=10,
        type=COUNT,
        metavar="N",
        help="keep the N best epochs as checkpoint-EPOCH.pth.tar, ranked by --eval-metric, for `sequencer average` "
        "(0: none; default: 10, as timm)",
    )
    log_interval: int = OUTPUT.option(
        "--log-interval",
        default=50,
        type=POSITIVE_INT,
        metavar="N",
        help="every N steps, log the loss, learning rate and images/s when no progress bar is drawn (a pipe, "
        "--no-progress); the loss is read from the device and checked for NaN only then, not at every step",
    )
    no_progress: bool = OUTPUT.switch("--no-progress", help="no progress bar")

    # The rest of timm 1.0's train.py flags, with its meanings and defaults.
    class_map: str = DATA.option(
        "--class-map", default="", metavar="FILE", help="class name -> index file: train on these classes"
    )
    train_num_samples: int | None = DATA.option(
        "--train-num-samples", type=POSITIVE_INT, help="images of a streamed training split"
    )
    val_num_samples: int | None = DATA.option(
        "--val-num-samples", type=POSITIVE_INT, help="images of a streamed held-out split"
    )
    input_key: str | None = DATA.option("--input-key", help="streamed datasets: the image field")
    target_key: str | None = DATA.option("--target-key", help="streamed datasets: the label field")
    dataset_trust_remote_code: bool = DATA.switch("--dataset-trust-remote-code", help="hfds/: run the dataset's code")
    epoch_repeats: float = DATA.option(
        "--epoch-repeats",
        default=0.0,
        type=NON_NEGATIVE,
        help="streamed training split: passes over it per epoch (0: one)",
    )
    pretrained_path: str | None = MODEL.option(
        "--pretrained-path", help="start from these weights as pretrained ones (the head adapted)"
    )
    gp: str | None = MODEL.option("--gp", choices=("avg",), help="global pool: avg, the one Sequencer has")
    drop_connect: float | None = MODEL.option("--drop-connect", type=PROBABILITY, help="deprecated name of --drop-path")
    drop_block: float | None = MODEL.option("--drop-block", type=float, help="DropBlock rate (CNNs only)")
    model_kwargs: dict[str, Any] | None = MODEL.option(
        "--model-kwargs", nargs="*", action=KeyValues, metavar="KEY=VALUE", help="more model arguments"
    )
    head_init_scale: float | None = MODEL.option(
        "--head-init-scale", type=float, help="multiply the head's initial weights and bias by this"
    )
    head_init_bias: float | None = MODEL.option("--head-init-bias", type=float, help="initial value of the head's bias")
    grad_accum_steps: int = RUNTIME.option(
        "--grad-accum-steps",
        default=1,
        type=POSITIVE_INT,
        help="accumulate the gradients of N batches per update (the --lr-base scaling counts them)",
    )
    channels_last: bool = RUNTIME.switch("--channels-last", help="channels-last memory layout")
    model_dtype: str | None = RUNTIME.option(
        "--model-dtype",
        choices=("float32", "float16", "bfloat16"),
        help="train the weights in this dtype (not with --amp)",
    )
    torchcompile_mode: str | None = COMPILATION.option(
        "--torchcompile-mode", help="torch.compile mode: default, reduce-overhead, max-autotune"
    )
    torchscript: bool = COMPILATION.switch("--torchscript", help="train the TorchScript model")
    synchronize_step: bool = RUNTIME.switch("--synchronize-step", help="wait for the device every step")
    no_ddp_bb: bool = RUNTIME.switch("--no-ddp-bb", help="DDP without broadcasting buffers")
    device_modules: tuple[str, ...] | None = RUNTIME.option(
        "--device-modules", nargs="+", help="modules to import first (out-of-tree device backends)"
    )
    local_rank: int = RUNTIME.option("--local_rank", default=0, type=int, help="set by old launchers")
    pin_mem: bool = RUNTIME.switch("--pin-mem", help="page-locked loader memory (GPU copies)")
    use_multi_epochs_loader: bool = RUNTIME.switch(
        "--use-multi-epochs-loader", help="keep the loader's workers from epoch to epoch"
    )
    no_prefetcher: bool = RUNTIME.switch("--no-prefetcher", help="timm's CUDA prefetcher off")
    worker_seeding: str = RUNTIME.option(
        "--worker-seeding", default="all", choices=("all", "part"), help="loader workers' seeding"
    )
    fuser: str = RUNTIME.option("--fuser", default="", choices=JIT_FUSERS, help="TorchScript fuser")
    fast_norm: bool = RUNTIME.switch("--fast-norm", help="timm's fast norm layers")
    layer_decay_min_scale: float = OPTIMIZER.option(
        "--layer-decay-min-scale", default=0.0, type=float, help="floor of --layer-decay's scales"
    )
    layer_decay_no_opt_scale: float | None = OPTIMIZER.option(
        "--layer-decay-no-opt-scale", type=float, help="layers whose --layer-decay scale is below this are frozen"
    )
    opt_kwargs: dict[str, Any] | None = OPTIMIZER.option(
        "--opt-kwargs", nargs="*", action=KeyValues, metavar="KEY=VALUE", help="more optimizer arguments"
    )
    lr_noise: tuple[float, ...] | None = SCHEDULE.option(
        "--lr-noise",
        type=float,
        nargs="+",
        metavar="PCT",
        help="learning-rate noise on (and off) at these fractions of the epochs",
    )
    lr_noise_pct: float = SCHEDULE.option("--lr-noise-pct", default=0.67, type=float, help="noise limit (fraction)")
    lr_noise_std: float = SCHEDULE.option("--lr-noise-std", default=1.0, type=float, help="noise std-dev")
    lr_cycle_mul: float = SCHEDULE.option("--lr-cycle-mul", default=1.0, type=float, help="length factor of each cycle")
    lr_cycle_decay: float = SCHEDULE.option(
        "--lr-cycle-decay", default=0.5, type=float, help="peak factor of each cycle"
    )
    lr_cycle_limit: int = SCHEDULE.option("--lr-cycle-limit", default=1, type=POSITIVE_INT, help="cycles (> 1: on)")
    lr_k_decay: float = SCHEDULE.option("--lr-k-decay", default=1.0, type=float, help="k-decay of cosine / poly")
    patience_epochs: int = SCHEDULE.option(
        "--patience-epochs", default=10, type=COUNT, help="plateau schedule: epochs without improvement before a decay"
    )
    train_crop_mode: str | None = AUG.option(
        "--train-crop-mode",
        choices=TRAIN_CROP_MODES,
        help="timm's training crop: rrc (random resized), rkrc / rkrr (resize keeping the ratio, then a centre / "
        "random crop)",
    )
    color_jitter_prob: float | None = AUG.option(
        "--color-jitter-prob", type=PROBABILITY, help="probability of colour jitter"
    )
    grayscale_prob: float | None = AUG.option("--grayscale-prob", type=PROBABILITY, help="grayscale")
    gaussian_blur_prob: float | None = AUG.option(
        "--gaussian-blur-prob", type=PROBABILITY, help="probability of Gaussian blur"
    )
    aug_repeats: float = AUG.option(
        "--aug-repeats",
        default=0,
        type=NON_NEGATIVE,
        help="repeated augmentation: each image N times per epoch, on different ranks (0: off)",
    )
    aug_splits: int = AUG.option(
        "--aug-splits",
        default=0,
        type=COUNT,
        help="augmentation splits (0 or >= 2): a clean and N-1 augmented copies of each image, as AugMix",
    )
    jsd_loss: bool = AUG.switch("--jsd-loss", help="Jensen-Shannon divergence + CE loss over the --aug-splits")
    bce_loss: bool = AUG.switch("--bce-loss", help="binary cross-entropy")
    bce_sum: bool = AUG.switch("--bce-sum", help="BCE summed over classes")
    bce_target_thresh: float | None = AUG.option("--bce-target-thresh", type=float, help="binarise BCE targets at this")
    bce_pos_weight: float | None = AUG.option("--bce-pos-weight", type=float, help="BCE weight of positive targets")
    resplit: bool = AUG.switch("--resplit", help="no random erasing on the first (clean) --aug-splits split")
    bn_momentum: float | None = BATCHNORM.option("--bn-momentum", type=float, help="BatchNorm momentum")
    bn_eps: float | None = BATCHNORM.option("--bn-eps", type=float, help="BatchNorm epsilon")
    sync_bn: bool = BATCHNORM.switch("--sync-bn", help="synchronised BN")
    dist_bn: str = BATCHNORM.option("--dist-bn", default="reduce", help="BN statistics across processes")
    split_bn: bool = BATCHNORM.switch("--split-bn", help="BN per split")
    val_interval: int = OUTPUT.option(
        "--val-interval",
        default=1,
        type=POSITIVE_INT,
        metavar="N",
        help="evaluate and checkpoint every N epochs (and after the last)",
    )
    recovery_interval: int = OUTPUT.option(
        "--recovery-interval",
        default=0,
        type=COUNT,
        metavar="N",
        help="every N updates write recovery.pth.tar; --resume from it restarts its epoch with its weights (0: off)",
    )
    tta: int = OUTPUT.option(
        "--tta",
        default=0,
        type=bounded(int, min=0, max=2),
        help="test-time augmentation at evaluation: 2 averages the logits of each image and its mirror (0, 1: off)",
    )
    save_images: bool = OUTPUT.switch("--save-images", help="save each logged batch as a JPEG")
    log_wandb: bool = OUTPUT.switch("--log-wandb", help="log every epoch to Weights & Biases")
    wandb_project: str | None = OUTPUT.option("--wandb-project", help="W&B project (default: the experiment)")
    wandb_tags: tuple[str, ...] = OUTPUT.option("--wandb-tags", default=(), nargs="+", help="W&B tags")
    wandb_resume_id: str = OUTPUT.option("--wandb-resume-id", default="", help="W&B run to continue")
    log_tensorboard: bool = OUTPUT.switch(
        "--log-tensorboard", help="TensorBoard scalars per epoch in OUTPUT/tensorboard"
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
    def input_channels(self) -> int:
        """The channels the model takes: --input-size's C, else --in-chans."""
        return self.input_size[0] if self.input_size else self.in_chans

    @property
    def image_mode(self) -> str:
        """The PIL mode images are read in: --input-img-mode, else timm's default for the input's channels."""
        return image_mode(self.input_channels, self.input_img_mode)

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
