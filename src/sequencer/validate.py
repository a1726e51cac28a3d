"""Evaluation: `evaluate` (top-1, top-5 and loss of a model over a loader), `validate` (a model on a dataset, from
names and files, as `sequencer validate` runs it), the ImageNet-A/-R class subsets and the ImageNet-ReaL labels."""

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

from sequencer.builder import input_channels, load_model, resolve_source
from sequencer.config import (
    Compilation,
    ImageInputOverrides,
    RecordedModelSource,
    Runtime,
    flag_values,
    image_mode,
    input_overrides,
    takes_groups,
)
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

    @property
    def num_skipped(self) -> int:
        """The base dataset's unreadable images met so far."""
        return self.base.num_skipped

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int, torch.Tensor] | None:
        sample = self.base[index]
        if sample is None:
            return None
        row = torch.zeros(self.num_classes, dtype=torch.bool)
        row[self.labels[index]] = True
        return (*sample, row)


# The running sums `evaluate` keeps, by name: sums rather than means, so that batches of any size and shards of any
# length weigh by their images.
SUMS = ("loss", "top1_hits", "top5_hits", "images", "real_hits", "real_images")


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
    tta: int = 0,
    input_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """top1 / top5 (percent), mean cross-entropy loss, images_per_sec and count over `loader`, summed over ranks.

    `valid_classes`: the logits of every other class are masked out before top-k (ImageNet-A / -R). Batches of
    (images, targets, real) also give `real_top1`, ImageNet-ReaL's top-1 over the images that have ReaL labels.
    `progress`: the label of a progress bar on stderr, shown on a terminal; none when empty. `tta` 2: the logits are
    the mean of each image's and its mirror image's (timm's --tta); `input_dtype`: of a model trained in another one.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in SUMS}
    mask = None
    warmed_up = False
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
        images = images.to(device, dtype=input_dtype, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if not warmed_up:
            # As timm's validate.py: one unscored forward first, and the clock from there, so that images/s counts
            # neither the loader's start nor the first call's one-time costs.
            with autocast(device, amp, amp_dtype):
                model(images)
            warmed_up, start = True, time.perf_counter()
        with autocast(device, amp, amp_dtype):
            logits = model(images)
            if tta > 1:
                logits = (logits + model(images.flip(-1))) / 2
        logits = logits.float()
        if valid_classes is not None:
            if mask is None:
                mask = torch.full((logits.shape[1],), float("-inf"), device=device)
                mask[valid_classes.to(device)] = 0.0
            logits = logits + mask
        # timm's accuracy caps k at the class count, so top-5 of a 3-class problem is top-3.
        top1, top5 = accuracy(logits, targets, topk=(1, 5))
        count = targets.numel()
        sums["loss"] += criterion(logits, targets).double()
        sums["top1_hits"] += top1.double() * count / 100
        sums["top5_hits"] += top5.double() * count / 100
        sums["images"] += count
        if real:
            rows = real[0].to(device)
            labelled = rows.any(dim=1)
            hits = rows.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
            sums["real_hits"] += (hits & labelled).sum().double()
            sums["real_images"] += labelled.sum().double()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    stacked = torch.stack(list(sums.values()))  # one all_reduce for every sum
    if distributed:
        dist.all_reduce(stacked)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    totals = dict(zip(sums, stacked.tolist(), strict=True))
    count = totals["images"]
    if count == 0:
        raise DatasetError("nothing to evaluate: the loader yielded no images")
    metrics = {
        "top1": 100.0 * totals["top1_hits"] / count,
        "top5": 100.0 * totals["top5_hits"] / count,
        "loss": totals["loss"] / count,
        "images_per_sec": count / max(elapsed.item(), 1e-9),
        "count": int(count),
    }
    if totals["real_images"]:
        metrics.update(
            real_top1=100.0 * totals["real_hits"] / totals["real_images"], real_count=int(totals["real_images"])
        )
    return metrics


def evaluate_dataset(
    model: nn.Module,
    dataset: Dataset,
    runtime: Runtime,
    context: DistributedContext,
    progress: str = "",
    valid_classes: torch.Tensor | None = None,
) -> dict[str, float]:
    """`evaluate` over `dataset` with `runtime`'s loader and precision, each process of `context` its share."""
    loader = create_loader(dataset, runtime.batch_size, runtime.workers, distributed=context.distributed)
    return evaluate(
        model,
        loader,
        context.device,
        runtime.amp,
        runtime.amp_dtype,
        distributed=context.distributed,
        valid_classes=valid_classes,
        progress=progress if context.is_primary else "",  # one bar, rank 0's
    )


def check_targets_within(dataset: Dataset, valid_classes: torch.Tensor) -> None:
    """A `DatasetError` when some of a folder dataset's classes lie outside --valid-labels (their loss is infinite)."""
    outside = sorted(set(getattr(dataset, "class_to_idx", {}).values()) - set(valid_classes.tolist()))
    if outside:
        raise DatasetError(
            f"{len(outside)} of the data's classes (indices {', '.join(map(str, outside[:5]))}) are not among "
            "--valid-labels: evaluate ImageNet-A with imagenet-a, ImageNet-R with imagenet-r"
        )


