"""ImageNet-C made on the fly: the corruptions and AlexNet's errors (`CORRUPTIONS`, `ALEXNET_MEAN_ERRORS`), the
corrupted dataset (`CorruptedImages`), the corruption error, `robustness()`, which scores a model under them, and the
files and figures of `sequencer robustness`.

Each image is resized and centre-cropped as for evaluation, corrupted as uint8 pixels by the `imagecorruptions`
package (Hendrycks & Dietterich's ImageNet-C code, packaged by bethgelab), then normalised. The corruption error of
corruption c is CE_c = sum_s err(c, s) / sum_s err_AlexNet(c, s); the mCE is their mean, in percent.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import inspect
import json
import logging
import os
import sys
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.patches import Patch
from torch.utils.data import Dataset

from sequencer.analysis.common import build_flagged_model, check_model_specs, evenly_spaced_subset, model_of
from sequencer.choices import CORRUPTION_FAMILIES, CORRUPTIONS, SEVERITIES
from sequencer.config import InputOverrides, RecordedModelSource, Runtime, flag_values, input_overrides, takes_groups
from sequencer.data import build_dataset, check_image_input_fits, create_transform, data_config, map_classes
from sequencer.distributed import DistributedContext, process_group
from sequencer.errors import MissingDependencyError, UsageError
from sequencer.files import write_csv
from sequencer.plotting import new_figure, save_figure
from sequencer.runtime import resolve_device, set_threads
from sequencer.validate import evaluate_dataset

_logger = logging.getLogger(__name__)

# AlexNet's top-1 error on ImageNet-C, each averaged over the five severities (Hendrycks & Dietterich, ICLR 2019;
# the normalisers published in their hendrycks/robustness repository and used for every reported mCE since).
ALEXNET_MEAN_ERRORS = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}


class _NumPyWithFloatAlias(types.ModuleType):
    """numpy as imagecorruptions 1.1.2 uses it: with the `np.float_` alias that NumPy 2 removed."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@contextlib.contextmanager
def _pkg_resources_stand_in() -> Iterator[None]:
    """A `pkg_resources` module with only `resource_filename`, in sys.modules for the duration of the block."""
    # setuptools >= 81 no longer ships pkg_resources; imagecorruptions only uses it to find its frost images.

    def resource_filename(module_name: str, resource: str) -> str:
        return os.path.join(os.path.dirname(sys.modules[module_name].__file__), resource)

    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_filename = resource_filename
    sys.modules["pkg_resources"] = stand_in
    try:
        yield
    finally:
        del sys.modules["pkg_resources"]


@functools.cache
def imagecorruptions() -> types.ModuleType:
    """The imagecorruptions package, bridged where its 2020 release no longer runs on today's libraries."""
    # Its latest release (1.1.2) imports pkg_resources (gone from setuptools >= 81), calls scikit-image's
    # `gaussian(multichannel=True)` (removed in scikit-image 0.20; `channel_axis=-1` means the same) and uses
    # `np.float_` (removed in NumPy 2; `np.float64` is the same type). The fixes merged upstream were never
    # released, so each is bridged here, inside that package only; the corruptions are the library's, unchanged.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its scipy.ndimage.interpolation import
            try:
                import imagecorruptions as package
            except ModuleNotFoundError as error:
                if error.name != "pkg_resources":
                    raise
                with _pkg_resources_stand_in():
                    import imagecorruptions as package
    except ModuleNotFoundError as error:
        raise MissingDependencyError(
            f"the ImageNet-C corruptions need the imagecorruptions package ({error}): "
            'pip install "sequencer[robustness]"'
        ) from error
    corruptions = package.corruptions
    gaussian = corruptions.gaussian
    if "multichannel" not in inspect.signature(gaussian).parameters:

        def gaussian_with_multichannel(image: np.ndarray, *args: Any, multichannel: bool = False, **kwargs: Any):
            if multichannel:
                kwargs["channel_axis"] = -1
            return gaussian(image, *args, **kwargs)

        corruptions.gaussian = gaussian_with_multichannel
    if not hasattr(np, "float_"):
        corruptions.np = _NumPyWithFloatAlias("numpy")
    return package


