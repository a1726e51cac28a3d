"""Effective receptive fields (`effective_receptive_fields`), their shape measures and their figure, behind
`sequencer erf`.

The paper's recipe: the gradient of the centre output feature (summed over channels) with respect to the input
image, ReLU, summed over colour channels, averaged over images, shown as log10(x + 1) heat maps. Sequencer's map is
cross-shaped (the vertical and horizontal LSTMs see whole columns and rows), a CNN's is a compact blob.
Models without a checkpoint are randomly initialised from --seed; timm's ResNets then start with zeroed residual
branches, so their maps only mean something with trained weights. The gradients of -b images are taken at once:
the memory grows with -b, the maps do not depend on it (images do not interact in eval mode).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sequencer.analysis.common import build_flagged_model, compared_models, evenly_spaced_subset, model_labels
from sequencer.data import build_dataset, check_input_fits, create_loader, create_transform, data_config
from sequencer.errors import UsageError
from sequencer.files import write_csv
from sequencer.model import Sequencer, route
from sequencer.plotting import new_figure, save_figure
from sequencer.runtime import progress_bar, resolve_device, set_threads

_logger = logging.getLogger(__name__)

NUM_STAGES = 4


@dataclass
class StageERF:
    """One stage's receptive-field map (input H x W, not log-scaled) and the size of the stage's output map."""

    name: str
    erf: np.ndarray
    feature_size: tuple[int, int]

    @property
    def band(self) -> float:
        """Half the width, in input pixels, of one output cell of the stage: the half-width of a cross's arm."""
        return self.erf.shape[0] / self.feature_size[0] / 2


def stage_feature_levels(feature_info: list[dict]) -> list[int]:
    """Feature levels standing for a timm model's stages: the last of each resolution, or four spread over a ViT."""
    # Hierarchical models: the deepest four resolutions. Isotropic ones (one resolution, a ViT's blocks): four
    # evenly spaced levels ending at the last.
    reductions = [info["reduction"] for info in feature_info]
    ends = [i for i, r in enumerate(reductions) if i == len(reductions) - 1 or reductions[i + 1] != r]
    if len(ends) > 1:
        return ends[-NUM_STAGES:]
    return sorted({math.ceil(len(reductions) * (k + 1) / NUM_STAGES) - 1 for k in range(NUM_STAGES)})


def stage_extractor(model: nn.Module) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], list[str]]:
    """A function from images to the NCHW output map of each stage, and the stages' names."""
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise UsageError(
            f"{type(model).__name__} has no forward_intermediates / feature_info: timm cannot give its "
            "per-stage maps, so its receptive field cannot be measured here"
        )
    if isinstance(model, Sequencer):  # every stage: two of the four share a resolution
        indices = list(range(len(model.stages)))
        names = [f"stage {i + 1}" for i in indices]
    else:
        indices = stage_feature_levels(model.feature_info)
        names = [model.feature_info[i]["module"] for i in indices]
    return functools.partial(model.forward_intermediates, indices=indices, intermediates_only=True), names


@contextlib.contextmanager
def input_gradient_mode(model: nn.Module) -> Iterator[None]:
    """Let an eval-mode model backpropagate to its input once per stage from one forward pass; restore it after."""
    # Sequencer's mixers run the reference recurrences (nn.LSTM): the fused path's hand-written backward runs once
    # per forward. The model itself runs its recurrent layers in train mode for cuDNN when a backward will follow.
    with route(model, rnn_impl="reference"):
        yield


