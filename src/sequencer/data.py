"""Datasets, transforms and loaders: class-folder trees, torchvision's CIFAR and transfer sets, built-in digits."""

from __future__ import annotations

import functools
import importlib.util
import logging
import multiprocessing
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from packaging.version import Version
from PIL import Image, ImageOps
from timm.data import ImageNetInfo, auto_augment, resolve_data_config
from timm.data import create_transform as timm_create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.readers.class_map import load_class_map as timm_load_class_map
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, default_collate
from torchvision.datasets import CIFAR10, CIFAR100, Flowers102, ImageFolder, OxfordIIITPet, StanfordCars
from torchvision.datasets.folder import IMG_EXTENSIONS

from sequencer.choices import DIGITS_NAMES, INTERPOLATIONS, TRAIN_INTERPOLATIONS
from sequencer.config import check_normalization
from sequencer.errors import DatasetError, MissingDependencyError, UsageError
from sequencer.runtime import usable_cpus

_logger = logging.getLogger(__name__)

_CONFIG_KEYS = ("input_size", "img_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def data_config(model: nn.Module | dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The model's preprocessing (input size, crop_pct, interpolation, mean, std), with `overrides` applied."""
    cfg = model if isinstance(model, dict) else getattr(model, "pretrained_cfg", {})
    args = {k: v for k, v in overrides.items() if v not in (None, "")}
    # timm takes 3 channels unless told: an --img-size alone would make a one-channel model's input RGB.
    channels = (args.get("input_size") or cfg.get("input_size") or (3,))[0]
    check_normalization(args.get("mean"), args.get("std"), channels)
    return resolve_data_config(args={"in_chans": channels, **args}, pretrained_cfg=dict(cfg))


def check_input_fits(model: nn.Module, input_size: Sequence[int], flag: str = "--img-size / --input-size") -> None:
    """Raise a UsageError before any work when `model` cannot take (C, H, W) inputs (`flag` set their size)."""
    channels = getattr(model, "in_chans", input_size[0])
    if channels != input_size[0]:
        raise UsageError(f"the model takes {channels} input channels but its input has {input_size[0]} (--in-chans)")
    check_input = getattr(model, "check_input", None)  # a Sequencer's; other models have none
    if callable(check_input):
        try:
            check_input(torch.empty(1, *input_size, device="meta"))  # shapes only: nothing runs
        except ValueError as error:
            raise UsageError(f"{error} ({flag})") from None


def image_channels(input_img_mode: str | None) -> int:
    """The channels of an image read in PIL mode `input_img_mode` (None: RGB); a UsageError for an unknown mode."""
    mode = input_img_mode or "RGB"
    try:
        return len(Image.new(mode, (1, 1)).getbands())
    except (ValueError, TypeError):  # what PIL raises for a mode it does not know
        raise UsageError(f"unknown image mode {mode!r} (--input-img-mode); expected a PIL mode: RGB, L ...") from None


def check_image_input_fits(model: nn.Module, input_size: Sequence[int], input_img_mode: str | None = None) -> None:
    """`check_input_fits` for commands that read images: as many input channels as the images' mode has (RGB: 3)."""
    mode, channels = input_img_mode or "RGB", image_channels(input_img_mode)
    if input_size[0] != channels:
        raise UsageError(
            f"the input has {input_size[0]} channels (--in-chans / --input-size) but images are read as {mode}, "
            f"{channels} channel(s) (--input-img-mode)"
        )
    check_input_fits(model, input_size)


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
    allowed = TRAIN_INTERPOLATIONS if train else INTERPOLATIONS
    if overrides.get("interpolation") and overrides["interpolation"] not in allowed:
        raise UsageError(f"unknown interpolation {overrides['interpolation']!r}; expected one of {', '.join(allowed)}")
    cfg = data_config(model, **{k: overrides.pop(k) for k in list(overrides) if k in _CONFIG_KEYS})
    return timm_create_transform(**cfg, is_training=train, **overrides)


# The files read as images: what ImageFolder reads in training's class folders, and what `predict` takes from a folder.
IMAGE_EXTENSIONS: tuple[str, ...] = IMG_EXTENSIONS

VAL_SPLITS = ("val", "validation", "test")


class SkippedSamples:
    """Which samples were unreadable, one flag per index in memory shared with the data-loader worker processes: an
    image met in every epoch (and by every evaluation) counts once."""

    def __init__(self, size: int) -> None:
        self._flags = multiprocessing.RawArray("B", size)  # one byte written per flag: no lock needed

    def add(self, index: int) -> None:
        """Flag sample `index` as unreadable."""
        self._flags[index] = 1

    @property
    def mask(self) -> torch.Tensor:
        """The flags, as a uint8 tensor over the shared memory."""
        return torch.frombuffer(self._flags, dtype=torch.uint8) if len(self._flags) else torch.zeros(0, torch.uint8)

    def __len__(self) -> int:
        return int(self.mask.sum())


def open_image(path: str, mode: str) -> Image.Image:
    """The image file at `path`, converted to PIL `mode` (what torchvision's loader does for RGB)."""
    with open(path, "rb") as file:
        return Image.open(file).convert(mode)


class ImageFolderDataset(ImageFolder):
    """`ROOT/<class>/*` images; an unreadable image yields None (dropped by `collate_skipping`) and is counted.

    With `class_to_idx` (a class map) only its classes are read, with its indices; `.classes` are in index order."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        class_to_idx: dict[str, int] | None = None,
        input_img_mode: str = "RGB",
    ) -> None:
        self._class_map = class_to_idx  # read by `find_classes`, which ImageFolder's constructor calls
        super().__init__(str(root), transform=transform)
        if input_img_mode != "RGB":  # RGB keeps torchvision's own loader, which reads RGB
            self.loader = functools.partial(open_image, mode=input_img_mode)
        self.skipped = SkippedSamples(len(self.samples))

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """The class map's classes in index order, or (none given) torchvision's sorted class folders."""
        if self._class_map is None:
            return super().find_classes(directory)
        return sorted(self._class_map, key=self._class_map.__getitem__), dict(self._class_map)

    @property
    def num_skipped(self) -> int:
        """Unreadable images met so far (each once)."""
        return len(self.skipped)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for truncated or non-image files
            self.skipped.add(index)
            _logger.warning("skipping unreadable image %s: %s", path, error)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), upscaled to RGB PIL images; no download.

    The split is fixed (stratified, seed 0): 80% train, 20% val, so every run is scored on the same held-out images.
    """

    def __init__(
        self, split: str = "train", transform: Callable | None = None, img_size: int = 32, input_img_mode: str = "RGB"
    ) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", *VAL_SPLITS):
            raise DatasetError(f"unknown split {split!r} for the digits; expected 'train' or 'val'")
        digits = load_digits()
        train_idx, val_idx = train_test_split(
            np.arange(len(digits.target)), test_size=0.2, random_state=0, stratify=digits.target
        )
        indices = train_idx if split == "train" else val_idx
        # Pixel values are 0..16; upscale once here so that per-sample transforms only crop and normalise.
        pixels = (digits.images[indices] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [
            Image.fromarray(p, mode="L").resize((img_size, img_size), Image.Resampling.BICUBIC).convert(input_img_mode)
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


# torchvision's transfer datasets: our split name -> theirs, and the layout of their files under --data-dir.
TRANSFER_SPLITS = {
    "flowers102": {"train": "train", "val": "val", "validation": "val", "test": "test"},
    "stanford_cars": {"train": "train", "val": "test", "validation": "test", "test": "test"},
    "oxford_iiit_pet": {
        "train": "trainval",
        "trainval": "trainval",
        "val": "test",
        "validation": "test",
        "test": "test",
    },
}
TRANSFER_LAYOUTS = {
    "flowers102": "DATA_DIR/flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}",
    "stanford_cars": "DATA_DIR/stanford_cars/{cars_train/*.jpg, cars_test/*.jpg, cars_test_annos_withlabels.mat, "
    "devkit/{cars_train_annos.mat, cars_meta.mat}}",
    "oxford_iiit_pet": "DATA_DIR/oxford-iiit-pet/{images/*.jpg, annotations/{trainval.txt, test.txt}}",
}
TORCH_DATASETS = ("cifar10", "cifar100", *TRANSFER_SPLITS)


class TorchvisionDataset(Dataset):
    """A torchvision dataset whose `transform` is applied here, whose unreadable images are skipped and counted."""

    def __init__(self, base: Dataset, classes: list[str], name: str) -> None:
        self.base = base
        self.classes = list(classes)
        self.name = name
        self.transform: Callable | None = None
        self.input_img_mode: str | None = None  # None: as torchvision reads them (RGB)
        self.skipped = SkippedSamples(len(base))

    @property
    def num_skipped(self) -> int:
        """Unreadable images met so far (each once)."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        try:
            image, target = self.base[index]
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for truncated or non-image files
            self.skipped.add(index)
            _logger.warning("skipping unreadable image %d of %s: %s", index, self.name, error)
            return None
        if self.input_img_mode is not None and image.mode != self.input_img_mode:
            image = image.convert(self.input_img_mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)


def _transfer_files_missing(key: str, root: Path, split: str) -> list[Path]:
    """The files and folders of `key`'s layout that the split needs and that are not under `root`."""
    if key == "flowers102":
        base = root / "flowers-102"
        needed = [base / "jpg", base / "imagelabels.mat", base / "setid.mat"]
    elif key == "stanford_cars":
        base = root / "stanford_cars"
        needed = [base / "devkit" / "cars_meta.mat"]
        if split == "train":
            needed += [base / "devkit" / "cars_train_annos.mat", base / "cars_train"]
        else:
            needed += [base / "cars_test_annos_withlabels.mat", base / "cars_test"]
    else:
        base = root / "oxford-iiit-pet"
        needed = [base / "images", base / "annotations" / f"{split}.txt"]
    return [path for path in needed if not path.exists()]


def _torchvision_dataset(name: str, split: str, root: str | None, download: bool) -> TorchvisionDataset:
    """torchvision's CIFAR-10/100, Flowers-102, Stanford Cars or Oxford-IIIT Pets from a local copy under `root`."""
    key = name.removeprefix("torch/").lower()
    if key not in TORCH_DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected a folder, none, or {', '.join(TORCH_DATASETS)}")
    if not root:
        raise DatasetError(f"{name} needs --data-dir (or DATA): the folder that holds (or will hold) its files")
    if key in ("cifar10", "cifar100"):
        cifar = CIFAR10 if key == "cifar10" else CIFAR100
        try:
            base = cifar(root, train=split == "train", download=download)
        except (RuntimeError, OSError) as error:  # not there, or no network to fetch it
            if download:
                raise DatasetError(f"{name} could not be downloaded into {root} ({error}); put a copy there") from error
            raise DatasetError(
                f"{name} not found under {root} ({error}); put a copy there or pass --dataset-download"
            ) from error
        return TorchvisionDataset(base, base.classes, name)
    splits = TRANSFER_SPLITS[key]
    if split not in splits:
        raise DatasetError(f"unknown split {split!r} for {name}; expected one of {', '.join(splits)}")
    their_split = splits[split]
    if key == "stanford_cars" and download:
        raise DatasetError(
            f"{name} cannot be downloaded (its original URL is gone); put a copy in the layout "
            f"{TRANSFER_LAYOUTS[key]} and drop --dataset-download"
        )
    if not download:
        missing = _transfer_files_missing(key, Path(root), their_split)
        if missing:
            remedy = (
                "it can no longer be downloaded" if key == "stanford_cars" else "pass --dataset-download to fetch it"
            )
            raise DatasetError(
                f"{name} ({their_split} split) not found under {root}: missing {', '.join(map(str, missing))}; "
                f"expected {TRANSFER_LAYOUTS[key]} ({remedy})"
            )
    kinds = {"flowers102": Flowers102, "stanford_cars": StanfordCars, "oxford_iiit_pet": OxfordIIITPet}
    try:
        base = kinds[key](root, split=their_split, download=download)
    except (RuntimeError, OSError) as error:  # files rejected (Flowers-102 checks its .mat files' md5), or no network
        problem = "could not be downloaded into" if download else "is incomplete or corrupted under"
        raise DatasetError(f"{name} {problem} {root} ({error}); expected {TRANSFER_LAYOUTS[key]}") from error
    return TorchvisionDataset(base, base.classes, name)


def _split_folder(root: Path, split: str) -> Path:
    """ROOT/train, ROOT/val (or validation); a ROOT that is itself a class-folder tree serves as the val split."""
    # val and validation stand for each other (as in timm); test is only ever ROOT/test.
    names = ("val", "validation") if split in ("val", "validation") else (split,)
    for name in names:
        if (root / name).is_dir():
            return root / name
    if split in VAL_SPLITS and not (root / "train").is_dir():
        return root
    raise DatasetError(f"no {split!r} folder in {root}; expected {root}/{names[0]}/<class>/<images>")


# timm's streamed and Hugging Face datasets (`--dataset PREFIX/NAME`): the package each needs.
STREAMED_PACKAGES = {"wds": "webdataset", "hfds": "datasets", "hfids": "datasets"}

# The first timm that reads a .pkl class map with a restricted unpickler: older ones run whatever code the file holds.
_TIMM_SAFE_PKL_CLASS_MAP = "1.0.28"
# The first timm whose streamed Hugging Face reader (hfids/) takes trust_remote_code.
_TIMM_HFIDS_REMOTE_CODE = "1.0.13"


def _timm_at_least(version: str) -> bool:
    """Whether the installed timm is `version` or newer."""
    return Version(timm.__version__).release >= Version(version).release


def load_class_map(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, int]:
    """timm's class map file (--class-map), by timm's loader: a .txt names one class per line (index: line number),
    a .pkl holds a {name: index} dict; a relative path not found is looked up under `root`, as timm does.

    Its indices must be 0 .. N-1, one class each: they are the model's outputs and `.classes` lists them in order."""
    found = Path(path)
    if not found.is_file() and root is not None and (Path(root) / path).is_file():
        found = Path(root) / path
    if not found.is_file():
        raise DatasetError(f"class map file not found: {path} (--class-map)")
    kind = found.suffix.lower()
    if kind not in (".txt", ".pkl"):
        raise DatasetError(f"class map {found}: expected a .txt file (one class name per line) or a .pkl dict")
    if kind == ".pkl" and not _timm_at_least(_TIMM_SAFE_PKL_CLASS_MAP):
        raise DatasetError(
            f"a .pkl class map needs timm >= {_TIMM_SAFE_PKL_CLASS_MAP} (older timm runs any code the file holds; "
            f"installed: {timm.__version__}): upgrade timm or write the map as a .txt file"
        )
    try:
        mapping = timm_load_class_map(str(found))
    except (AssertionError, ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError) as error:
        raise DatasetError(f"class map {found} could not be read: {str(error).splitlines()[0]}") from None
    if not isinstance(mapping, dict) or not all(isinstance(name, str) and name for name in mapping):
        raise DatasetError(f"class map {found}: expected non-empty class names (a blank line in a .txt file?)")
    indices = sorted(mapping.values()) if all(type(index) is int for index in mapping.values()) else None
    if indices != list(range(len(mapping))):
        raise DatasetError(
            f"class map {found}: expected indices 0..{len(mapping) - 1}, one class each (a class listed twice?)"
        )
    return mapping


def _streamed_dataset(
    name: str,
    split: str,
    root: str | None,
    download: bool,
    train: bool,
    batch_size: int,
    seed: int,
    **reader_args: Any,
) -> Dataset:
    """timm's reader of WebDataset shards (wds/), a Hugging Face dataset (hfds/) or a streamed one (hfids/);
    `reader_args` go to timm's `create_dataset` (class_map, input_img_mode, input_key, num_samples ...).

    Under torchrun each process reads its own shards. `.classes` are the dataset's class names (none for wds/: its
    labels are class indices). For evaluation (not `train`) every image is read exactly once over all processes."""
    prefix = source_kind(name)
    package = STREAMED_PACKAGES[prefix]
    if importlib.util.find_spec(package) is None:
        raise MissingDependencyError(
            f'--dataset {name} needs the {package} package, not installed: pip install "sequencer[streaming]"'
        )
    from timm.data import create_dataset

    if prefix == "wds" and not root:
        raise DatasetError(f"--dataset {name} needs --data-dir (or DATA): the folder holding the shards")
    try:
        dataset = create_dataset(
            name,
            root=root,
            split=split,
            is_training=train,
            download=download,
            batch_size=batch_size,
            seed=seed,
            **reader_args,
        )
    except (RuntimeError, ValueError, FileNotFoundError, ConnectionError) as error:  # unknown split, name, no count
        hint = " (a training split needs its image count: SPLIT|COUNT, or an _info.json)" if prefix == "wds" else ""
        raise DatasetError(f"--dataset {name}, split {split!r}: {str(error).splitlines()[0]}{hint}") from None
    reader = dataset.reader
    if prefix == "wds":
        shards = [os.path.join(root, file) for file in reader.split_info.filenames]
        local = [shard for shard in shards if "://" not in shard and not shard.startswith("pipe:")]
        missing = [shard for shard in local if not os.path.isfile(shard)]
        if not shards or missing:
            raise DatasetError(
                f"--dataset {name}, split {split!r}: no shard file {', '.join(missing[:3]) or 'named'} under {root}"
            )
        if not train and torch.distributed.is_initialized():
            # timm pads each process's share to one length with repeated images; for evaluation each process
            # reads its own shards instead, each once, as a single reader.
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if len(shards) < world_size:
                raise DatasetError(
                    f"--dataset {name}, split {split!r}: {len(shards)} shard(s) for {world_size} processes, each of "
                    "which reads whole shards; use as many shards as processes or more"
                )
            reader.split_info.filenames = reader.split_info.filenames[rank::world_size]
            reader.dist_rank, reader.dist_num_replicas = 0, 1
    by_index = sorted(reader.class_to_idx.items(), key=lambda item: item[1])
    dataset.classes = [str(class_name) for class_name, _ in by_index]
    return dataset


def source_kind(name_or_root: str | None) -> str:
    """What `build_dataset` reads for `name_or_root`: "digits", "torch", "wds", "hfds", "hfids" or "folder"."""
    if name_or_root is None or name_or_root.lower() in DIGITS_NAMES:
        return "digits"
    prefix, slash, _ = name_or_root.partition("/")
    if slash and prefix.lower() in STREAMED_PACKAGES:
        return prefix.lower()
    return "torch" if name_or_root.startswith("torch/") else "folder"


# The `build_dataset` arguments that only timm's readers take, and the readers each changes (timm's create_dataset).
_READER_ONLY_ARGS = {
    "num_samples": ("wds", "hfids"),
    "repeats": ("wds", "hfids"),
    "input_key": ("wds", "hfds", "hfids"),
    "target_key": ("wds", "hfds", "hfids"),
    "trust_remote_code": ("hfds", "hfids"),
}


def unused_data_flags(
    name_or_root: str | None,
    *,
    num_samples: int | None = None,
    repeats: float = 0,
    input_key: str | None = None,
    target_key: str | None = None,
    trust_remote_code: bool = False,
) -> list[str]:
    """The arguments given (not None, 0 or False) that change nothing for this source, as `build_dataset` names them.

    class_map and input_img_mode are not among them: every source either honours them or refuses them."""
    given = dict(
        num_samples=num_samples,
        repeats=repeats,
        input_key=input_key,
        target_key=target_key,
        trust_remote_code=trust_remote_code,
    )
    kind = source_kind(name_or_root)
    return [name for name, value in given.items() if value and kind not in _READER_ONLY_ARGS[name]]


def build_dataset(
    name_or_root: str | None,
    split: str,
    transform: Callable | None = None,
    data_dir: str | None = None,
    download: bool = False,
    img_size: int = 32,
    train: bool = False,
    batch_size: int = 1,
    seed: int = 42,
    *,
    class_map: str | os.PathLike | None = None,
    input_img_mode: str | None = None,
    num_samples: int | None = None,
    repeats: float = 0,
    input_key: str | None = None,
    target_key: str | None = None,
    trust_remote_code: bool = False,
) -> Dataset:
    """A dataset with `.classes`, `.transform` and `.num_skipped`: a class-folder tree, `torch/NAME`, the digits, or
    timm's `wds/`, `hfds/`, `hfids/` readers (`train`, `batch_size` and `seed` shape the streamed training order).

    `class_map` (a file, see `load_class_map`) selects and numbers a folder tree's or a reader's classes;
    `input_img_mode` is the PIL mode images are converted to (None: RGB). The rest go to timm's readers as timm's
    `create_dataset` passes them; for other sources they change nothing (`unused_data_flags` names them)."""
    kind = source_kind(name_or_root)
    mode = input_img_mode or "RGB"
    image_channels(mode)  # an unknown mode is refused before any image is read
    if class_map is not None and kind in ("digits", "torch"):
        raise DatasetError(
            f"--class-map cannot apply to {name_or_root or 'the digits'}: its classes are fixed; use a folder tree"
        )
    if kind == "digits":
        return DigitsDataset(split, transform, img_size, mode)
    if kind in STREAMED_PACKAGES:
        reader_args: dict[str, Any] = dict(input_img_mode=mode, input_key=input_key, target_key=target_key)
        if class_map is not None:
            reader_args["class_map"] = load_class_map(class_map)
        if kind != "hfds":  # timm's map-style hfds reader takes no sample count or repeats
            reader_args.update(num_samples=num_samples, repeats=repeats)
        if trust_remote_code and kind in ("hfds", "hfids"):
            if kind == "hfids" and not _timm_at_least(_TIMM_HFIDS_REMOTE_CODE):
                raise UsageError(
                    f"--dataset-trust-remote-code for hfids/ needs timm >= {_TIMM_HFIDS_REMOTE_CODE} "
                    f"(installed: {timm.__version__})"
                )
            reader_args["trust_remote_code"] = True
        dataset = _streamed_dataset(name_or_root, split, data_dir, download, train, batch_size, seed, **reader_args)
        dataset.transform = transform
        return dataset
    if kind == "torch":
        dataset = _torchvision_dataset(name_or_root, split, data_dir, download)
        dataset.input_img_mode = input_img_mode
        dataset.transform = transform
        return dataset
    root = Path(name_or_root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    folder = _split_folder(root, split)
    class_to_idx = load_class_map(class_map, root=folder) if class_map is not None else None
    try:
        return ImageFolderDataset(folder, transform, class_to_idx, mode)
    except FileNotFoundError as error:  # torchvision: no class folders, or a (mapped) class folder without images
        raise DatasetError(f"empty dataset folder {folder}: {error}") from error


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids (n01440764, ...) in class-index order, from timm's packaged synset list."""
    return tuple(ImageNetInfo("imagenet-1k").label_names())


def _names_list(names: Sequence[str], limit: int = 3) -> str:
    """The first few names, for error messages."""
    return ", ".join(list(names)[:limit]) + (", ..." if len(names) > limit else "")


def class_indices(
    folder_names: Sequence[str], num_classes: int, model_class_names: Sequence[str] | None = None
) -> list[int]:
    """The model's class index for each folder name; a `DatasetError` naming both counts when none applies.

    In order: the model's own class names (a training checkpoint's), when they cover every folder; for a
    1000-class model, ImageNet-1k WordNet ids (ImageNet-A, -R, -Sketch, val) or class numbers (ImageNet-V2's
    0..999), also when only some classes are present; otherwise folder i is class i, which needs one folder per class.
    """
    folder_names = list(folder_names)
    own_names = model_class_names is not None and len(model_class_names) == num_classes
    if own_names:
        by_name = {name: index for index, name in enumerate(model_class_names)}
        if all(name in by_name for name in folder_names):
            return [by_name[name] for name in folder_names]
    if num_classes == 1000:
        by_synset = {synset: index for index, synset in enumerate(imagenet_synsets())}
        if all(name in by_synset for name in folder_names):
            return [by_synset[name] for name in folder_names]
        if all(name.isdigit() and int(name) < num_classes for name in folder_names):
            return [int(name) for name in folder_names]
    if own_names:
        # Position would pair each folder with whatever class shares its index: a wrong score, silently.
        raise DatasetError(
            f"the data's classes ({_names_list(folder_names)}) are not the model's ({_names_list(model_class_names)}): "
            "evaluate on the classes it was trained on, or pass --num-classes to score a new head"
        )
    if len(folder_names) == num_classes:
        return list(range(num_classes))
    kinds = ["the model's class names"] if model_class_names is not None else []
    if num_classes == 1000:
        kinds.append("ImageNet-1k WordNet ids (n01440764, ...) or class numbers")
    named = f"named by neither {' nor '.join(kinds)}, nor " if kinds else "not "
    raise DatasetError(
        f"the model has {num_classes} classes but the data has {len(folder_names)} ({_names_list(folder_names)}), "
        f"{named}one folder per class: pass a checkpoint trained on these classes or --num-classes "
        f"{len(folder_names)}"
    )


def map_classes(dataset: Dataset, num_classes: int, model_class_names: Sequence[str] | None = None) -> Dataset:
    """Relabel a dataset's samples with the model's class indices (see `class_indices`); checked before any work."""
    if not isinstance(dataset, ImageFolder):  # the digits and torchvision's sets: fixed classes, in their own order
        # WebDataset shards name no classes: their labels are the model's class indices as they are.
        if dataset.classes and len(dataset.classes) != num_classes:
            raise DatasetError(
                f"the model has {num_classes} classes but the data has {len(dataset.classes)}: pass a checkpoint "
                f"trained on this dataset or --num-classes {len(dataset.classes)}"
            )
        names = [str(name) for name in dataset.classes]
        if dataset.classes and model_class_names is not None and list(model_class_names) != names:
            raise DatasetError(
                f"the data's classes ({_names_list(names)}) are not the model's ({_names_list(model_class_names)}) "
                "in their order: evaluate on the dataset it was trained on"
            )
        return dataset
    indices = class_indices(dataset.classes, num_classes, model_class_names)
    if indices == list(range(len(indices))):
        return dataset
    dataset.samples = [(path, indices[target]) for path, target in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [target for _, target in dataset.samples]
    dataset.class_to_idx = {name: indices[i] for i, name in enumerate(dataset.classes)}
    return dataset


def collate_skipping(batch: list[Any]) -> Any:
    """Default collation after dropping the samples a dataset could not read (None); None if none is left."""
    readable = [sample for sample in batch if sample is not None]
    return default_collate(readable) if readable else None


class _DataLoader(DataLoader):
    """torch's DataLoader without its worker-count check, which warns again at every pass (each epoch): `create_loader`
    warns once instead."""

    def check_worker_number_rationality(self) -> None:
        """Checked once by `create_loader`."""


@functools.cache
def _warn_too_many_workers(workers: int, cores: int) -> None:
    """Once per process for a given count, however many loaders and epochs use it."""
    warnings.warn(
        f"-j {workers} data-loading worker processes on {cores} usable CPU core(s) can run slowly or freeze; "
        f"lower -j/--workers to {cores} or less",
        UserWarning,
        stacklevel=3,
    )


class ShardSampler(Sampler[int]):
    """Rank r of `world_size` reads images r, r + world_size, r + 2 world_size ...: every image exactly once over
    all ranks, in order, without the repeats a DistributedSampler pads the shards with (they would count twice)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


WORKER_SEEDINGS = ("part", "all")


def _seed_worker_numpy(worker_id: int) -> None:
    """timm's "all" worker seeding: numpy re-seeded from the worker's own torch seed (base seed + worker id)."""
    np.random.seed(torch.utils.data.get_worker_info().seed % (2**32 - 1))


def create_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 2,
    shuffle: bool = False,
    distributed: bool = False,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
    *,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    repeats: float = 0,
    worker_seeding: str = "part",
) -> DataLoader:
    """A DataLoader; under DDP each rank reads its own shard: for training (`shuffle`) a DistributedSampler's (call
    `set_epoch` each epoch), for evaluation a `ShardSampler`'s, which counts every image exactly once.

    `pin_memory`: page-locked batches (None: when CUDA is available). `persistent_workers` keeps the worker
    processes across epochs (timm's --use-multi-epochs-loader), which then no longer re-seed from each epoch's seed:
    a resumed run augments differently from an uninterrupted one. `repeats` (timm's --aug-repeats, training only):
    timm's RepeatAugSampler, each drawn image `repeats` times, on different ranks under DDP, in one process as one
    rank; the epoch keeps its length (call the sampler's `set_epoch` each epoch, in one process too).
    `worker_seeding`: "part" (torch's own seeding of each worker's random, torch and numpy streams, as before), or
    "all" (timm's default: numpy re-seeded from the worker's torch seed)."""
    if worker_seeding not in WORKER_SEEDINGS:
        raise UsageError(f"unknown worker seeding {worker_seeding!r} (--worker-seeding); expected 'all' or 'part'")
    if repeats != 0 and not repeats >= 1:  # negative, fractional below 1, or NaN
        raise UsageError(f"--aug-repeats {repeats:g}: expected 0 (off) or a count of 1 or more")
    if repeats and (not shuffle or isinstance(dataset, IterableDataset)):
        what = "a streamed dataset, whose reader orders its samples" if shuffle else "an evaluation loader"
        raise UsageError(f"--aug-repeats cannot apply to {what}: it repeats images of a shuffled map-style dataset")
    sampler: Sampler | None = None
    if isinstance(dataset, IterableDataset):  # timm's streamed readers: each process and worker reads its own shards
        dataset.set_loader_cfg(num_workers=workers)
        shuffle = False  # theirs, seeded by epoch (`set_epoch`)
        reader = dataset.reader
        shards = len(getattr(getattr(reader, "split_info", None), "filenames", ()))  # WebDataset's; none for hfids
        if shards and reader.is_training and shards < reader.global_num_workers:
            # A reader without a shard would repeat its empty stream forever to fill its share of the epoch.
            raise DatasetError(
                f"{shards} training shard(s) for {reader.global_num_workers} readers (processes x -j workers, at "
                "least 1 each); each reads whole shards: lower -j/--workers or use more shards"
            )
    elif repeats:
        replicas, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
        # timm rounds an epoch down to whole 256-image blocks, which older timm (1.0.12) also does below 256 images:
        # an empty epoch. Newer timm does not round there; nor does this on any timm.
        rounding = 256 if len(dataset) >= 256 else 0
        sampler = RepeatAugSampler(
            dataset, num_replicas=replicas, rank=rank, shuffle=True, num_repeats=repeats, selected_round=rounding
        )
    elif distributed and shuffle:
        sampler = DistributedSampler(dataset, shuffle=True, drop_last=drop_last)
    elif distributed:
        sampler = ShardSampler(
            dataset, rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size()
        )
    if workers > (cores := usable_cpus()):
        _warn_too_many_workers(workers, cores)
    # Workers start afresh every epoch unless persistent: their random streams are then drawn from the epoch's
    # seed, so a resumed run augments exactly as an uninterrupted one would.
    return _DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn or collate_skipping,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        worker_init_fn=_seed_worker_numpy if worker_seeding == "all" else None,
        persistent_workers=persistent_workers and workers > 0,
    )