@takes_groups(source=RecordedModelSource, preprocess=ImageInputOverrides, runtime=Runtime, compilation=Compilation)
def validate(
    *,
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    dataset: str = "",
    split: str = "validation",
    dataset_download: bool = False,
    source: RecordedModelSource,
    preprocess: ImageInputOverrides,
    runtime: Runtime,
    compilation: Compilation,
    valid_labels: str = "",
    real_labels: str | None = None,
    context: DistributedContext | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` (with `checkpoint`'s weights) on a dataset and return what `sequencer validate` reports.

    The arguments are the command's flags: `data` (or `data_dir`) is a class-folder tree, `dataset` a torch/, wds/,
    hfds/ name, and neither: the built-in digits. `model` None: the one the checkpoint records, else sequencer2d_s
    (`load_model`); `in_chans`: the channels the checkpoint records, else 3. `input_size`, `img_size`, `crop_pct`,
    `mean`, `std` and `interpolation` default to what a training checkpoint records, else to the model's;
    `input_img_mode` to the mode of the model's channels (RGB for 3, else L). `real_labels=""` scores
    ImageNet-ReaL with timm's packaged labels (None: not at all). `context`: the processes that share the images
    (torchrun's, from `sequencer.distributed.process_group`); none: this process alone, on `device`. `progress`
    draws a progress bar on a terminal (rank 0's).
    """
    # The name, and the checkpoint read once and passed on, before the data is read.
    model, opened = resolve_source(source.model, source.checkpoint, source.use_ema, source.unsafe_load)
    set_threads(runtime.threads)
    context = context or DistributedContext(0, 1, resolve_device(runtime.device))
    if runtime.amp and context.is_primary:
        warn_if_emulated_bfloat16(context.device, runtime.amp_dtype)
    root = os.fspath(data or data_dir) if data or data_dir else None
    name = dataset or root
    # What is asked goes over the model's preprocessing, which holds the input a training checkpoint was trained at.
    asked = input_overrides(preprocess)
    # The built-in digits are upscaled straight to the input size, as `sequencer train` does: known before the model.
    trained_size = opened.record.input_size[-1] if opened and opened.record.input_size else 32
    digits_size = preprocess.input_size[-1] if preprocess.input_size else preprocess.img_size or trained_size
    # The images are read in the mode of the model's channels (those its weights take), also known before the model.
    in_chans = input_channels(source.in_chans, opened)
    mode = image_mode(in_chans, preprocess.input_img_mode)
    eval_set = build_dataset(
        name, split, data_dir=root, download=dataset_download, img_size=digits_size, input_img_mode=mode
    )
    num_classes = source.num_classes or (opened and opened.record.num_classes) or len(eval_set.classes)
    # Folders named by WordNet id (ImageNet-A, -R, -Sketch) or number (ImageNet-V2) take the model's class indices.
    eval_set = map_classes(eval_set, num_classes, opened.record.class_names if opened else None)
    valid_classes = load_valid_classes(valid_labels, num_classes) if valid_labels else None
    if valid_classes is not None:
        check_targets_within(eval_set, valid_classes)
    if real_labels is not None:
        if not isinstance(eval_set, ImageFolder) or num_classes != 1000:
            raise UsageError("--real-labels needs a 1000-class model and the ImageNet val folder")
        eval_set = WithRealLabels(eval_set, load_real_labels(real_labels), num_classes)
    network = load_model(model, opened, num_classes, in_chans)
    config = data_config(network, **asked)
    check_image_input_fits(network, config["input_size"], mode)
    eval_set.transform = create_transform(network, train=False, **asked)
    network = network.to(context.device)
    if compilation.torchcompile:
        network = compile_model(network, compilation.torchcompile)
    label = f"{model} on {name or 'digits'}" if progress else ""
    metrics = evaluate_dataset(network, eval_set, runtime, context, label, valid_classes)
    metrics["num_skipped"] = all_reduce_sum(getattr(eval_set, "num_skipped", 0), context)
    return {
        "model": model,
        "checkpoint": os.fspath(source.checkpoint) if source.checkpoint else "",
        "data": name or "digits",
        "split": split,
        **metrics,
        "input_size": list(config["input_size"]),
        "trained_input_size": list(opened.record.input_size) if opened and opened.record.input_size else None,
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
        "amp": runtime.amp,
        "valid_labels": valid_labels or None,
    }


# The results `sequencer validate` writes rounded (to 4 decimals): the float metrics of `evaluate`.
ROUNDED = ("top1", "top5", "loss", "images_per_sec", "real_top1")


def run(args: argparse.Namespace) -> int:
    """`validate` with the flags; rank 0 prints the metrics and writes them to --results-file. Under torchrun each
    process evaluates its share of the images."""
    with process_group(args.device) as context:
        logging.basicConfig(level=logging.INFO if context.is_primary else logging.WARNING, format="%(message)s")
        results = validate(**flag_values(validate, args, context=context, progress=True))
    if not context.is_primary:
        return 0
    real = f"  ReaL top-1 {results['real_top1']:.3f}" if "real_top1" in results else ""
    size, trained = results["input_size"], results["trained_input_size"]
    # An input other than the one the weights were trained at is a choice the numbers depend on: said beside them.
    read_at = "x".join(map(str, size)) + (
        f", trained at {'x'.join(map(str, trained))}" if trained not in (None, size) else ""
    )
    print(
        f"{results['model']}: top-1 {results['top1']:.3f}{real}  top-5 {results['top5']:.3f}  "
        f"loss {results['loss']:.4f}  {results['images_per_sec']:.1f} images/s  "
        f"({results['count']} images, {results['num_skipped']} skipped, input {read_at})"
    )
    if args.output:
        rounded = {key: round(value, 4) if key in ROUNDED else value for key, value in results.items()}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rounded, indent=2) + "\n")
    return 0
