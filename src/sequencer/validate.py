"""Evaluation: top-1, top-5 and loss of a model on a dataset (`evaluate`), and the run of `sequencer validate`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pkgutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.datasets import ImageFolder

from sequencer.builder import load_model, resolve_model_name
from sequencer.checkpoint import open_checkpoint
from sequencer.data import (
    build_dataset,
    check_image_input_fits,
    create_loader,
    create_transform,
    data_config,
    map_classes,
)
from sequencer.distributed import DistributedContext, all_reduce_sum, process_group
from sequencer.errors import DatasetError, UsageError
from sequencer.options import input_overrides
from sequencer.runtime import (
    autocast,
    compile_model,
    progress_bar,
    resolve_device,
    set_threads,
    warn_if_emulated_bfloat16,
)

_logger = logging.getLogger(__name__)


# Class subsets of the ImageNet-1k classes that timm ships: ImageNet-A's and ImageNet-R's 200 classes.
VALID_LABEL_SETS = {"imagenet-a": "imagenet_a_indices.txt", "imagenet-r": "imagenet_r_indices.txt"}
REAL_LABELS_FILE = "imagenet_real_labels.json"


def _timm_info_file(name: str) -> str:
    """A file of timm's packaged ImageNet metadata (timm/data/_info), as text."""
    return pkgutil.get_data("timm.data", f"_info/{name}").decode("utf-8")


def load_valid_classes(spec: str, num_classes: int) -> torch.Tensor:
    """Class indices from 'imagenet-a', 'imagenet-r' (timm's packaged lists) or a file with one index per line."""
    if spec in VALID_LABEL_SETS:
        if num_classes != 1000:
            raise UsageError(
                f"--valid-labels {spec}: a subset of the 1000 ImageNet classes; the model has {num_classes}"
            )
        text = _timm_info_file(VALID_LABEL_SETS[spec])
    elif Path(spec).is_file():
        text = Path(spec).read_text()
    else:
        raise UsageError(f"--valid-labels {spec}: neither {' nor '.join(VALID_LABEL_SETS)} nor a file")
    try:
        indices = sorted({int(line) for line in text.split()})
    except ValueError as error:
        raise UsageError(f"--valid-labels {spec}: expected one class index per line ({error})") from error
    if not indices or indices[0] < 0 or indices[-1] >= num_classes:
        raise UsageError(f"--valid-labels {spec}: class indices must lie in 0..{num_classes - 1}")
    return torch.tensor(indices)


