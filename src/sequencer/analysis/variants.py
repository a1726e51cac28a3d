"""Top-1 on the ImageNet variants found under one root (ReaL, -A, -R, -Sketch, -V2, -C), beside the published figures.

Each dataset is read from its released folder, found under ROOT by its usual name (listed under ROOT in --help) or
named by its own flag. Class folders named by WordNet id or number take their ImageNet-1k index; ImageNet-A and -R
are scored on their 200 classes (the other logits masked out), ReaL against timm's packaged reassessed labels, and
ImageNet-C (`imagenet-c/<corruption>/<severity>/<wnid>/*`, the released images) as the mCE normalised by AlexNet.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from sequencer.analysis.common import build_model, check_model_specs, evenly_spaced_subset, new_figure, save_figure
from sequencer.analysis.common import write_csv as write_rows
from sequencer.analysis.robustness import ALEXNET_MEAN_ERRORS, corruption_error
from sequencer.choices import CORRUPTIONS, DATASET_FLAGS, DATASET_FOLDERS, SEVERITIES
from sequencer.data import build_dataset, create_loader, create_transform, map_classes
from sequencer.distributed import DistributedContext, process_group
from sequencer.errors import UsageError
from sequencer.options import input_overrides
from sequencer.runtime import set_threads
from sequencer.validate import WithRealLabels, check_targets_within, evaluate, load_real_labels, load_valid_classes

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One evaluation set: its flag, the folder names it is looked for under ROOT, and its published S/M/L figures."""

    key: str
    title: str
    folders: tuple[str, ...]
    reference: tuple[float | None, float | None, float | None]
    valid_labels: str = ""


# The published figures of the released Sequencer2D-S / M / L weights (timm's evaluation; ImageNet-C: the paper's,
# L only). ImageNet-ReaL and plain ImageNet top-1 come from the same pass over the ImageNet val folder.
VARIANTS = (
    Variant("imagenet", "ImageNet", DATASET_FOLDERS["real"], (82.3, 82.8, 83.4)),
    Variant("real", "ImageNet-ReaL", DATASET_FOLDERS["real"], (87.37, 87.57, 87.91)),
    Variant("a", "ImageNet-A", DATASET_FOLDERS["a"], (26.4, 30.4, 35.1), "imagenet-a"),
    Variant("r", "ImageNet-R", DATASET_FOLDERS["r"], (45.0, 46.2, 48.1), "imagenet-r"),
    Variant("sketch", "ImageNet-Sketch", DATASET_FOLDERS["sketch"], (33.4, 34.7, 35.8)),
    Variant("v2", "ImageNet-V2", DATASET_FOLDERS["v2"], (71.7, 72.4, 73.6)),
    Variant("c", "ImageNet-C", DATASET_FOLDERS["c"], (None, None, 48.9)),
)


def find_datasets(root: str | None, overrides: dict[str, str | None]) -> tuple[dict[str, Path], list[str]]:
    """The folder of each dataset (its flag's, else the first usual name under ROOT) and the titles not found."""
    if not root and not any(overrides.values()):
        flags = ", ".join(f"--{flag}" for flag, _ in DATASET_FLAGS.values())
        raise UsageError(f"name ROOT, the folder holding the datasets, or their folders with {flags}")
    found, missing = {}, []
    for variant in VARIANTS:
        if variant.key == "imagenet":
            continue
        flagged = overrides.get(variant.key)
        if flagged:
            if not Path(flagged).is_dir():
                raise UsageError(f"--{DATASET_FLAGS[variant.key][0]} {flagged}: folder not found")
            found[variant.key] = Path(flagged)
            continue
        candidates = [Path(root) / name for name in variant.folders] if root else []
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            missing.append(f"{variant.title} (looked for {', '.join(map(str, candidates)) or 'no ROOT given'})")
        else:
            found[variant.key] = folder
    if not found:
        raise UsageError(f"no dataset found: {'; '.join(missing)}")
    return found, missing


def corruption_folders(root: Path) -> dict[tuple[str, int], Path]:
    """ImageNet-C's released folders, ROOT/<corruption>/<severity>, that are present, in ImageNet-C order."""
    folders = {
        (corruption, severity): root / corruption / str(severity)
        for corruption in CORRUPTIONS
        for severity in SEVERITIES
        if (root / corruption / str(severity)).is_dir()
    }
    if not folders:
        raise UsageError(f"{root}: no ImageNet-C folders <corruption>/<severity>/ (e.g. {root}/fog/3/)")
    return folders


