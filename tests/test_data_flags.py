"""timm train.py's data flags in `build_dataset` and `create_loader`: class maps, image modes, reader arguments,
pinned memory, persistent workers, repeated augmentation and worker seeding."""

from __future__ import annotations

import io
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from packaging.version import Version
from PIL import Image
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import ToTensor

from sequencer import data as data_module
from sequencer.data import (
    TorchvisionDataset,
    build_dataset,
    create_loader,
    image_channels,
    load_class_map,
    unused_data_flags,
)
from sequencer.errors import DatasetError, UsageError

TIMM = Version(timm.__version__).release
SAFE_PKL = TIMM >= (1, 0, 28)


def one_line(error: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be a single line."""
    message = str(error.value)
    assert "\n" not in message
    return message


class Indices(Dataset):
    """Item i is i: what a sampler draws, as the loader yields it."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


class RandomDraws(Dataset):
    """Item i is one draw each from numpy's and python's global streams, in whichever process reads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, float]:
        return int(np.random.randint(2**31)), random.random()


def test_class_map_selects_and_numbers_folder_classes(make_image_tree, tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "data", classes=["cat", "dog", "fox"], per_class=2)
    class_map = tmp_path / "map.txt"
    class_map.write_text("fox\ncat\n")
    dataset = build_dataset(str(root), "train", class_map=str(class_map))
    assert dataset.classes == ["fox", "cat"]  # index order, dog left out
    labels = {Path(path).parent.name: target for path, target in dataset.samples}
    assert labels == {"fox": 0, "cat": 1} and len(dataset) == 4
    assert [dataset[i][1] for i in range(len(dataset))] == [target for _, target in dataset.samples]
    # As in timm, a relative map path that is not found as given is looked up in the split's folder.
    (root / "val" / "names.txt").write_text("dog\n")
    val = build_dataset(str(root), "val", class_map="names.txt")
    assert val.classes == ["dog"] and {target for _, target in val.samples} == {0}
    # Without a map: every folder, sorted, as before.
    assert build_dataset(str(root), "train").classes == ["cat", "dog", "fox"]


@pytest.mark.parametrize(
    ("file_name", "text", "match"),
    [
        ("map.txt", "cat\n\ndog\n", "non-empty class names"),
        ("map.txt", "cat\ndog\ncat\n", r"indices 0\.\.1, one class each .a class listed twice"),
        ("map.json", '{"cat": 0}', "expected a .txt file"),
        ("map.txt", "cat\nwolf\n", "empty dataset folder .*wolf"),
    ],
)
def test_bad_class_maps_are_refused_in_one_line(
    make_image_tree, tmp_path: Path, file_name: str, text: str, match: str
) -> None:
    root = make_image_tree(tmp_path / "data", classes=["cat", "dog"], per_class=1)
    (tmp_path / file_name).write_text(text)
    with pytest.raises(DatasetError, match=match) as error:
        build_dataset(str(root), "train", class_map=str(tmp_path / file_name))
    one_line(error)


def test_missing_class_map_and_fixed_classes_are_refused(make_image_tree, tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "data", classes=1, per_class=1)
    with pytest.raises(DatasetError, match="class map file not found") as error:
        build_dataset(str(root), "train", class_map=str(tmp_path / "missing.txt"))
    one_line(error)
    (tmp_path / "map.txt").write_text("0\n1\n")
    for name in (None, "torch/cifar10"):
        with pytest.raises(DatasetError, match=r"--class-map cannot apply .*classes are fixed") as error:
            build_dataset(name, "train", data_dir=str(tmp_path), class_map=str(tmp_path / "map.txt"))
        one_line(error)


@pytest.mark.skipif(not SAFE_PKL, reason="timm < 1.0.28 unpickles class maps unsafely: refused, tested below")
def test_pkl_class_map_is_read_and_code_in_it_refused(make_image_tree, tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "data", classes=["cat", "dog"], per_class=1)
    (tmp_path / "map.pkl").write_bytes(pickle.dumps({"dog": 0, "cat": 1}))
    assert build_dataset(str(root), "train", class_map=str(tmp_path / "map.pkl")).classes == ["dog", "cat"]
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"cat": Path("x")}))  # a global: what code execution needs
    with pytest.raises(DatasetError, match="could not be read") as error:
        load_class_map(tmp_path / "evil.pkl")
    one_line(error)


@pytest.mark.skipif(SAFE_PKL, reason="this timm reads .pkl class maps safely")
def test_pkl_class_map_needs_a_safe_timm(tmp_path: Path) -> None:
    (tmp_path / "map.pkl").write_bytes(pickle.dumps({"cat": 0}))
    with pytest.raises(DatasetError, match=r"needs timm >= 1\.0\.28") as error:
        load_class_map(tmp_path / "map.pkl")
    one_line(error)


def test_input_img_mode_sets_the_channels_of_every_source(
    make_image_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_tree(tmp_path, classes=2, per_class=1)
    for mode, channels in (("L", 1), ("RGB", 3), ("RGBA", 4), (None, 3)):
        dataset = build_dataset(str(root), "train", transform=ToTensor(), input_img_mode=mode)
        assert dataset[0][0].shape[0] == channels == image_channels(mode)
    gray = build_dataset(str(root), "train", input_img_mode="L")[1][0]
    rgb = np.asarray(build_dataset(str(root), "train")[1][0])
    assert np.array_equal(np.asarray(gray), np.asarray(Image.fromarray(rgb).convert("L")))  # converted, not a channel
    assert build_dataset(None, "val", img_size=8, input_img_mode="L")[0][0].mode == "L"
    assert build_dataset(None, "val", img_size=8)[0][0].mode == "RGB"
    # torch/ sets yield RGB PIL images: converted after reading.
    base = [(Image.new("RGB", (4, 4), (200, 10, 10)), 0)]
    monkeypatch.setattr(data_module, "_torchvision_dataset", lambda *args: TorchvisionDataset(base, ["a"], "fake"))
    assert build_dataset("torch/cifar10", "train", input_img_mode="L")[0][0].mode == "L"
    assert build_dataset("torch/cifar10", "train")[0][0].mode == "RGB"
    with pytest.raises(UsageError, match="unknown image mode 'XYZ'") as error:
        build_dataset(str(root), "train", input_img_mode="XYZ")
    one_line(error)


def wds_shards(root: Path) -> Path:
    """Two WebDataset shards of three 8 px RGB images each, labels 0, 1, 0 ..."""
    webdataset = pytest.importorskip("webdataset")
    for shard in range(2):
        with webdataset.TarWriter(str(root / f"val-{shard:06d}.tar")) as sink:
            for index in range(3):
                png = io.BytesIO()
                Image.new("RGB", (8, 8), (index * 80, 0, 0)).save(png, format="PNG")
                sink.write({"__key__": f"s{shard}i{index}", "png": png.getvalue(), "cls": str(index % 2).encode()})
    return root


def test_wds_reader_takes_image_mode_and_sample_count(tmp_path: Path) -> None:
    shards = wds_shards(tmp_path)
    split = "val-{000000..000001}.tar"
    gray = build_dataset("wds/toy", split, data_dir=str(shards), input_img_mode="L", num_samples=4)
    assert len(gray) == 4  # the count given, not the 6 the shards hold
    images = [image for image, _ in gray]
    assert images and all(image.mode == "L" for image in images)
    assert all(image.mode == "RGB" for image, _ in build_dataset("wds/toy", split, data_dir=str(shards)))


def test_hfds_reader_takes_class_map_keys_and_image_mode(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(picture=datasets.Image(), kind=datasets.ClassLabel(names=["cat", "dog"]))
    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    table = datasets.Dataset.from_dict(dict(picture=images, kind=[0, 1, 0, 1]), features=features)
    table.to_parquet(str(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet"))
    (tmp_path / "map.txt").write_text("dog\ncat\n")
    keys = dict(input_key="picture", target_key="kind")
    name, cache = f"hfds/{tmp_path / 'hf'}", str(tmp_path / "cache")
    class_map = str(tmp_path / "map.txt")
    mapped = build_dataset(name, "train", data_dir=cache, class_map=class_map, input_img_mode="L", **keys)
    assert mapped.classes == ["dog", "cat"]
    assert [mapped[i][1] for i in range(4)] == [1, 0, 1, 0]  # the map's indices, not the dataset's
    assert mapped[0][0].mode == "L"
    assert [build_dataset(name, "train", data_dir=cache, **keys)[i][1] for i in range(4)] == [0, 1, 0, 1]


def test_unused_data_flags_name_what_a_source_ignores() -> None:
    given = dict(num_samples=10, repeats=2.0, input_key="jpg", target_key="cls", trust_remote_code=True)
    assert unused_data_flags("some/folder", **given) == list(given)
    assert unused_data_flags(None, num_samples=10) == ["num_samples"]
    assert unused_data_flags("torch/cifar10", input_key="image") == ["input_key"]
    assert unused_data_flags("wds/toy", **given) == ["trust_remote_code"]
    assert unused_data_flags("HFDS/user/set", **given) == ["num_samples", "repeats"]  # timm's map-style reader
    assert unused_data_flags("hfids/user/set", **given) == []
    assert unused_data_flags("some/folder") == []  # defaults are never reported


def test_pin_memory_and_persistent_workers_reach_the_loader() -> None:
    dataset = Indices(4)
    assert create_loader(dataset, 2, workers=0, pin_memory=True).pin_memory is True
    assert create_loader(dataset, 2, workers=0, pin_memory=False).pin_memory is False
    assert create_loader(dataset, 2, workers=0).pin_memory is torch.cuda.is_available()  # as before
    assert create_loader(dataset, 2, workers=1, persistent_workers=True).persistent_workers is True
    assert create_loader(dataset, 2, workers=0, persistent_workers=True).persistent_workers is False  # torch refuses
    assert create_loader(dataset, 2, workers=1).persistent_workers is False


def epoch_indices(loader: DataLoader) -> list[int]:
    """The dataset indices one pass of `loader` reads, in order."""
    return [int(index) for batch in loader for index in batch]


def test_aug_repeats_in_one_process_repeats_each_drawn_image() -> None:
    loader = create_loader(Indices(12), 4, workers=0, shuffle=True, drop_last=True, repeats=3)
    assert isinstance(loader.sampler, RepeatAugSampler)
    first = epoch_indices(loader)
    # timm's epoch keeps the dataset's length: a third of the images, each three times in a row (one batch).
    assert len(first) == 12 and set(Counter(first).values()) == {3}
    assert all(first[i] == first[i + 1] == first[i + 2] for i in range(0, 12, 3))
    loader.sampler.set_epoch(1)
    second = epoch_indices(loader)
    loader.sampler.set_epoch(0)
    assert second != first and epoch_indices(loader) == first  # each epoch its own order, replayed after a resume


def test_aug_repeats_under_ddp_puts_the_copies_on_different_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    ranks = []
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    for rank in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        loader = create_loader(Indices(12), 2, workers=0, shuffle=True, distributed=True, repeats=3)
        ranks.append(epoch_indices(loader))
    assert [len(indices) for indices in ranks] == [4, 4, 4]
    assert ranks[0] == ranks[1] == ranks[2]  # copy k of each drawn image is on rank k
    assert len(set(ranks[0])) == 4


@pytest.mark.parametrize(
    ("repeats", "shuffle", "match"),
    [(0.5, True, "expected 0 .off. or a count of 1 or more"), (-1, True, "expected 0"), (3, False, "evaluation")],
)
def test_bad_aug_repeats_are_refused(repeats: float, shuffle: bool, match: str) -> None:
    with pytest.raises(UsageError, match=match) as error:
        create_loader(Indices(4), 2, workers=0, shuffle=shuffle, repeats=repeats)
    one_line(error)


def test_aug_repeats_refuse_a_streamed_dataset() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(UsageError, match="streamed dataset") as error:
        create_loader(Stream(), 2, workers=0, shuffle=True, repeats=3)
    one_line(error)


def draws(loader: DataLoader) -> list[tuple[int, float]]:
    """The (numpy, python) draws a worker made for each item, after the main process is seeded as an epoch is."""
    torch.manual_seed(0)
    return [(int(n), float(p)) for numbers, floats in loader for n, p in zip(numbers, floats, strict=True)]


def test_worker_seeding_part_is_as_before_and_all_reseeds_numpy() -> None:
    dataset = RandomDraws()
    before = draws(DataLoader(dataset, batch_size=2, num_workers=1))  # the loader as it was built before the flag
    part = draws(create_loader(dataset, 2, workers=1))
    assert part == before == draws(create_loader(dataset, 2, workers=1, worker_seeding="part"))
    every = draws(create_loader(dataset, 2, workers=1, worker_seeding="all"))
    assert [p for _, p in every] == [p for _, p in part]  # python's stream: torch's seeding in both
    assert [n for n, _ in every] != [n for n, _ in part]  # numpy: re-seeded from the worker's seed
    assert every == draws(create_loader(dataset, 2, workers=1, worker_seeding="all"))  # reproducible
    with pytest.raises(UsageError, match=r"unknown worker seeding 'none'.*'all' or 'part'") as error:
        create_loader(dataset, 2, workers=0, worker_seeding="none")
    one_line(error)