def load_real_labels(path: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """ImageNet-ReaL labels by val image name (ILSVRC2012_val_00000001 -> [...]), from `path` or timm's packaged file.

    The file is a JSON list whose i-th entry holds the labels of ILSVRC2012_val_{i+1:08d}.JPEG (empty: no label).
    """
    if path:
        if Path(path).is_dir():  # `--real-labels DATA`: the optional FILE took the dataset folder
            raise UsageError(f"--real-labels {path}: a folder, not a labels file; put DATA before --real-labels")
        if not Path(path).is_file():
            raise UsageError(f"--real-labels: file not found: {path}")
        text = Path(path).read_text()
    else:
        text = _timm_info_file(REAL_LABELS_FILE)
    try:
        entries = json.loads(text)
        return {f"ILSVRC2012_val_{i + 1:08d}": [int(label) for label in labels] for i, labels in enumerate(entries)}
    except (ValueError, TypeError) as error:
        raise UsageError(f"--real-labels {path}: expected a JSON list of label lists ({error})") from error


class WithRealLabels(Dataset):
    """A class-folder dataset of ImageNet val images whose samples also carry their ReaL labels, as a multi-hot row."""

    def __init__(self, base: ImageFolder, real_labels: dict[str, list[int]], num_classes: int) -> None:
        names = [Path(path).stem for path, _ in base.samples]
        unknown = [name for name in names if name not in real_labels]
        if unknown:
            raise DatasetError(
                f"{len(unknown)} of {len(names)} images ({', '.join(unknown[:3])}) have no ReaL labels: --real-labels "
                "needs the ImageNet val images under their release names (ILSVRC2012_val_00000001.JPEG ...)"
            )
        self.base = base
        self.labels = [real_labels[name] for name in names]
        if not any(self.labels):
            raise DatasetError(f"none of the {len(names)} images has a ReaL label: nothing to score ReaL top-1 on")
        self.num_classes = num_classes

    @property
    def transform(self) -> Callable | None:
        """The base dataset's transform."""
        return self.base.transform

    @transform.setter
    def transform(self, transform: Callable | None) -> None:
        self.base.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int, torch.Tensor] | None:
        sample = self.base[index]
        if sample is None:
            return None
        row = torch.zeros(self.num_classes, dtype=torch.bool)
        row[self.labels[index]] = True
        return (*sample, row)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = False,
    amp_dtype: str | None = None,
    distributed: bool = False,
    valid_classes: torch.Tensor | None = None,
    progress: str = "",
) -> dict[str, float]:
    """top1 / top5 (percent), mean cross-entropy loss, images_per_sec and count over `loader`, summed over ranks.

    `valid_classes`: the logits of every other class are masked out before top-k (ImageNet-A / -R). Batches of
    (images, targets, real) also give `real_top1`, ImageNet-ReaL's top-1 over the images that have ReaL labels.
    `progress`: the label of a progress bar on stderr, shown on a terminal; none when empty.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # Sums, not averages, so that batches of any size and shards of any length weigh by their images.
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # loss, top-1, top-5, images, ReaL hits, ReaL images
    mask = None
    start = time.perf_counter()
    # A streamed set read without its image count says its length is 0: no total then (torch would warn at every
    # batch past a length it was asked for).
    unsized = isinstance(loader.dataset, IterableDataset) and not len(loader.dataset)
    bar = progress_bar(
        loader, show=bool(progress), desc=progress, unit="batch", total=float("inf") if unsized else None
    )
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable (and counted by the dataset)
            continue
        images, targets, *real = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp, amp_dtype):
            logits = model(images)
        logits = logits.float()
        if valid_classes is not None:
            if mask is None:
                mask = torch.full((logits.shape[1],), float("-inf"), device=device)
                mask[valid_classes.to(device)] = 0.0
            logits = logits + mask
        # timm's accuracy caps k at the class count, so top-5 of a 3-class problem is top-3.
        top1, top5 = accuracy(logits, targets, topk=(1, 5))
        count = targets.numel()
        real_hits = real_count = torch.zeros((), dtype=torch.float64, device=device)
        if real:
            rows = real[0].to(device)
            labelled = rows.any(dim=1)
            hits = rows.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
            real_hits, real_count = (hits & labelled).sum().double(), labelled.sum().double()
        totals += torch.stack(
            [
                criterion(logits, targets).double(),
                top1.double() * count / 100,
                top5.double() * count / 100,
                torch.tensor(count, dtype=torch.float64, device=device),
                real_hits,
                real_count,
            ]
        )
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(totals)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    loss, hits1, hits5, count, real_hits, real_count = totals.tolist()
    if count == 0:
        raise DatasetError("nothing to evaluate: the loader yielded no images")
    metrics = {
        "top1": 100.0 * hits1 / count,
        "top5": 100.0 * hits5 / count,
        "loss": loss / count,
        "images_per_sec": count / max(elapsed.item(), 1e-9),
        "count": int(count),
    }
    if real_count:
        metrics.update(real_top1=100.0 * real_hits / real_count, real_count=int(real_count))
    return metrics


def check_targets_within(dataset: Dataset, valid_classes: torch.Tensor) -> None:
    """A `DatasetError` when some of a folder dataset's classes lie outside --valid-labels (their loss is infinite)."""
    outside = sorted(set(getattr(dataset, "class_to_idx", {}).values()) - set(valid_classes.tolist()))
    if outside:
        raise DatasetError(
            f"{len(outside)} of the data's classes (indices {', '.join(map(str, outside[:5]))}) are not among "
            "--valid-labels: evaluate ImageNet-A with imagenet-a, ImageNet-R with imagenet-r"
        )


