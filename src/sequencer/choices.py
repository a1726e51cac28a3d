"""The names and defaults the flags offer, in one place: the parsers (`sequencer.commands`, `sequencer.options`)
offer them and the modules doing the work read them, so neither keeps a copy of the other's.

Standard library only: every parser imports this module, and building a parser must not import torch.
"""

from __future__ import annotations

from typing import Any

# DATA / --dataset names of the built-in digits (scikit-learn's, no download).
DIGITS_NAMES = ("digits", "sklearn/digits")

# --model of the commands that evaluate one model, when neither the flag nor the checkpoint names one.
DEFAULT_MODEL = "sequencer2d_s"

# The largest image side the size flags take: 18x the paper's 224, far past any analysis in it, and small enough that
# one image of this side fits in memory (a 100,000 px side was a MemoryError mid-run).
MAX_IMAGE_SIDE = 4096
# The input flags (add_input_options): overrides of a model's preprocessing, and what a training checkpoint records.
INPUT_KEYS = ("input_size", "img_size", "crop_pct", "mean", "std", "interpolation")
# --interpolation: timm's interpolation names; training also takes "random" (bilinear or bicubic per image).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
TRAIN_INTERPOLATIONS = (*INTERPOLATIONS, "random")
# --amp-dtype
AMP_DTYPES = ("float16", "bfloat16")
# rnn_impl of our models (bench --impls): sequencer.recurrence says what each one runs.
IMPLEMENTATIONS = ("auto", "reference", "fused")

# export --format and --quantize
EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")
QUANTIZATIONS = ("int8",)

# predict --format and --runtime
PREDICTION_FORMATS = ("table", "csv", "json")
PREDICT_RUNTIMES = ("auto", "torch", "onnxruntime")
# The images from which predict's `auto` exports a checkpoint it has no export of: an export takes 30-60 s for
# Sequencer2D-S on 2 cores, and onnxruntime runs each image only 1.08x-1.9x as fast as eager PyTorch, by processor
# (BENCHMARKS.md), so only a run of many images repays it; fewer run in PyTorch.
EXPORT_PAYS_OFF_AT = 1000

# bench --modes, --precisions and --runtimes
BENCH_MODES = ("infer", "train")
BENCH_PRECISIONS = ("float32", "amp")
ONNX_RUNTIMES = ("onnxruntime", "onnxruntime-int8")
BENCH_RUNTIMES = ("torch", "torch-compile", *ONNX_RUNTIMES)

# summary --format
SUMMARY_FORMATS = ("markdown", "csv")

# robustness --corruptions: the 15 ImageNet-C corruptions in their usual order, by family; --severities.
CORRUPTION_FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS = tuple(name for names in CORRUPTION_FAMILIES.values() for name in names)
SEVERITIES = (1, 2, 3, 4, 5)

# The ImageNet test sets of `sequencer variants`: key (see sequencer.analysis.variants.TEST_SETS) -> the flag naming
# its folder, and what it holds; and the folder names each one is looked for under ROOT, the first found taken.
DATASET_FLAGS = {
    "real": ("imagenet-val", "ImageNet val images, for ImageNet and ImageNet-ReaL"),
    "a": ("imagenet-a", "ImageNet-A"),
    "r": ("imagenet-r", "ImageNet-R"),
    "sketch": ("imagenet-sketch", "ImageNet-Sketch"),
    "v2": ("imagenetv2", "ImageNet-V2 (matched frequency)"),
    "c": ("imagenet-c", "ImageNet-C, as released: <corruption>/<severity>/<wnid>/*"),
}
DATASET_FOLDERS = {
    "real": ("imagenet/val", "imagenet-val", "val"),
    "a": ("imagenet-a",),
    "r": ("imagenet-r",),
    "sketch": ("imagenet-sketch/sketch", "imagenet-sketch", "sketch"),
    "v2": ("imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency", "imagenet-v2"),
    "c": ("imagenet-c",),
}

# train: --sched (timm's create_scheduler_v2 names; "none" trains at a constant rate), --lr-base-scale ("": by the
# optimizer), --clip-mode, --remode, --mixup-mode, --eval-metric.
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "none")
LR_BASE_SCALES = ("", "linear", "sqrt")
CLIP_MODES = ("norm", "value", "agc")
ERASING_MODES = ("const", "rand", "pixel")
MIXUP_MODES = ("batch", "pair", "elem")
EVAL_METRICS = ("top1", "top5", "loss")
# train: --train-crop-mode and --fuser, the names timm's create_transform and set_jit_fuser take ("": no fuser set).
TRAIN_CROP_MODES = ("rrc", "rkrc", "rkrr")
JIT_FUSERS = ("", "te", "old", "legacy", "nvfuser", "nvf")

# train: the flags whose default depends on the data, flag -> (digits demo, authors' recipe); one table, so that both
# recipes set the same flags. With no DATA the run is the built-in digits demo (>= 98% held-out top-1 in well under
# 90 s on two CPU cores, see BENCHMARKS.md); with real data the defaults are the authors' train.py (timm 0.5.4)
# defaults, which their README's command lines rely on (its argparse). Demo choices, from trial runs: the 8x8 digits
# go to 16 px, not the model's 32 (3x faster and no less accurate); no flips (a mirrored digit is another glyph);
# crops keep >= 80% of the digit; one thread, because two threads on a machine whose other core is busy ran more than
# ten times slower. The flags whose default is the same for both recipes carry it in
# `sequencer.commands.train.add_arguments`.
_RECIPES: dict[str, tuple[Any, Any]] = {
    "model": ("sequencer2d_tiny", "sequencer2d_s"),
    "img_size": (16, None),
    "batch_size": (64, 128),
    "workers": (0, 2),
    "epochs": (25, 300),
    "opt": ("adamw", "sgd"),
    "lr": (3e-3, None),
    "weight_decay": (0.05, 2e-5),
    "warmup_epochs": (1, 3),
    "warmup_lr": (1e-4, 1e-4),
    "min_lr": (0.0, 1e-6),
    "cooldown_epochs": (0, 10),
    "sched_on_updates": (True, False),
    "hflip": (0.0, 0.5),
    "scale": ((0.8, 1.0), (0.08, 1.0)),
    "color_jitter": (0.0, 0.4),
    "train_interpolation": ("bicubic", "random"),
    "threads": (1, None),
}
DIGITS_RECIPE: dict[str, Any] = {flag: digits for flag, (digits, _) in _RECIPES.items()}
TIMM_RECIPE: dict[str, Any] = {flag: timm for flag, (_, timm) in _RECIPES.items()}
