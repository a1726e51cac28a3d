"""Accuracy against inference resolution (`accuracy_by_resolution`) and its figure, behind `sequencer resolution`.

At each size N the images are resized by the model's crop_pct and centre-cropped to N x N. Sequencer runs at any
size unchanged; timm models with a fixed input size (ViTs) are rebuilt for each size, with their position
embeddings resampled by timm.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from sequencer.analysis.common import build_flagged_model, compared_models, model_labels, training_size
from sequencer.checkpoint import Checkpoint
from sequencer.config import input_overrides
from sequencer.data import build_dataset, check_input_fits, create_loader, create_transform, map_classes
from sequencer.errors import UsageError
from sequencer.files import write_csv
from sequencer.plotting import new_figure, save_figure
from sequencer.runtime import resolve_device, set_threads
from sequencer.validate import evaluate

_logger = logging.getLogger(__name__)


def accuracy_by_resolution(
    name: str,
    checkpoint: str | Checkpoint,
    dataset: Any,
    sizes: list[int],
    device: torch.device,
    args: argparse.Namespace,
    overrides: dict[str, Any],
) -> list[dict[str, Any]]:
    """top-1 / top-5 / loss of one model at every size in `sizes` (rows without the model's label)."""
    rows = []
    for size in sizes:
        # Rebuilt per size: a fixed-size timm model needs its position embeddings resampled for each one.
        model = build_flagged_model(name, checkpoint, args, size)
        check_input_fits(model, (3, size, size), "--sizes")
        if not rows:  # WordNet-id or numbered folders take the model's class indices (see data.map_classes)
            dataset = map_classes(dataset, model.num_classes, model.pretrained_cfg.get("label_names"))
        dataset.transform = create_transform(model, train=False, img_size=size, **overrides)
        loader = create_loader(dataset, args.batch_size, args.workers)
        metrics = evaluate(model.to(device), loader, device, args.amp, args.amp_dtype, progress=f"{name} at {size} px")
        _logger.info(
            "%s at %d px: top-1 %.2f, top-5 %.2f (%d images)",
            name,
            size,
            metrics["top1"],
            metrics["top5"],
            metrics["count"],
        )
        rows.append(
            dict(
                size=size,
                train_size=training_size(model),
                top1=round(metrics["top1"], 3),
                top5=round(metrics["top5"], 3),
                loss=round(metrics["loss"], 4),
                images=metrics["count"],
            )
        )
    return rows


def plot_resolution(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Top-1 against input size, one line per model; a star on each model's training size, a dotted line at each."""
    fig, axes = new_figure(size=(6.4, 4.4))
    ax = axes[0, 0]
    sizes = sorted({r["size"] for r in rows})
    for label in dict.fromkeys(r["model"] for r in rows):
        points = [r for r in rows if r["model"] == label]
        train_size = points[0]["train_size"]
        (line,) = ax.plot(
            [p["size"] for p in points],
            [p["top1"] for p in points],
            marker="o",
            label=f"{label}, trained at {train_size}",
        )
        ax.plot(
            [p["size"] for p in points if p["size"] == train_size],
            [p["top1"] for p in points if p["size"] == train_size],
            marker="*",
            markersize=16,
            color=line.get_color(),
            linestyle="none",
        )
    for train_size in sorted({r["train_size"] for r in rows}):
        if sizes[0] <= train_size <= sizes[-1]:
            ax.axvline(train_size, color="0.5", linestyle=":", linewidth=1)
            ax.annotate(
                f"trained at {train_size}",
                (train_size, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=8,
                color="0.35",
            )
    ax.set_xticks(sizes)
    ax.set_xlabel("inference resolution (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Top-1 accuracy against inference resolution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    """Evaluate every model at every size; write resolution.csv and resolution.png."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    if args.img_size or args.input_size:
        raise UsageError("--img-size / --input-size do not apply here: list the sizes with --sizes")
    specs = compared_models(args, need_weights=True)
    overrides = input_overrides(args, "img_size", "input_size")  # the sizes come from --sizes
    build_dataset(args.data, "val")  # a missing or empty folder fails before any model is built
    rows = []
    for (name, checkpoint), label in zip(specs, model_labels(specs), strict=True):
        # Each model gets its own copy: the folders are relabelled with that model's class indices.
        dataset = build_dataset(args.data, "val")
        for row in accuracy_by_resolution(name, checkpoint, dataset, args.sizes, device, args, overrides):
            rows.append(dict(model=label, **row))
    out = Path(args.output)
    write_csv(rows, out / "resolution.csv")
    plot_resolution(rows, out / "resolution.png")
    for row in rows:
        print(f"{row['model']:>28} {row['size']:5d} px  top-1 {row['top1']:7.3f}  top-5 {row['top5']:7.3f}")
    print(f"wrote {out / 'resolution.csv'}, {out / 'resolution.png'}")
    return 0
