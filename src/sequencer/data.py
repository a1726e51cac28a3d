"""Datasets, transforms and loaders: class-folder trees, CIFAR, and a built-in digits set that needs no download."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, resolve_data_config
from timm.data import create_transform as timm_create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.datasets import ImageFolder

from sequencer.errors import DatasetError

_logger = logging.getLogger(__name__)

_CONFIG_KEYS = ("input_size", "img_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def data_config(model: nn.Module | dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The model's preprocessing (input size, crop_pct, interpolation, mean, std), with `overrides` applied."""
    cfg = model if isinstance(model, dict) else getattr(model, "pretrained_cfg", {})
    args = {k: v for k, v in overrides.items() if v not in (None, "")}
    return resolve_data_config(args=args, pretrained_cfg=dict(cfg))


def posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the `bits_to_keep` high bits of each channel; 0 bits is a black image, as Pillow < 11 gave."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep >= 1:
        return ImageOps.posterize(image, bits_to_keep)
    return image.point([0] * 256 * len(image.getbands()))


# timm's RandAugment maps magnitude 10 of PosterizeIncreasing to 0 bits (m9 with mstd 0.5 draws >= 10 2.3% of the
# time: about 1.5 images in 1,000 under rand-m9-mstd0.5-inc1), which Pillow >= 11 refuses with a ValueError that
# kills the data-loader worker, so the paper's recipe could not finish an ImageNet epoch. Its models were trained
# with the black image that older Pillow returned: every posterize op of timm's policies gets that behaviour back.
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = posterize


def create_transform(model: nn.Module | dict[str, Any], train: bool = False, **overrides: Any) -> Callable:
    """The transform a model expects: resize by crop_pct, centre crop, normalise (or timm's training pipeline)."""
    cfg = data_config(model, **{k: overrides.pop(k) for k in list(overrides) if k in _CONFIG_KEYS})
    return timm_create_transform(**cfg, is_training=train, **overrides)


DIGITS_NAMES = ("digits", "sklearn/digits")
VAL_SPLITS = ("val", "validation", "test")
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


class SkipCounter:
    """A count of unreadable samples, shared with data-loader worker processes."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("i", 0)

    def increment(self) -> None:
        """Count one more skipped sample."""
        with self._value.get_lock():
            self._value.value += 1

    @property
    def value(self) -> int:
        """Samples skipped so far, in every process that shares this counter."""
        return self._value.value


class ImageFolderDataset(ImageFolder):
    """`ROOT/<class>/*` images; an unreadable image yields None (dropped by `collate_skipping`) and is counted."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        super().__init__(str(root), transform=transform)
        self.skip_counter = SkipCounter()

    @property
    def num_skipped(self) -> int:
        """Unreadable images met so far."""
        return self.skip_counter.value

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for truncated or non-image files
            self.skip_counter.increment()
            _logger.warning("skipping unreadable image %s: %s", path, error)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), upscaled to RGB PIL images; no download.

    The split is fixed (stratified, seed 0): 80% train, 20% val, so every run is scored on the same held-out images.
    """

    def __init__(self, split: str = "train", transform: Callable | None = None, img_size: int = 32) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", *VAL_SPLITS):
            raise DatasetError(f"unknown split {split!r} for the digits; expected 'train' or 'val'")
        digits = load_digits()
        train_idx, val_idx = train_test_split(
            np.arange(len(digits.target)),
            test_size=_DIGITS_VAL_FRACTION,
            random_state=_DIGITS_SPLIT_SEED,
            stratify=digits.target,
        )
        indices = train_idx if split == "train" else val_idx
        # Pixel values are 0..16; upscale once here so that per-sample transforms only crop and normalise.
        pixels = (digits.images[indices] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [
            Image.fromarray(p, mode="L").resize((img_size, img_size), Image.Resampling.BICUBIC).convert("RGB")
            for p in pixels
        ]
        self.targets = [int(t) for t in digits.target[indices]]
        self.classes = [str(d) for d in range(10)]
        self.transform = transform
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _torchvision_dataset(name: str, split: str, transform: Callable | None, root: str | None, download: bool):
    """torchvision's CIFAR-10/100 (`torch/cifar10`, `torch/cifar100`) from a local copy under `root`."""
    from torchvision import datasets

    classes = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    key = name.removeprefix("torch/").lower()
    if key not in classes:
        raise DatasetError(f"unknown dataset {name!r}; expected a folder, 'torch/cifar10', 'torch/cifar100' or none")
    if not root:
        raise DatasetError(f"{name} needs --data-dir (or DATA): the folder that holds (or will hold) its files")
    try:
        dataset = classes[key](root, train=split == "train", transform=transform, download=download)
    except RuntimeError as error:
        raise DatasetError(
            f"{name} not found under {root} ({error}); put a copy there or pass --dataset-download"
        ) from error
    dataset.num_skipped = 0
    return dataset


def _split_folder(root: Path, split: str) -> Path:
    """ROOT/train, ROOT/val (or validation); a ROOT that is itself a class-folder tree serves as the val split."""
    names = ("train",) if split == "train" else VAL_SPLITS if split in VAL_SPLITS else (split,)
    for name in names:
        if (root / name).is_dir():
            return root / name
    if split in VAL_SPLITS and not (root / "train").is_dir():
        return root
    raise DatasetError(f"no {split!r} folder in {root}; expected {root}/{names[0]}/<class>/<images>")


def build_dataset(
    name_or_root: str | None,
    split: str,
    transform: Callable | None = None,
    data_dir: str | None = None,
    download: bool = False,
    img_size: int = 32,
) -> Dataset:
    """A dataset with `.classes` and `.num_skipped`: a class-folder tree, `torch/cifar10|100`, or the digits (None)."""
    if name_or_root is None or name_or_root.lower() in DIGITS_NAMES:
        return DigitsDataset(split, transform, img_size)
    if name_or_root.startswith("torch/"):
        return _torchvision_dataset(name_or_root, split, transform, data_dir, download)
    root = Path(name_or_root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    folder = _split_folder(root, split)
    try:
        dataset = ImageFolderDataset(folder, transform)
    except FileNotFoundError as error:  # torchvision: no class folders, or a class folder without images
        raise DatasetError(f"empty dataset folder {folder}: {error}") from error
    return dataset


def collate_skipping(batch: list[Any]) -> Any:
    """Default collation after dropping the samples a dataset could not read (None); None if none is left."""
    readable = [sample for sample in batch if sample is not None]
    return default_collate(readable) if readable else None


def create_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 2,
    shuffle: bool = False,
    distributed: bool = False,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader; under DDP a DistributedSampler gives each rank its own shard (call `set_epoch` each epoch)."""
    sampler = DistributedSampler(dataset, shuffle=shuffle, drop_last=drop_last) if distributed else None
    # Workers start afresh every epoch (not persistent): their random streams are then drawn from the epoch's
    # seed, so a resumed run augments exactly as an uninterrupted one would.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn or collate_skipping,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )
