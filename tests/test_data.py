"""Datasets and loaders: the digits split, class-folder trees, unreadable images, clear errors."""

from __future__ import annotations

import importlib
import json
import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.builder import create_model
from sequencer.data import DatasetError, build_dataset, create_loader, create_transform
from sequencer.errors import UsageError


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


def test_folder_tree_and_transform(make_image_tree, tmp_path: Path) -> None:
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
    make_image_tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
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
    assert batches.count(None) == 1 and len(batches) == 7 and dataset.num_skipped == 1  # the same image, met again


def test_missing_or_empty_folders_are_clear_errors(make_image_tree, tmp_path: Path) -> None:
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


@pytest.mark.parametrize(("name", "module"), [("cifar10", "cifar"), ("oxford_iiit_pet", "oxford_iiit_pet")])
def test_a_failed_download_does_not_suggest_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str
) -> None:
    def offline(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(
        importlib.import_module(f"torchvision.datasets.{module}"), "download_and_extract_archive", offline
    )
    with pytest.raises(DatasetError, match=f"torch/{name} could not be downloaded into {tmp_path}") as error:
        build_dataset(f"torch/{name}", "train", data_dir=str(tmp_path), download=True)
    assert "name resolution" in str(error.value) and "--dataset-download" not in str(error.value)


def _tinted_jpeg(path: Path, label: int, rng: np.random.Generator, size: int = 16) -> None:
    """A noise image tinted by `label` (one colour channel per class, as in `make_image_tree`)."""
    pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    pixels[..., label % 3] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_flowers102(root: Path, labels: tuple[int, ...] = (1, 2, 3, 1, 2, 3, 1, 2, 3)) -> Path:
    """DATA/flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}: image i+1 has 1-based label labels[i]."""
    from scipy.io import savemat

    base, rng = root / "flowers-102", np.random.default_rng(0)
    for i, label in enumerate(labels, 1):
        _tinted_jpeg(base / "jpg" / f"image_{i:05d}.jpg", label - 1, rng)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "setid.mat", {"trnid": ids[0::3], "valid": ids[1::3], "tstid": ids[2::3]})
    return root


def make_stanford_cars(root: Path, per_split: int = 4) -> Path:
    """DATA/stanford_cars/{cars_train, cars_test, cars_test_annos_withlabels.mat, devkit/{train annos, meta}}."""
    from scipy.io import savemat

    base, rng = root / "stanford_cars", np.random.default_rng(0)
    record = [("fname", object), ("class", object)]
    for folder, annotations_file in (
        ("cars_train", "devkit/cars_train_annos.mat"),
        ("cars_test", "cars_test_annos_withlabels.mat"),
    ):
        rows = [(f"{i:05d}.jpg", 1 + i % 2) for i in range(1, per_split + 1)]
        for name, label in rows:
            _tinted_jpeg(base / folder / name, label - 1, rng)
        (base / annotations_file).parent.mkdir(parents=True, exist_ok=True)
        savemat(base / annotations_file, {"annotations": np.array(rows, dtype=record)})
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(["AM General Hummer", "Acura RL"], object)})
    return root


PET_BREEDS = ("Abyssinian", "basset_hound", "Bengal")


def make_oxford_pets(root: Path, per_breed: int = 3) -> Path:
    """DATA/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}: 'id class species breed_id'."""
    base, rng = root / "oxford-iiit-pet", np.random.default_rng(0)
    (base / "annotations").mkdir(parents=True)
    for split, offset in (("trainval", 0), ("test", 100)):
        lines = []
        for label, breed in enumerate(PET_BREEDS):
            for n in range(offset + 1, offset + per_breed + 1):
                _tinted_jpeg(base / "images" / f"{breed}_{n}.jpg", label, rng)
                lines.append(f"{breed}_{n} {label + 1} {1 if breed[0].isupper() else 2} {n}")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_flowers102_reads_its_mat_files_and_maps_the_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import flowers102

    make_flowers102(tmp_path)
    # torchvision checks the published md5 of the .mat files, which a fake copy cannot have: refused as corrupted...
    with pytest.raises(DatasetError, match="is incomplete or corrupted under"):
        build_dataset("torch/flowers102", "train", data_dir=str(tmp_path))
    # ... so check their presence instead.
    monkeypatch.setattr(flowers102, "check_integrity", lambda path, md5=None: Path(path).is_file())
    train = build_dataset(
        "torch/flowers102", "train", transform=lambda image: np.asarray(image), data_dir=str(tmp_path)
    )
    val, test = (build_dataset("torch/flowers102", split, data_dir=str(tmp_path)) for split in ("validation", "test"))
    assert len(train.classes) == 102 and train.classes[0] == "pink primrose"
    assert len(train) == len(val) == len(test) == 3
    # setid.mat's trnid holds images 1, 4, 7 (labels 1, 1, 1 -> class 0); tstid images 3, 6, 9 (class 2).
    assert [train[i][1] for i in range(3)] == [0, 0, 0] and [test[i][1] for i in range(3)] == [2, 2, 2]
    image = train[0][0]
    assert image.shape == (16, 16, 3) and image[..., 0].mean() > image[..., 1].mean()  # the transform ran


def test_stanford_cars_reads_the_devkit(tmp_path: Path) -> None:
    root = make_stanford_cars(tmp_path)
    train = build_dataset("torch/stanford_cars", "train", data_dir=str(root))
    val = build_dataset("torch/stanford_cars", "validation", data_dir=str(root))  # Cars has no val: its test split
    assert train.classes == val.classes == ["AM General Hummer", "Acura RL"]
    assert [train[i][1] for i in range(len(train))] == [1, 0, 1, 0] and len(val) == 4
    with pytest.raises(DatasetError, match="cannot be downloaded"):
        build_dataset("torch/stanford_cars", "train", data_dir=str(root), download=True)


def test_oxford_pets_trainval_and_test_and_unreadable_images(tmp_path: Path) -> None:
    root = make_oxford_pets(tmp_path)
    model = create_model("sequencer2d_tiny", num_classes=3)
    train = build_dataset("torch/oxford_iiit_pet", "train", create_transform(model, img_size=16), str(root))
    test = build_dataset("torch/oxford_iiit_pet", "val", data_dir=str(root))
    assert train.classes == test.classes == ["Abyssinian", "Basset Hound", "Bengal"]
    assert len(train) == len(test) == 9
    image, label = train[8]
    assert image.shape == (3, 16, 16) and label == 2
    (root / "oxford-iiit-pet" / "images" / "Bengal_3.jpg").write_bytes(b"not a jpeg")
    labels = torch.cat([targets for _, targets in create_loader(train, batch_size=3, workers=0)])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2] and train.num_skipped == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("flowers102", "flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}"),
        ("stanford_cars", "devkit/{cars_train_annos.mat, cars_meta.mat}"),
        ("oxford_iiit_pet", "oxford-iiit-pet/{images/*.jpg, annotations/{trainval.txt, test.txt}}"),
    ],
)
def test_missing_transfer_dataset_names_the_expected_layout(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetError, match="not found under") as error:
        build_dataset(f"torch/{name}", "train", data_dir=str(tmp_path))
    assert expected in str(error.value)
    if name == "stanford_cars":  # its download URL is gone: no remedy that cannot work
        assert "--dataset-download" not in str(error.value) and "can no longer be downloaded" in str(error.value)
    else:
        assert "pass --dataset-download to fetch it" in str(error.value)
    assert not any(tmp_path.iterdir())  # nothing fetched
    with pytest.raises(DatasetError, match="unknown split 'holdout'"):
        build_dataset(f"torch/{name}", "holdout", data_dir=str(tmp_path))


# The authors' transfer recipe (CIFAR-10), verbatim but for the dataset, its class count, the released weights
# (a local file here) and the size: tiny model, batch 4, 32 px, one epoch.
TRANSFER_RECIPE = (
    "--model sequencer2d_s -b 128 -j 4 --num-classes 10 --dataset torch/cifar10 --pretrained --opt adamw "
    "--epochs 200 --sched cosine --native-amp --img-size 224 --clip-grad 1 --drop-path 0.1 --lr 0.0001 "
    "--weight-decay 1e-4 --remode pixel --aa rand-m9-mstd0.5-inc1 --smoothing 0.1 --mixup 0.8 --cutmix 1.0 "
    "--warmup-lr 1e-6 --warmup-epochs 5"
)


