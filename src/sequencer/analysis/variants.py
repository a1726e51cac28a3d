"""The ImageNet test sets beside ImageNet (ReaL, -A, -R, -Sketch, -V2, -C): where they are found, how each is scored,
their published Sequencer2D-S/M/L figures (`TEST_SETS`), `variants()`, which scores a model on those found, and the
table and chart of `sequencer variants`.

Class folders named by WordNet id or number take their ImageNet-1k index; ImageNet-A and -R are scored with the other
logits masked out, ImageNet-C (`imagenet-c/<corruption>/<severity>/<wnid>/*`, the released images) by the mCE of its
corruptions present, AlexNet-normalised when all five severities are.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sequencer.analysis.common import build_flagged_model, evenly_spaced_subset, model_of
from sequencer.analysis.robustness import ALEXNET_MEAN_ERRORS, corruption_error
from sequencer.choices import CORRUPTIONS, DATASET_FLAGS, DATASET_FOLDERS, SEVERITIES
from sequencer.config import InputOverrides, RecordedModelSource, Runtime, flag_values, input_overrides, takes_groups
from sequencer.data import build_dataset, check_image_input_fits, create_transform, data_config, map_classes
from sequencer.distributed import DistributedContext, process_group
from sequencer.errors import UsageError
from sequencer.files import write_csv
from sequencer.plotting import new_figure, save_figure
from sequencer.runtime import resolve_device, set_threads
from sequencer.validate import (
    WithRealLabels,
    check_targets_within,
    evaluate_dataset,
    load_real_labels,
    load_valid_classes,
)

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSet:
    """One test set: its key (DATASET_FLAGS'), title, the folder names it is looked for under ROOT, its published
    S/M/L figures and the class subset it is scored on."""

    key: str
    title: str
    folders: tuple[str, ...]
    reference: tuple[float | None, float | None, float | None]
    valid_labels: str = ""


# The published figures of the released Sequencer2D-S / M / L weights (timm's evaluation; ImageNet-C: the paper's,
# L only). ImageNet-ReaL and plain ImageNet top-1 come from the same pass over the ImageNet val folder.
TEST_SETS = (
    TestSet("imagenet", "ImageNet", DATASET_FOLDERS["real"], (82.3, 82.8, 83.4)),
    TestSet("real", "ImageNet-ReaL", DATASET_FOLDERS["real"], (87.37, 87.57, 87.91)),
    TestSet("a", "ImageNet-A", DATASET_FOLDERS["a"], (26.4, 30.4, 35.1), "imagenet-a"),
    TestSet("r", "ImageNet-R", DATASET_FOLDERS["r"], (45.0, 46.2, 48.1), "imagenet-r"),
    TestSet("sketch", "ImageNet-Sketch", DATASET_FOLDERS["sketch"], (33.4, 34.7, 35.8)),
    TestSet("v2", "ImageNet-V2", DATASET_FOLDERS["v2"], (71.7, 72.4, 73.6)),
    TestSet("c", "ImageNet-C", DATASET_FOLDERS["c"], (None, None, 48.9)),
)


def find_test_sets(
    root: str | os.PathLike | None, overrides: dict[str, str | os.PathLike | None]
) -> tuple[dict[str, Path], list[str]]:
    """The folder of each test set (its flag's, else the first usual name under ROOT) and the titles not found."""
    if not root and not any(overrides.values()):
        flags = ", ".join(f"--{flag}" for flag, _ in DATASET_FLAGS.values())
        raise UsageError(f"name ROOT, the folder holding the datasets, or their folders with {flags}")
    found, missing = {}, []
    for test_set in TEST_SETS:
        if test_set.key == "imagenet":
            continue
        flagged = overrides.get(test_set.key)
        if flagged:
            if not Path(flagged).is_dir():
                raise UsageError(f"--{DATASET_FLAGS[test_set.key][0]} {flagged}: folder not found")
            found[test_set.key] = Path(flagged)
            continue
        candidates = [Path(root) / name for name in test_set.folders] if root else []
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            missing.append(f"{test_set.title} (looked for {', '.join(map(str, candidates)) or 'no ROOT given'})")
        else:
            found[test_set.key] = folder
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


@takes_groups(source=RecordedModelSource, preprocess=InputOverrides, runtime=Runtime)
def variants(
    *,
    root: str | os.PathLike | None = None,
    imagenet_val: str | os.PathLike | None = None,
    imagenet_a: str | os.PathLike | None = None,
    imagenet_r: str | os.PathLike | None = None,
    imagenet_sketch: str | os.PathLike | None = None,
    imagenetv2: str | os.PathLike | None = None,
    imagenet_c: str | os.PathLike | None = None,
    real_labels: str | os.PathLike = "",
    limit: int | None = None,
    source: RecordedModelSource,
    preprocess: InputOverrides,
    runtime: Runtime,
    context: DistributedContext | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Score a 1000-class model on each test set found: one row per test set of `TEST_SETS` (found or not, naming the
    model scored, beside the published figures) and the test sets not found, with where they were looked for.

    The arguments are `sequencer variants`'s flags: `root` holds the test sets under their usual names, and
    `imagenet_val` ... `imagenet_c` (--imagenet-val ... --imagenet-c) name a test set's folder instead. `context`:
    the processes that share the images (torchrun's, from `sequencer.distributed.process_group`); none: this process
    alone, on `device`. `progress` draws a progress bar per test set on a terminal (rank 0's).
    """
    if source.in_chans not in (None, 3):
        raise UsageError(f"--in-chans {source.in_chans}: the ImageNet test sets are RGB images")
    set_threads(runtime.threads)
    context = context or DistributedContext(0, 1, resolve_device(runtime.device))
    flagged = dict(real=imagenet_val, a=imagenet_a, r=imagenet_r, sketch=imagenet_sketch, v2=imagenetv2, c=imagenet_c)
    found, missing = find_test_sets(root, flagged)
    model, checkpoint = model_of(source.model, source.checkpoint, source.use_ema, source.unsafe_load)  # read once
    network = build_flagged_model(model, checkpoint, source)
    if getattr(network, "num_classes", None) != 1000:
        raise UsageError(f"the ImageNet test sets need a 1000-class model; {model} has {network.num_classes}")
    check_image_input_fits(network, data_config(network, **input_overrides(preprocess))["input_size"])
    transform = create_transform(network, train=False, **input_overrides(preprocess))
    # Every folder is read and labelled first, so a wrong tree fails before any evaluation.
    real = load_real_labels(real_labels or None) if "real" in found else None
    test_sets = {
        key: _load(folder, transform, limit, real if key == "real" else None)
        for key, folder in found.items()
        if key != "c"
    }
    valid_classes = {t.key: load_valid_classes(t.valid_labels, 1000) for t in TEST_SETS if t.valid_labels}
    for key, valid in valid_classes.items():
        if key in test_sets:
            check_targets_within(getattr(test_sets[key], "dataset", test_sets[key]), valid)
    corrupted = {}
    if "c" in found:
        corrupted = {k: _load(f, transform, limit) for k, f in corruption_folders(found["c"]).items()}
    network = network.to(context.device)

    def score(dataset: Dataset, label: str, valid: torch.Tensor | None = None) -> dict[str, Any]:
        """`evaluate` over one dataset, each process its share, `label` on rank 0's progress bar."""
        return evaluate_dataset(network, dataset, runtime, context, label if progress else "", valid)

    results = {}
    for key, dataset in test_sets.items():
        title = next(t.title for t in TEST_SETS if t.key == key)
        metrics = score(dataset, title, valid_classes.get(key))
        if key == "real":
            results["imagenet"] = dict(value=metrics["top1"], images=metrics["count"], folder=found[key])
            # An evenly spaced subset (--limit) may hold no labelled image: no ReaL figure then.
            real_top1, real_count = metrics.get("real_top1", float("nan")), metrics.get("real_count", 0)
            results["real"] = dict(value=real_top1, images=real_count, folder=found[key])
        else:
            results[key] = dict(value=metrics["top1"], images=metrics["count"], folder=found[key])
        if context.is_primary:
            _logger.info("%s: top-1 %.2f (%d images)", title, results[key]["value"], results[key]["images"])
    if corrupted:
        results["c"] = _imagenet_c(corrupted, score, context.is_primary) | dict(folder=found["c"])
    return _rows(results, model), missing


def run(args: argparse.Namespace) -> int:
    """`variants` with the flags; rank 0 writes variants.csv and variants.png and says which test sets were missing.
    Under torchrun each process evaluates its share of every test set."""
    with process_group(args.device) as context:
        rows, missing = variants(**flag_values(variants, args, context=context, progress=True))
    if not context.is_primary:
        return 0
    out = Path(args.output)
    write_csv(rows, out / "variants.csv")
    plot_test_sets(
        rows,
        f"{rows[0]['model']} {Path(args.checkpoint).name if args.checkpoint else '(random weights)'}",
        out / "variants.png",
    )
    for row in rows:
        if row["value"] != "":
            print(f"{row['dataset']:>16}  {row['metric']:<9} {row['value']:7.2f}  ({row['images']} images)")
    if missing:
        print(f"missing: {'; '.join(missing)}")
    print(f"wrote {out / 'variants.csv'}, {out / 'variants.png'}")
    return 0


def _imagenet_c(
    folders: dict[tuple[str, int], Dataset], score: Callable[[Dataset, str], dict[str, Any]], is_primary: bool
) -> dict[str, Any]:
    """The mCE over the corruptions present (AlexNet-normalised when all five severities are), else the mean error;
    `score` evaluates one folder."""
    errors: dict[str, dict[int, float]] = {}
    images = 0
    for (corruption, severity), dataset in folders.items():
        metrics = score(dataset, f"ImageNet-C {corruption}, severity {severity}")
        errors.setdefault(corruption, {})[severity] = 1 - metrics["top1"] / 100
        images += metrics["count"]
        if is_primary:
            _logger.info("ImageNet-C %s, severity %d: top-1 %.2f", corruption, severity, metrics["top1"])
    ces = [corruption_error(e, ALEXNET_MEAN_ERRORS[c]) for c, e in errors.items()]
    scope = "" if len(errors) == len(CORRUPTIONS) else f" over {len(errors)} of {len(CORRUPTIONS)} corruptions"
    if all(ce is not None for ce in ces):
        return dict(metric="mCE" + scope, value=100 * float(np.mean(ces)), images=images)
    mean_error = 100 * float(np.mean([v for e in errors.values() for v in e.values()]))
    return dict(metric="mean error" + scope, value=mean_error, images=images)


def _rows(results: dict[str, dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """One CSV row per test set, found or not, with `model`'s figure beside the published S / M / L ones."""
    rows = []
    for test_set in TEST_SETS:
        result = results.get(test_set.key)
        default_metric = "mCE" if test_set.key == "c" else "ReaL top-1" if test_set.key == "real" else "top-1"
        published = ["" if figure is None else figure for figure in test_set.reference]
        rows.append(
            dict(
                model=model,
                dataset=test_set.title,
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


def plot_test_sets(rows: list[dict[str, Any]], label: str, path: str | Path) -> Path:
    """Grouped bars: the model's top-1 on each test set found, beside the published S / M / L figures (and the mCE)."""
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