class CorruptedImages(Dataset):
    """A dataset of uint8 CHW image tensors, corrupted (severity 1-5; 0: clean) and normalised on the fly."""

    def __init__(self, base: Dataset, corruption: str, severity: int, mean: tuple, std: tuple, seed: int = 0) -> None:
        self.base = base
        self.corruption = corruption
        self.severity = severity
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def pixels(self, index: int) -> tuple[np.ndarray, int] | None:
        """The corrupted image as uint8 H x W x C pixels and its label (None for an unreadable image)."""
        sample = self.base[index]
        if sample is None:
            return None
        image, target = sample
        pixels = np.asarray(image).transpose(1, 2, 0)  # uint8 CHW: a tensor, or an array in older timm
        if self.severity:
            # The library draws from NumPy's global generator; seeding per image makes every run, with any number
            # of workers, see the same corrupted images.
            key = [self.seed, CORRUPTIONS.index(self.corruption), self.severity, index]
            np.random.seed(np.random.SeedSequence(key).generate_state(1)[0])
            pixels = imagecorruptions().corrupt(pixels, severity=self.severity, corruption_name=self.corruption)
        return pixels, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        sample = self.pixels(index)
        if sample is None:  # an unreadable image, skipped by the loader's collate
            return None
        pixels, target = sample
        # A copy: some corruptions return read-only arrays.
        image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)
        return (image.float() / 255.0 - self.mean) / self.std, target


def in_order(values: Sequence, allowed: tuple, flag: str) -> tuple:
    """The values in `allowed`'s order; a UsageError naming `flag` for an unknown value or none."""
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        problem = f"unknown {unknown}" if unknown else "none given"
        raise UsageError(f"{flag}: {problem}; choose among {', '.join(map(str, allowed))}")
    return tuple(v for v in allowed if v in values)


def load_alexnet_errors(path: str | os.PathLike) -> dict[str, dict[int, float] | float]:
    """AlexNet's errors from a JSON or CSV file, as fractions: per corruption a mean, or one error per severity."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--alexnet-errors {path}: file not found")
    try:
        table = _read_error_table(path)
    except (ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"--alexnet-errors {path}: cannot read it ({error}); see --help for the format") from None
    unknown = sorted(set(table) - set(CORRUPTIONS))
    if unknown:
        raise UsageError(f"{path}: unknown corruptions {unknown}; expected names among {', '.join(CORRUPTIONS)}")
    # Values above 1 anywhere in the file are read as percentages.
    values = [v for e in table.values() for v in (e.values() if isinstance(e, dict) else [e])]
    scale = 0.01 if any(v > 1 for v in values) else 1.0
    return {c: {s: v * scale for s, v in e.items()} if isinstance(e, dict) else e * scale for c, e in table.items()}


def _read_error_table(path: Path) -> dict[str, dict[int, float] | float]:
    """The file's errors by corruption, as written: a number, or {severity: number}."""
    # JSON: {"gaussian_noise": 0.886, ...} or {"gaussian_noise": [e1, ..., e5], ...}. CSV with a header:
    # corruption,error or corruption,severity,error.
    if path.suffix == ".json":
        return {
            name: {s: float(e) for s, e in zip(SEVERITIES, value, strict=True)}
            if isinstance(value, list)
            else float(value)
            for name, value in json.loads(path.read_text()).items()
        }
    table: dict[str, Any] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if "corruption" not in row or "error" not in row:
                raise UsageError(f"{path}: expected CSV columns corruption,error or corruption,severity,error")
            if row.get("severity"):
                table.setdefault(row["corruption"], {})[int(row["severity"])] = float(row["error"])
            else:
                table[row["corruption"]] = float(row["error"])
    return table