def run(args: argparse.Namespace) -> int:
    """Build the model and data from the flags, evaluate, print and optionally save the metrics; under torchrun
    each process evaluates its share of the images and rank 0 prints and saves the totals."""
    set_threads(args.threads)
    with process_group(args.device) as context:
        logging.basicConfig(level=logging.INFO if context.is_primary else logging.WARNING, format="%(message)s")
        results = validate(args, context)
    if args.output and context.is_primary:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def validate(args: argparse.Namespace, context: DistributedContext | None = None) -> dict[str, Any]:
    """Evaluate the model the flags describe on the data they name; print (rank 0) and return the results.

    `context`: the processes that share the images (torchrun's); none: this process alone, on --device."""
    resolve_model_name(args.model)  # before the data is read
    context = context or DistributedContext(0, 1, resolve_device(args.device))
    device = context.device
    if context.is_primary:
        warn_if_emulated_bfloat16(device, args.amp, args.amp_dtype)
    root = args.data or args.data_dir
    name = args.dataset or root
    checkpoint = open_checkpoint(args.checkpoint, args.use_ema, args.unsafe_load) if args.checkpoint else None
    # A checkpoint of `sequencer train` records the input it was trained at: the default here too.
    trained = checkpoint.trained_args if checkpoint else {}
    overrides = {
        key: value if value not in (None, "") else trained.get(key) for key, value in input_overrides(args).items()
    }
    # The built-in digits are upscaled straight to the input size, as `sequencer train` does.
    digits_size = overrides["input_size"][-1] if overrides["input_size"] else overrides["img_size"] or 32
    dataset = build_dataset(name, args.split, data_dir=root, download=args.dataset_download, img_size=digits_size)
    num_classes = args.num_classes or (checkpoint and checkpoint.num_classes) or len(dataset.classes)
    # Folders named by WordNet id (ImageNet-A, -R, -Sketch) or number (ImageNet-V2) take the model's class indices.
    dataset = map_classes(dataset, num_classes, checkpoint.class_names if checkpoint else None)
    valid_classes = load_valid_classes(args.valid_labels, num_classes) if args.valid_labels else None
    if valid_classes is not None:
        check_targets_within(dataset, valid_classes)
    if args.real_labels is not None:
        if not isinstance(dataset, ImageFolder) or num_classes != 1000:
            raise UsageError("--real-labels needs a 1000-class model and the ImageNet val folder")
        dataset = WithRealLabels(dataset, load_real_labels(args.real_labels), num_classes)
    model = load_model(args.model, checkpoint, num_classes, args.in_chans)
    config = data_config(model, **overrides)
    check_image_input_fits(model, config["input_size"])
    dataset.transform = create_transform(model, train=False, **overrides)
    loader = create_loader(dataset, args.batch_size, args.workers, distributed=context.distributed)
    model = compile_model(model.to(device), args.torchcompile)
    label = f"{args.model} on {name or 'digits'}" if context.is_primary else ""
    metrics = evaluate(
        model,
        loader,
        device,
        args.amp,
        args.amp_dtype,
        distributed=context.distributed,
        valid_classes=valid_classes,
        progress=label,
    )
    metrics["num_skipped"] = all_reduce_sum(getattr(getattr(dataset, "base", dataset), "num_skipped", 0), context)
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
        "valid_labels": args.valid_labels or None,
    }
    if not context.is_primary:
        return results
    real = f"  ReaL top-1 {metrics['real_top1']:.3f}" if "real_top1" in metrics else ""
    print(
        f"{args.model}: top-1 {metrics['top1']:.3f}{real}  top-5 {metrics['top5']:.3f}  loss {metrics['loss']:.4f}  "
        f"{metrics['images_per_sec']:.1f} images/s  ({metrics['count']} images, {metrics['num_skipped']} skipped)"
    )
    return results