@pytest.mark.slow
def test_transfer_recipe_trains_on_oxford_pets(run_cli, tmp_path: Path) -> None:
    from sequencer.checkpoint import save_weights

    root = make_oxford_pets(tmp_path / "data", per_breed=4)
    save_weights(create_model("sequencer2d_tiny", num_classes=1000), tmp_path / "in1k.safetensors")
    changes = {
        "--model sequencer2d_s -b 128 -j 4 --num-classes 10": "--model sequencer2d_tiny -b 4 -j 0 --num-classes 3",
        "--dataset torch/cifar10 --pretrained": "--dataset torch/oxford_iiit_pet --initial-checkpoint "
        + str(tmp_path / "in1k.safetensors"),
        "--epochs 200": "--epochs 1 --cooldown-epochs 0",
        "--img-size 224": "--img-size 32",
    }
    command = TRANSFER_RECIPE
    for old, new in changes.items():
        assert old in command
        command = command.replace(old, new)
    out = tmp_path / "run"
    assert run_cli("train", *command.split(), "--data-dir", str(root), "--output", str(out), "--no-progress") == 0
    last = next(out.rglob("last.pth.tar"))
    head = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]["head.fc.weight"]
    assert head.shape == (3, 128) and head.abs().sum() > 0  # a new 3-class head (zero at first), trained on Pets
    results = tmp_path / "results.json"
    validate = f"--dataset torch/oxford_iiit_pet --data-dir {root} --model sequencer2d_tiny --checkpoint {last} -j 0"
    assert run_cli("validate", *validate.split(), "--results-file", str(results)) == 0
    assert json.loads(results.read_text())["count"] == 12  # the test split


def test_create_transform_names_an_unknown_interpolation() -> None:
    model = create_model("sequencer2d_tiny")
    with pytest.raises(UsageError, match="unknown interpolation 'zz'; expected one of nearest, bilinear"):
        create_transform(model, interpolation="zz")
    with pytest.raises(UsageError, match="unknown interpolation 'random'"):
        create_transform(model, interpolation="random")  # per-image choice: training only
    assert create_transform(model, train=True, interpolation="random") is not None


def test_validate_counts_the_unreadable_images_of_a_torchvision_dataset(tmp_path: Path) -> None:
    from sequencer.validate import validate

    root = make_oxford_pets(tmp_path)
    (root / "oxford-iiit-pet" / "images" / "Bengal_101.jpg").write_bytes(b"not a jpeg")
    results = validate(
        model="sequencer2d_tiny", dataset="torch/oxford_iiit_pet", data_dir=root, split="val", img_size=16, workers=0
    )
    assert results["count"] == 8 and results["num_skipped"] == 1


def test_a_named_split_folder_is_read_before_its_alternatives(make_image_tree, tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "ds", per_class=1, splits=("train", "val", "test"))
    assert Path(build_dataset(str(root), "test").root).name == "test"
    assert Path(build_dataset(str(root), "validation").root).name == "val"
    make_image_tree(tmp_path / "no_test", per_class=1, splits=("train", "val"))
    with pytest.raises(DatasetError, match="no 'test' folder"):
        build_dataset(str(tmp_path / "no_test"), "test")  # not val's images under the name test


def test_input_overrides_keep_the_model_s_channels_and_refuse_a_wrong_mean_count() -> None:
    from sequencer.data import data_config

    model = create_model("sequencer2d_tiny", num_classes=2, in_chans=1)
    assert data_config(model, img_size=32)["input_size"] == (1, 32, 32)
    assert data_config(model, mean=(0.5,), std=(0.25,))["mean"] == (0.5,)
    with pytest.raises(UsageError, match=r"--mean takes 1 or 1 values \(one per input channel\), got 2"):
        data_config(model, mean=(0.5, 0.5))
    with pytest.raises(UsageError, match=r"--std takes 1 or 3 values \(one per input channel\), got 2"):
        data_config(create_model("sequencer2d_tiny", num_classes=2), std=(0.5, 0.5))