def corruption_error(errors: dict[int, float], alexnet: dict[int, float] | float | None) -> float | None:
    """CE_c = sum_s err(c, s) / sum_s err_AlexNet(c, s) over the severities run (errors as fractions), if known."""
    if alexnet is None:
        return None
    if isinstance(alexnet, dict):
        if not set(errors) <= set(alexnet):
            return None
        return sum(errors.values()) / sum(alexnet[s] for s in errors)
    # A mean over all five severities only normalises a run over all five.
    return sum(errors.values()) / (len(SEVERITIES) * alexnet) if set(errors) == set(SEVERITIES) else None


def plot_robustness(rows: list[dict[str, Any]], clean_top1: float, title: str, path: str | Path) -> Path:
    """One bar per corruption (top-1 averaged over severities), coloured by family, clean top-1 as a dashed line."""
    fig, axes = new_figure(size=(max(7.0, 0.55 * len(rows) + 2.5), 4.8))
    ax = axes[0, 0]
    colours = dict(zip(CORRUPTION_FAMILIES, ("tab:blue", "tab:orange", "tab:green", "tab:purple"), strict=True))
    family_of = {c: family for family, names in CORRUPTION_FAMILIES.items() for c in names}
    positions = np.arange(len(rows))
    bars = ax.bar(positions, [r["mean_top1"] for r in rows], color=[colours[family_of[r["corruption"]]] for r in rows])
    for bar, row in zip(bars, rows, strict=True):
        if row["ce"] != "":
            ax.annotate(
                f"CE {row['ce']:.0f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
    clean_line = ax.axhline(clean_top1, color="0.3", linestyle="--", linewidth=1, label=f"clean {clean_top1:.1f}%")
    families = [
        Patch(color=colour, label=family)
        for family, colour in colours.items()
        if any(family_of[r["corruption"]] == family for r in rows)
    ]
    ax.set_xticks(positions, [r["corruption"].replace("_", " ") for r in rows], rotation=45, ha="right")
    ax.set_ylabel("top-1 accuracy (%), mean over severities")
    ax.set_ylim(0, max(100.0, clean_top1 * 1.1))
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[clean_line, *families], fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_examples(
    base: Dataset, corruptions: Sequence[str], severities: Sequence[int], seed: int, path: str | Path
) -> Path:
    """The first image of the set, clean and under each corruption (rows) at each severity (columns)."""
    cols = 1 + len(severities)
    fig, axes = new_figure(len(corruptions), cols, size=(1.5 * cols + 1.2, 1.5 * len(corruptions) + 0.3))
    for row, corruption in enumerate(corruptions):
        for col, severity in enumerate((0, *severities)):
            sample = CorruptedImages(base, corruption, severity, (0.0,), (1.0,), seed).pixels(0)
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if sample is not None:
                ax.imshow(sample[0])
            if row == 0:
                ax.set_title("clean" if severity == 0 else f"severity {severity}", fontsize=8)
            if col == 0:
                ax.set_ylabel(corruption.replace("_", " "), fontsize=8)
    return save_figure(fig, path)


@dataclass(frozen=True)
class RobustnessResult:
    """What `robustness` measured, in percent: clean and corrupted accuracy, each corruption's error and its CE."""

    clean: dict[str, Any]  # `evaluate`'s metrics on the clean images
    by_severity: dict[str, list[dict[str, Any]]]  # per corruption: severity, top1, top5, error, loss, images
    rows: list[dict[str, Any]]  # per corruption: mean_top1, mean_error, ce ("" when AlexNet's errors do not cover it)
    mean_error: float  # over the corruptions
    mce: float | None  # the mean CE (AlexNet = 100), when every corruption has its CE
    clean_images: Dataset = field(repr=False)  # uint8 images, as `CorruptedImages` and `plot_examples` take them
    model: str = ""  # the model scored: --model, or the one its checkpoint records


@takes_groups(source=RecordedModelSource, preprocess=InputOverrides, runtime=Runtime)
def robustness(
    *,
    data: str | os.PathLike,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    alexnet_errors: Mapping[str, dict[int, float] | float] | None = None,
    limit: int | None = None,
    seed: int = 0,
    source: RecordedModelSource,
    preprocess: InputOverrides,
    runtime: Runtime,
    context: DistributedContext | None = None,
    progress: bool = False,
) -> RobustnessResult:
    """Top-1 of a trained model on the clean images of `data` and under each corruption at each severity, and the
    corruption errors normalised by AlexNet's (`alexnet_errors`, fractions; none: the published means).

    The arguments are `sequencer robustness`'s flags, with `corruptions` and `severities` as lists. `context`: the
    processes that share the images (torchrun's, from `sequencer.distributed.process_group`); none: this process
    alone, on `device`. `progress` draws a progress bar per pass on a terminal (rank 0's).
    """
    corruptions = in_order(corruptions, CORRUPTIONS, "--corruptions")
    severities = in_order(severities, SEVERITIES, "--severities")
    alexnet = ALEXNET_MEAN_ERRORS if alexnet_errors is None else alexnet_errors
    model, checkpoint = model_of(source.model, source.checkpoint, source.use_ema, source.unsafe_load)  # read once
    check_model_specs([(model, checkpoint)], need_weights=True)
    if source.in_chans not in (None, 3):
        raise UsageError(f"--in-chans {source.in_chans}: the ImageNet-C corruptions are defined on RGB images")
    imagecorruptions()  # fail now, not after the clean pass, if the package is missing
    set_threads(runtime.threads)
    context = context or DistributedContext(0, 1, resolve_device(runtime.device))
    overrides = input_overrides(preprocess)
    network = build_flagged_model(model, checkpoint, source, preprocess.img_size).to(context.device)
    config = data_config(network, **overrides)
    check_image_input_fits(network, config["input_size"])  # RGB: a model of other channels (as its file records)
    if min(config["input_size"][1:]) < 32:
        raise UsageError(f"input size {config['input_size']} is too small: imagecorruptions needs 32 px or more")
    # uint8 tensors (timm's prefetcher layout): corrupted as pixels, normalised afterwards by CorruptedImages.
    transform = create_transform(network, train=False, use_prefetcher=True, **overrides)
    base = build_dataset(os.fspath(data), "val", transform=transform)
    # Folders named by WordNet id (a subset of ImageNet val) take their ImageNet-1k index.
    base = map_classes(base, network.num_classes, network.pretrained_cfg.get("label_names"))
    base = evenly_spaced_subset(base, limit)

    def accuracy(corruption: str, severity: int) -> dict[str, Any]:
        images = CorruptedImages(base, corruption, severity, config["mean"], config["std"], seed)
        label = f"{corruption}, severity {severity}" if severity else "clean"
        return evaluate_dataset(network, images, runtime, context, label if progress else "")

    clean = accuracy(CORRUPTIONS[0], 0)
    if context.is_primary:
        _logger.info("clean: top-1 %.2f (%d images)", clean["top1"], clean["count"])
    by_severity, rows = {}, []
    for corruption in corruptions:
        per_severity = []
        for severity in severities:
            metrics = accuracy(corruption, severity)
            if context.is_primary:
                _logger.info("%s, severity %d: top-1 %.2f", corruption, severity, metrics["top1"])
            per_severity.append(
                dict(
                    severity=severity,
                    top1=round(metrics["top1"], 3),
                    top5=round(metrics["top5"], 3),
                    error=round(100 - metrics["top1"], 3),
                    loss=round(metrics["loss"], 4),
                    images=metrics["count"],
                )
            )
        by_severity[corruption] = per_severity
        errors = {r["severity"]: r["error"] / 100 for r in per_severity}
        ce = corruption_error(errors, alexnet.get(corruption))
        rows.append(
            dict(
                corruption=corruption,
                mean_top1=round(float(np.mean([r["top1"] for r in per_severity])), 3),
                mean_error=round(100 * float(np.mean(list(errors.values()))), 3),
                ce="" if ce is None else round(100 * ce, 2),
            )
        )
    return RobustnessResult(
        clean=clean,
        by_severity=by_severity,
        rows=rows,
        mean_error=float(np.mean([r["mean_error"] for r in rows])),
        mce=float(np.mean([r["ce"] for r in rows])) if all(r["ce"] != "" for r in rows) else None,
        clean_images=base,
        model=model,
    )


def run(args: argparse.Namespace) -> int:
    """`robustness` with the flags (AlexNet's file read first); rank 0 writes a CSV per corruption,
    robustness.csv/.png, examples.png and summary.json. Under torchrun each process evaluates its share of the images.
    """
    alexnet = load_alexnet_errors(args.alexnet_errors) if args.alexnet_errors else None
    with process_group(args.device) as context:
        result = robustness(**flag_values(robustness, args, alexnet_errors=alexnet, context=context, progress=True))
    if context.is_primary:
        alexnet_source = args.alexnet_errors or "published per-corruption means (Hendrycks & Dietterich)"
        write_report(result, Path(args.output), args.checkpoint, alexnet_source, args.seed)
    return 0


def write_report(result: RobustnessResult, out: Path, checkpoint: str, alexnet_source: str, seed: int) -> None:
    """The files of `sequencer robustness` in `out` (corruptions/<name>.csv, robustness.csv/.png, examples.png,
    summary.json) and its lines on stdout."""
    for corruption, per_severity in result.by_severity.items():
        write_csv(per_severity, out / "corruptions" / f"{corruption}.csv")
    write_csv(result.rows, out / "robustness.csv")
    corruptions = [row["corruption"] for row in result.rows]
    severities = [row["severity"] for row in result.by_severity[corruptions[0]]]
    clean, mce, mean_error = result.clean, result.mce, result.mean_error
    summary = dict(
        model=result.model,
        checkpoint=checkpoint,
        images=clean["count"],
        clean_top1=round(clean["top1"], 3),
        mean_corruption_error=round(mean_error, 3),
        mce=None if mce is None else round(mce, 2),
        corruptions=corruptions,
        severities=severities,
        alexnet_errors=alexnet_source,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    scope = f" over {len(corruptions)} of {len(CORRUPTIONS)} corruptions" if len(corruptions) < len(CORRUPTIONS) else ""
    if mce is None:
        headline = f"mean corruption error {mean_error:.2f}%{scope} (not AlexNet-normalised)"
        _logger.warning(
            "no mCE: AlexNet's errors do not cover the corruptions and severities run (the published "
            "means need all five severities; pass per-severity errors with --alexnet-errors)"
        )
    else:
        headline = f"mCE {mce:.2f}% (AlexNet = 100){scope}, mean corruption error {mean_error:.2f}%"
    plot_robustness(result.rows, clean["top1"], f"{result.model}\n{headline}", out / "robustness.png")
    plot_examples(result.clean_images, tuple(corruptions), tuple(severities), seed, out / "examples.png")
    print(f"{result.model}: clean top-1 {clean['top1']:.2f}%, {headline} ({clean['count']} images)")
    for row in result.rows:
        ce_text = "" if row["ce"] == "" else f"  CE {row['ce']:6.2f}"
        print(f"{row['corruption']:>18}  top-1 {row['mean_top1']:6.2f}  error {row['mean_error']:6.2f}{ce_text}")
    print(
        f"wrote {out / 'robustness.csv'}, {out / 'robustness.png'}, {out / 'examples.png'}, {out / 'summary.json'}, "
        f"{out / 'corruptions'}/"
    )