def effective_receptive_fields(
    model: nn.Module, images: Iterator[torch.Tensor], device: torch.device, progress: str = "", total: int | None = None
) -> list[StageERF]:
    """Per stage, the mean over images of ReLU(d centre feature / d input) summed over colour channels (H x W).

    `progress`: the label of a progress bar over the `total` images, shown on a terminal; none when empty."""
    extract, names = stage_extractor(model)
    model.eval().to(device)
    sums: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    count = 0
    bar = progress_bar(show=bool(progress), total=total, desc=progress, unit="img")
    with input_gradient_mode(model), bar:
        for batch in images:
            x = batch.to(device).requires_grad_(True)
            maps = extract(x)
            if not sums:
                sums = [torch.zeros(x.shape[-2:], dtype=torch.float64, device=device) for _ in maps]
                sizes = [tuple(m.shape[-2:]) for m in maps]
            for i, feature_map in enumerate(maps):
                # The centre cell of an odd map, the upper-left of the central four of an even one (as the authors).
                h, w = feature_map.shape[-2:]
                centre = feature_map[:, :, (h - 1) // 2, (w - 1) // 2].sum()
                # Images do not interact (eval mode), so the batch sum gives each image its own gradient.
                (grad,) = torch.autograd.grad(centre, x, retain_graph=i < len(maps) - 1)
                sums[i] += grad.clamp(min=0).sum(dim=(0, 1), dtype=torch.float64)
            count += x.shape[0]
            bar.update(x.shape[0])
    if count == 0:
        raise UsageError("no images to measure the receptive field on")
    return [StageERF(n, (s / count).cpu().numpy(), size) for n, s, size in zip(names, sums, sizes, strict=True)]


def random_images(config: dict, num_images: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Uniform-noise images in [0, 1], normalised with the model's mean and std (used when no data is given)."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        yield (torch.rand(n, *config["input_size"], generator=generator) - mean) / std


def dataset_images(loader: DataLoader) -> Iterator[torch.Tensor]:
    """The images of a (image, label) loader; a batch none of whose images could be read (None) yields nothing."""
    for batch in loader:
        if batch is not None:
            yield batch[0]


def cross_share(erf: np.ndarray, band: float) -> float | None:
    """How much of the map's density lies on its centre row and column, in [0, 1]: 0.5 isotropic, 1 a pure cross.

    None when nothing can be told: an all-zero map, or one whose mass lies within `band` px of its centre.
    """
    # Distances from the map's centre of mass. Within each ring of equal distance, the pixels within `band` of the
    # centre row or column ("on the cross") are compared with the rest of the ring: the cross's mass against the
    # mass the same pixels would hold at the rest's mean density, as cross / (cross + that). 0.5 for any isotropic
    # map (a CNN's blob, whatever its width), towards 1 for Sequencer's cross (1 when nothing lies off it), below
    # 0.5 for a square patch (a ViT's own patch), 0 when nothing lies on it.
    h, w = erf.shape
    total = erf.sum()
    if total <= 0:
        return None
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    cy, cx = float((erf * ys).sum() / total), float((erf * xs).sum() / total)
    dy, dx = np.abs(ys - cy), np.abs(xs - cx)
    ring = np.floor(np.hypot(dy, dx)).astype(int)
    on_cross = np.minimum(dy, dx) <= band
    observed = expected = 0.0
    # Rings wholly within the cross's arms (both parts needed) say nothing about its shape.
    for r in np.unique(ring[ring > band]):
        cross_px, rest_px = (ring == r) & on_cross, (ring == r) & ~on_cross
        if cross_px.any() and rest_px.any():
            observed += erf[cross_px].sum()
            expected += erf[rest_px].mean() * cross_px.sum()
    if observed + expected <= 0:
        return None
    return float(observed / (observed + expected))


def area_for_mass(erf: np.ndarray, fraction: float) -> float | None:
    """Smallest share of the image's pixels (strongest first) that holds `fraction` of the map's mass (None: none)."""
    values = np.sort(erf.ravel())[::-1]
    cumulative = np.cumsum(values)
    if cumulative[-1] <= 0:
        return None
    return float((np.searchsorted(cumulative, fraction * cumulative[-1]) + 1) / values.size)


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def plot_erf_grid(results: list[tuple[str, list[StageERF]]], path: str | Path) -> Path:
    """One row per model, one column per stage, log10(x + 1) maps on a colour scale shared within each model."""
    cols = max(len(stages) for _, stages in results)
    fig, axes = new_figure(len(results), cols, size=(2.6 * cols + 1.0, 2.6 * len(results) + 0.6))
    for row, (model_name, stages) in enumerate(results):
        logs = [np.log10(stage.erf + 1.0) for stage in stages]
        vmax = max(float(m.max()) for m in logs) or 1.0
        image = None
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(logs):
                ax.axis("off")
                continue
            image = ax.imshow(logs[col], cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
            h, w = stages[col].feature_size
            ax.set_title(f"{stages[col].name} ({h}x{w})", fontsize=9)
            if col == 0:
                ax.set_ylabel(model_name, fontsize=10)
        fig.colorbar(image, ax=list(axes[row, : len(logs)]), shrink=0.85, label="log10(1 + gradient)")
    h, w = results[0][1][0].erf.shape
    fig.suptitle(f"Effective receptive field of each stage's centre output ({h}x{w} input)")
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    """Measure every model's per-stage ERF on the same images; write the table, the maps and the figure."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    if args.amp:
        raise UsageError("--amp does not apply to erf: the input gradients are computed in float32")
    specs = compared_models(args)
    dataset = build_dataset(args.data, "val") if args.data else None
    img_size = args.img_size
    results, rows, arrays = [], [], {}
    for (name, checkpoint), label in zip(specs, model_labels(specs), strict=True):
        # The weights of a model without checkpoint come from --seed, whatever the order of the models.
        torch.manual_seed(args.seed)
        model = build_flagged_model(name, checkpoint, args, img_size)
        img_size = img_size or data_config(model)["input_size"][-1]
        # Random images take the model's channels; a dataset's are read as RGB.
        channels = 3 if dataset is not None else data_config(model)["input_size"][0]
        check_input_fits(model, (channels, img_size, img_size), "--img-size")
        if dataset is not None:
            dataset.transform = create_transform(model, img_size=img_size)
            images = dataset_images(
                create_loader(evenly_spaced_subset(dataset, args.num_images), args.batch_size, args.workers)
            )
        else:
            images = random_images(data_config(model, img_size=img_size), args.num_images, args.batch_size, args.seed)
        _logger.info(
            "%s: ERF on up to %d %s images at %d px",
            label,
            args.num_images,
            "data" if args.data else "random",
            img_size,
        )
        stages = effective_receptive_fields(model, images, device, progress=label, total=args.num_images)
        for index, stage in enumerate(stages):
            rows.append(
                dict(
                    model=label,
                    stage=index + 1,
                    layer=stage.name,
                    feature_size=stage.feature_size[0],
                    cross_share=_rounded(cross_share(stage.erf, stage.band), 3),
                    area_50=_rounded(area_for_mass(stage.erf, 0.5), 4),
                    area_90=_rounded(area_for_mass(stage.erf, 0.9), 4),
                )
            )
            arrays[f"{label}/stage{index + 1}"] = stage.erf
        results.append((label, stages))
    out = Path(args.output)
    write_csv(rows, out / "erf.csv")
    np.savez_compressed(out / "erf.npz", **arrays)
    plot_erf_grid(results, out / "erf.png")
    for row in rows:
        share = "n/a" if row["cross_share"] is None else f"{row['cross_share']:.3f}"
        area = "n/a (all-zero map)" if row["area_50"] is None else f"{100 * row['area_50']:5.2f}% of the pixels"
        print(f"{row['model']:>28} {row['layer']:>10}  cross share {share:>5}  half the mass in {area}")
    print(f"wrote {out / 'erf.csv'}, {out / 'erf.npz'}, {out / 'erf.png'}")
    return 0
