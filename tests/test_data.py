"""Datasets and loaders: the digits split, class-folder trees, unreadable images, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.data import DatasetError, build_dataset, create_loader, create_transform
from sequencer.model import create_model


def make_image_tree(
    root: Path, classes: int = 2, per_class: int = 6, size: int = 16, splits: tuple[str, ...] = ("train", "val")
) -> Path:
    """ROOT/<split>/<class>/*.png of noise tinted by class (red, green, blue): learnable whatever the crop or flip."""
    if classes > 3:
        raise ValueError("at most 3 classes: one per colour channel")
    rng = np.random.default_rng(0)
    for split in splits:
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                pixels[..., label] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    train = build_dataset(None, "train", img_size=16)
    val = build_dataset("digits", "val", img_size=16)
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert np.bincount(val.targets).min() >= 35  # stratified: every digit is held out
    image, label = val[0]
    assert image.mode == "RGB" and image.size == (16, 16) and 0 <= label < 10
    # Deterministic: the same images every time, and no held-out image is also a training image.
    again = build_dataset(None, "validation", img_size=16)
    assert again.targets == val.targets and np.array_equal(np.asarray(again[7][0]), np.asarray(val[7][0]))
    train_pixels = {np.asarray(img).tobytes() for img in train.images}
    overlap = sum(np.asarray(img).tobytes() in train_pixels for img in val.images)
    assert overlap <= 3  # the raw set holds a handful of exact duplicate digits, not a leaked split


def test_folder_tree_and_transform(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path, classes=3, per_class=2)
    model = create_model("sequencer2d_tiny", num_classes=3)
    dataset = build_dataset(str(root), "train", transform=create_transform(model, img_size=24))
    assert dataset.classes == ["class_0", "class_1", "class_2"] and len(dataset) == 6
    image, label = dataset[5]
    assert image.shape == (3, 24, 24) and label == 2
    # "validation" finds val/, and ROOT pointing straight at class folders serves as a validation set.
    assert len(build_dataset(str(root), "validation")) == 6
    assert build_dataset(str(root / "val"), "validation").classes == dataset.classes


def test_unreadable_image_is_skipped_with_a_warning_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_image_tree(tmp_path, per_class=3)
    (root / "train" / "class_1" / "broken.png").write_bytes(b"not a png")
    model = create_model("sequencer2d_tiny", num_classes=2)
    dataset = build_dataset(str(root), "train", transform=create_transform(model, img_size=16))
    # One worker process: the count must still reach the parent.
    labels = torch.cat([targets for _, targets in create_loader(dataset, batch_size=4, workers=1)])
    assert len(labels) == 6 and labels.tolist().count(1) == 3 and dataset.num_skipped == 1
    # In-process this time, to see the warning; a batch of nothing but unreadable images is None, not a crash.
    with caplog.at_level(logging.WARNING):
        batches = list(create_loader(dataset, batch_size=1, workers=0))
    assert f"skipping unreadable image {root / 'train' / 'class_1' / 'broken.png'}" in caplog.text
    assert batches.count(None) == 1 and len(batches) == 7 and dataset.num_skipped == 2


def test_missing_or_empty_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        build_dataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty dataset folder"):
        build_dataset(str(tmp_path / "empty"), "train")
    (tmp_path / "no_images" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty dataset folder"):
        build_dataset(str(tmp_path / "no_images"), "train")
    make_image_tree(tmp_path / "only_train", splits=("train",))
    with pytest.raises(DatasetError, match="no 'validation' folder"):
        build_dataset(str(tmp_path / "only_train"), "validation")


def test_cifar_reads_a_local_copy_and_never_downloads_unasked(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"not found under .*--dataset-download"):
        build_dataset("torch/cifar10", "train", data_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing fetched
    with pytest.raises(DatasetError, match="needs --data-dir"):
        build_dataset("torch/cifar100", "train")
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("torch/imagenet21k", "train", data_dir=str(tmp_path))