def _load(folder: Path, transform: Any, limit: int | None, real: dict[str, list[int]] | None = None) -> Dataset:
    """A folder's images with ImageNet-1k labels (and ReaL labels when given), at most `limit` of them."""
    dataset = map_classes(build_dataset(str(folder), "val", transform=transform), 1000)
    if real is not None:
        dataset = WithRealLabels(dataset, real, 1000)
    return evenly_spaced_subset(dataset, limit)


def run(args: argparse.Namespace) -> int:
    """Evaluate on every dataset found, then write variants.csv and variants.png and say which were missing; under
    torchrun each process evaluates its share of every dataset and rank 0 writes and prints the totals."""
    set_threads(args.threads)
    with process_group(args.device) as context:
        return _run(args, context)


def _run(args: argparse.Namespace, context: DistributedContext) -> int:
    """`run` in the processes of `context`."""
    device = context.device
    found, missing = find_datasets(args.root, {key: getattr(args, f"dataset_{key}") for key in DATASET_FLAGS})
    check_model_specs([(args.model, args.checkpoint)])
    model = build_model(
        args.model, args.checkpoint, num_classes=args.num_classes, use_ema=args.use_ema, unsafe_load=args.unsafe_load
    )
    if getattr(model, "num_classes", None) != 1000:
        raise UsageError(f"the ImageNet variants need a 1000-class model; {args.model} has {model.num_classes}")
    overrides = input_overrides(args)
    transform = create_transform(model, train=False, **overrides)
    # Every folder is read and labelled first, so a wrong tree fails before any evaluation.
    real = load_real_labels(args.real_labels or None) if "real" in found else None
    datasets = {
        key: _load(folder, transform, args.limit, real if key == "real" else None)
        for key, folder in found.items()
        if key != "c"
    }
    valid_classes = {v.key: load_valid_classes(v.valid_labels, 1000) for v in VARIANTS if v.valid_labels}
    for key, valid in valid_classes.items():
        if key in datasets:
            check_targets_within(getattr(datasets[key], "dataset", datasets[key]), valid)
    corrupted = {}
    if "c" in found:
        corrupted = {k: _load(f, transform, args.limit) for k, f in corruption_folders(found["c"]).items()}
    model = model.to(device)
    results = {}
    for key, dataset in datasets.items():
        variant = next(v for v in VARIANTS if v.key == key)
        metrics = _evaluate(model, dataset, context, args, variant.title, valid_classes.get(key))
        if key == "real":
            results["imagenet"] = dict(value=metrics["top1"], images=metrics["count"], folder=found[key])
            # An evenly spaced subset (--limit) may hold no labelled image: no ReaL figure then.
            real_top1, real_count = metrics.get("real_top1", float("nan")), metrics.get("real_count", 0)
            results["real"] = dict(value=real_top1, images=real_count, folder=found[key])
        else:
            results[key] = dict(value=metrics["top1"], images=metrics["count"], folder=found[key])
        if context.is_primary:
            _logger.info("%s: top-1 %.2f (%d images)", variant.title, results[key]["value"], results[key]["images"])
    if corrupted:
        results["c"] = _imagenet_c(model, corrupted, context, args) | dict(folder=found["c"])
    if not context.is_primary:
        return 0
    rows = _rows(results, missing)
    out = Path(args.output)
    write_rows(rows, out / "variants.csv")
    plot_variants(
        rows,
        f"{args.model} {Path(args.checkpoint).name if args.checkpoint else '(random weights)'}",
        out / "variants.png",
    )
    for row in rows:
        if row["value"] != "":
            print(f"{row['dataset']:>16}  {row['metric']:<9} {row['value']:7.2f}  ({row['images']} images)")
    if missing:
        print(f"missing: {'; '.join(missing)}")
    print(f"wrote {out / 'variants.csv'}, {out / 'variants.png'}")
    return 0


def _evaluate(
    model: nn.Module,
    dataset: Dataset,
    context: DistributedContext,
    args: argparse.Namespace,
    label: str,
    valid: Any = None,
) -> dict[str, Any]:
    """`evaluate` over one dataset (each process its share) with the run's batch size, workers and AMP flags,
    `label` on rank 0's progress bar."""
    loader = create_loader(dataset, args.batch_size, args.workers, distributed=context.distributed)
    return evaluate(
        model,
        loader,
        context.device,
        args.amp,
        args.amp_dtype,
        distributed=context.distributed,
        valid_classes=valid,
        progress=label if context.is_primary else "",
    )


def _imagenet_c(
    model: nn.Module, folders: dict[tuple[str, int], Dataset], context: DistributedContext, args: argparse.Namespace
) -> dict[str, Any]:
    """The mCE over the corruptions present (AlexNet-normalised when all five severities are), else the mean error."""
    errors: dict[str, dict[int, float]] = {}
    images = 0
    for (corruption, severity), dataset in folders.items():
        metrics = _evaluate(model, dataset, context, args, f"ImageNet-C {corruption}, severity {severity}")
        errors.setdefault(corruption, {})[severity] = 1 - metrics["top1"] / 100
        images += metrics["count"]
        if context.is_primary:
            _logger.info("ImageNet-C %s, severity %d: top-1 %.2f", corruption, severity, metrics["top1"])
    ces = [corruption_error(e, ALEXNET_MEAN_ERRORS[c]) for c, e in errors.items()]
    scope = "" if len(errors) == len(CORRUPTIONS) else f" over {len(errors)} of {len(CORRUPTIONS)} corruptions"
    if all(ce is not None for ce in ces):
        return dict(metric="mCE" + scope, value=100 * float(np.mean(ces)), images=images)
    mean_error = 100 * float(np.mean([v for e in errors.values() for v in e.values()]))
    return dict(metric="mean error" + scope, value=mean_error, images=images)


def _rows(results: dict[str, dict[str, Any]], missing: list[str]) -> list[dict[str, Any]]:
    """One CSV row per dataset, found or not, with the published S / M / L figures beside ours."""
    rows = []
    for variant in VARIANTS:
        result = results.get(variant.key)
        default_metric = "mCE" if variant.key == "c" else "ReaL top-1" if variant.key == "real" else "top-1"
        published = ["" if figure is None else figure for figure in variant.reference]
        rows.append(
            dict(
                dataset=variant.title,
                metric=result.get("metric", default_metric) if result else default_metric,
                value=round(result["value"], 3) if result else "",
                images=result["images"] if result else 0,
                folder=str(result["folder"]) if result else "",
                sequencer2d_s=published[0],
                sequencer2d_m=published[1],
                sequencer2d_l=published[2],
            )
        )
    return rows


def plot_variants(rows: list[dict[str, Any]], label: str, path: str | Path) -> Path:
    """Grouped bars: the model's top-1 on each dataset found, beside the published S / M / L figures (and the mCE)."""
    top1 = [r for r in rows if r["value"] != "" and r["dataset"] != "ImageNet-C"]
    c_row = next((r for r in rows if r["value"] != "" and r["dataset"] == "ImageNet-C"), None)
    fig, axes = new_figure(
        1,
        2 if c_row else 1,
        size=(max(6.0, 1.5 * len(top1) + 2) + (2.5 if c_row else 0), 4.5),
        width_ratios=[max(len(top1), 1), 1] if c_row else None,
    )
    series = [(label, "value", "tab:red")] + [
        (f"Sequencer2D-{size} (published)", f"sequencer2d_{size.lower()}", shade)
        for size, shade in (("S", "0.75"), ("M", "0.55"), ("L", "0.35"))
    ]
    ax = axes[0, 0]
    width = 0.8 / len(series)
    positions = np.arange(len(top1))
    for i, (name, key, colour) in enumerate(series):
        values = [float(r[key]) if r[key] != "" else np.nan for r in top1]
        bars = ax.bar(positions + (i - 1.5) * width, values, width, label=name, color=colour)
        if key == "value":
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(positions, [r["dataset"] for r in top1], rotation=20, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncols=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.grid(axis="y", alpha=0.3)
    if c_row:
        # The published figure is an mCE over all 15 corruptions: shown only beside one of ours.
        ax = axes[0, 1]
        published = c_row["metric"] == "mCE" and c_row["sequencer2d_l"] != ""
        values = [float(c_row["value"])] + ([float(c_row["sequencer2d_l"])] if published else [])
        ax.bar(range(len(values)), values, color=["tab:red", "0.35"][: len(values)])
        ax.set_xticks(range(len(values)), ["this model", "L (published)"][: len(values)], rotation=20, ha="right")
        ax.set_title(f"ImageNet-C {c_row['metric']}".replace(" over ", "\nover "), fontsize=8)
        ax.set_ylabel("% (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(label, fontsize=10)
    return save_figure(fig, path)
