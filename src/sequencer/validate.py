"""Top-1, top-5, loss and images per second of a model on a labelled dataset (timm's validate.py flags)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader

from sequencer.checkpoint import extract_state_dict, from_authors_format, load_state_dict, read_file
from sequencer.data import build_dataset, create_loader, create_transform, data_config
from sequencer.model import create_model
from sequencer.options import add_compile_options, add_input_options, add_model_options, add_runtime_options
from sequencer.runtime import autocast, compile_model, resolve_device, set_threads

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = False,
    amp_dtype: str | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """top1 / top5 (percent), mean cross-entropy loss, images_per_sec and count over `loader`, summed over ranks."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # Sums, not averages, so that batches of any size and shards of any length weigh by their images.
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    start = time.perf_counter()
    for batch in loader:
        if batch is None:  # every image of the batch was unreadable (and counted by the dataset)
            continue
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp, amp_dtype):
            logits = model(images)
        logits = logits.float()
        # timm's accuracy caps k at the class count, so top-5 of a 3-class problem is top-3.
        top1, top5 = accuracy(logits, targets, topk=(1, 5))
        count = targets.numel()
        totals += torch.stack(
            [
                criterion(logits, targets).double(),
                top1.double() * count / 100,
                top5.double() * count / 100,
                torch.tensor(count, dtype=torch.float64, device=device),
            ]
        )
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(totals)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    loss, hits1, hits5, count = totals.tolist()
    if count == 0:
        raise ValueError("nothing to evaluate: the loader yielded no images")
    return {
        "top1": 100.0 * hits1 / count,
        "top5": 100.0 * hits5 / count,
        "loss": loss / count,
        "images_per_sec": count / max(elapsed.item(), 1e-9),
        "count": int(count),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of timm's validate.py that apply here."""
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        help="dataset root (DATA/val/<class>/*, or DATA/<class>/*); none: the built-in digits",
    )
    parser.add_argument("--data-dir", default=None, help="dataset root (alternative to DATA)")
    parser.add_argument("--dataset", "-d", default="", help="torch/cifar10 or torch/cifar100 (default: a folder)")
    parser.add_argument("--split", default="validation", help="split to evaluate (val, validation, train)")
    parser.add_argument("--dataset-download", action="store_true", help="download torch/* datasets if missing")
    add_model_options(parser, default_model="sequencer2d_s")
    add_input_options(parser)
    add_runtime_options(parser)
    add_compile_options(parser)
    parser.add_argument("--results-file", default="", help="write the metrics to this JSON file")


def _input_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing flags of `add_input_options`."""
    return dict(
        input_size=args.input_size,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        mean=args.mean,
        std=args.std,
        interpolation=args.interpolation,
    )


def _head_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Classes of a checkpoint's classifier, or None when it has none."""
    weight = from_authors_format(state_dict).get("head.fc.weight")
    return int(weight.shape[0]) if weight is not None else None


def run(args: argparse.Namespace) -> int:
    """Build the model and data from the flags, evaluate, print and optionally save the metrics."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(args.threads)
    try:
        results = validate(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"sequencer validate: error: {error}", file=sys.stderr)
        return 2
    if args.results_file:
        Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_file).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the model the flags describe on the data they name; print and return the results."""
    device = resolve_device(args.device)
    root = args.data or args.data_dir
    name = args.dataset or root
    checkpoint = read_file(args.checkpoint) if args.checkpoint else {}
    state_dict = extract_state_dict(checkpoint, use_ema=args.use_ema) if checkpoint else None
    # A checkpoint of `sequencer train` records the input it was trained at: the default here too.
    trained = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    overrides = {
        key: value if value not in (None, "") else trained.get(key) for key, value in _input_flags(args).items()
    }
    # The built-in digits are upscaled straight to the input size, as `sequencer train` does.
    digits_size = overrides["input_size"][-1] if overrides["input_size"] else overrides["img_size"] or 32
    dataset = build_dataset(name, args.split, data_dir=root, download=args.dataset_download, img_size=digits_size)
    num_classes = args.num_classes or (state_dict and _head_classes(state_dict)) or len(dataset.classes)
    if len(dataset.classes) > num_classes:
        raise ValueError(f"the data has {len(dataset.classes)} classes but the model only {num_classes}")
    model = create_model(args.model, num_classes=num_classes, in_chans=args.in_chans)
    if state_dict is not None:
        load_state_dict(model, state_dict)
    config = data_config(model, **overrides)
    dataset.transform = create_transform(model, train=False, **overrides)
    loader = create_loader(dataset, args.batch_size, args.workers)
    model = compile_model(model.to(device), args.torchcompile)
    metrics = evaluate(model, loader, device, amp=args.amp, amp_dtype=args.amp_dtype)
    metrics["num_skipped"] = getattr(dataset, "num_skipped", 0)
    results: dict[str, Any] = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "data": name or "digits",
        "split": args.split,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        "input_size": list(config["input_size"]),
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
        "amp": args.amp,
    }
    print(
        f"{args.model}: top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}  loss {metrics['loss']:.4f}  "
        f"{metrics['images_per_sec']:.1f} images/s  ({metrics['count']} images, {metrics['num_skipped']} skipped)"
    )
    return results
