"""Prediction: `sequencer.predict()` (top-k classes of images or folders with a model's own preprocessing), its
CSV / JSON / table output, and the run of `sequencer predict`."""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sequencer import deploy, recurrence
from sequencer import model as model_module
from sequencer.builder import load_model, same_variant
from sequencer.choices import EXPORT_PAYS_OFF_AT, INPUT_KEYS, PREDICT_RUNTIMES, PREDICTION_FORMATS
from sequencer.config import flag_values, image_mode, input_overrides
from sequencer.data import IMAGE_EXTENSIONS, check_image_input_fits, create_transform, data_config, image_channels
from sequencer.deploy import OnnxModel, export, is_onnx_file, load_onnx, missing_onnx_packages, require_onnx_packages
from sequencer.errors import CheckpointError, DatasetError, UsageError
from sequencer.files import atomic_path, atomic_write
from sequencer.runtime import autocast, progress_bar, resolve_device, set_threads

EXPORT_CACHE_FILES = 8  # ONNX exports predict keeps (Sequencer2D-S's is 110 MB), the most recently used


@dataclass
class ClassScore:
    """One of the top-k classes of an image."""

    index: int
    label: str
    probability: float


@dataclass
class Prediction:
    """The top-k classes of one file, or why it could not be read (`error`)."""

    path: str
    top: list[ClassScore] = field(default_factory=list)
    error: str | None = None


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names in index order (WordNet's first lemma, from timm's packaged synset data)."""
    info = ImageNetInfo("imagenet-1k")
    synsets = info.label_names()
    names = [info.label_name_to_description(synset).split(",")[0].strip() for synset in synsets]
    # Two lemmas name two classes each ("crane" the bird and the machine, "maillot"); the synset id tells them apart.
    counts = Counter(names)
    labelled = zip(names, synsets, strict=True)
    return tuple(f"{name} ({synset})" if counts[name] > 1 else name for name, synset in labelled)


def load_class_names(path: str | Path, num_classes: int) -> list[str]:
    """Class names from a file: one per line, a JSON list, or a JSON dict (index -> name or name -> index)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"class map not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"class map {path} is not valid JSON: {error}") from None
        if isinstance(data, dict):
            # Integer values make it name -> index whatever the names are: names may be numbers too ("0", "1", ...).
            if all(isinstance(index, int) and not isinstance(index, bool) for index in data.values()):
                by_index = {index: str(name) for name, index in data.items()}
            elif all(str(key).isdigit() for key in data):
                by_index = {int(key): str(name) for key, name in data.items()}
            else:
                raise UsageError(f"class map {path}: a JSON dict must map indices to names or names to indices")
            if sorted(by_index) != list(range(len(by_index))):
                raise UsageError(f"class map {path}: the indices must be 0..{len(by_index) - 1} with none missing")
            names = [by_index[i] for i in range(len(by_index))]
        elif isinstance(data, list):
            names = [str(name) for name in data]
        else:
            raise UsageError(f"class map {path}: expected a JSON list or dict, got {type(data).__name__}")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise UsageError(f"class map {path} has {len(names)} names but the model has {num_classes} classes")
    return names


def class_names_for(
    num_classes: int, class_map: str | Path | Sequence[str] | None = None, recorded: Sequence[str] | None = None
) -> list[str]:
    """Names for each class index: the class map's, else those the checkpoint recorded, else ImageNet-1K's for 1000
    classes, else the index itself."""
    if class_map is None and recorded and len(recorded) == num_classes:
        return list(recorded)
    if class_map is None:
        return list(imagenet_class_names()) if num_classes == 1000 else [str(i) for i in range(num_classes)]
    if isinstance(class_map, (str, Path)):
        return load_class_names(class_map, num_classes)
    if len(class_map) != num_classes:
        raise UsageError(f"{len(class_map)} class names given but the model has {num_classes} classes")
    return list(class_map)


def find_images(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files given directly, plus the images (by extension) under each folder, recursively, in sorted order."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            files.append(path)  # an unreadable file is reported with the results, not raised
        else:
            raise UsageError(f"{path}: no such file or folder")
    if not files:
        named = ", ".join(map(str, inputs))
        raise UsageError(f"no images found in {named} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


class ImageFiles(Dataset):
    """Image files read in PIL mode `mode` through a transform; a file that cannot be decoded yields its error instead
    of a tensor."""

    def __init__(self, files: Sequence[Path], transform: Any, mode: str = "RGB") -> None:
        self.files = list(files)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            with Image.open(self.files[index]) as image:
                return index, self.transform(image.convert(self.mode)), None
        # What PIL raises for missing, truncated, non-image or oversized files: reported with the results, not fatal.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            return index, None, f"{type(error).__name__}: {error}"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(index, tensor) for index, tensor, _ in items if tensor is not None]
    failed = [(index, error) for index, tensor, error in items if tensor is None]
    batch = torch.stack([tensor for _, tensor in good]) if good else None
    return [index for index, _ in good], batch, failed


@dataclass
class Classifier:
    """What `predict` runs, whatever the runtime: batch -> logits, its preprocessing config, its class names."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    config: dict[str, Any]  # a pretrained_cfg: input_size, crop_pct, interpolation, mean, std
    num_classes: int
    label_names: Sequence[str] | None
    device: torch.device
    runs: str  # the runtime and the file it runs, as predict reports them


def choose_runtime(
    runtime: str,
    checkpoint: str | Path | None,
    model: str | nn.Module | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> str:
    """The runtime asked for; `auto` is onnxruntime for an .onnx file, and for a named model's checkpoint on the CPU
    without autocast when onnxruntime is installed (the fastest exact CPU path, BENCHMARKS.md), else torch. `predict`
    then keeps torch for a checkpoint with no cached export and fewer than EXPORT_PAYS_OFF_AT images."""
    if runtime not in PREDICT_RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; expected one of {', '.join(PREDICT_RUNTIMES)}")
    if is_onnx_file(checkpoint):
        if runtime == "torch":
            raise UsageError(f"{checkpoint} is an ONNX file: onnxruntime runs it, not the torch runtime")
        return "onnxruntime"
    if runtime != "auto":
        return runtime
    # A ready module may hold changes an exporter cannot trace, and random weights would be exported at every call.
    exportable = checkpoint and not isinstance(model, nn.Module) and not amp
    on_cpu = resolve_device(device).type == "cpu"
    return "onnxruntime" if exportable and on_cpu and not missing_onnx_packages() else "torch"


def export_cache_dir() -> Path:
    """Where `predict` keeps the ONNX files it exports: `onnx` in $SEQUENCER_CACHE, else in ~/.cache/sequencer."""
    cache = os.environ.get("SEQUENCER_CACHE")
    if not cache:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sequencer"
    return Path(cache) / "onnx"


def export_key(model: nn.Module, transform_overrides: dict[str, Any]) -> str:
    """A digest of all that the exported file depends on: weights, config, preprocessing and the exporters' versions."""
    # The code that shapes the graph, not the package version: an edited checkout must not reuse an old export.
    sources = [
        hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest() for module in (model_module, recurrence, deploy)
    ]
    identity = {
        "model_name": getattr(model, "model_name", type(model).__name__),
        "pretrained_cfg": getattr(model, "pretrained_cfg", {}),
        "preprocessing": data_config(model, **transform_overrides),  # resolved: unset flags and defaults agree
        "versions": [torch.__version__, version("onnx"), version("onnxscript"), *sources],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cached_export_path(model: nn.Module, transform_overrides: dict[str, Any]) -> Path:
    """Where predict's cache keeps (or would keep) the model's ONNX export."""
    name = getattr(model, "model_name", type(model).__name__)
    return export_cache_dir() / f"{name}-{export_key(model, transform_overrides)[:24]}.onnx"


def cached_onnx_model(
    model: nn.Module,
    path: Path,
    transform_overrides: dict[str, Any],
    threads: int | None = None,
    announce: bool = False,
) -> OnnxModel:
    """The model's checked ONNX export (dynamic batch) in onnxruntime, from predict's cache at `path`
    (`cached_export_path`), where it is written on first use; a cached file onnxruntime cannot load is exported
    again. The cache keeps the EXPORT_CACHE_FILES most recently used files."""
    folder, name = path.parent, getattr(model, "model_name", type(model).__name__)
    if path.is_file():
        try:
            os.utime(path)
            return load_onnx(path, threads)
        except CheckpointError:  # damaged since it was written (renamed whole, so not by us)
            path.unlink(missing_ok=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if announce:
            print(
                f"exporting {name} to ONNX once for onnxruntime, into {folder} (--runtime torch skips it)",
                file=sys.stderr,
            )
        with atomic_path(path) as temporary:  # renamed whole: no reader sees half a file
            try:
                export(model, temporary, dynamic_batch=True, **transform_overrides)
            except deploy.ExportCheckError:
                # export keeps a failed file for inspection; here it would be a hidden file the eviction never sees.
                deploy.failed_path(temporary).unlink(missing_ok=True)
                raise
    except OSError as error:
        raise CheckpointError(
            f"cannot write predict's ONNX export into {folder} ({error.strerror or error}): set SEQUENCER_CACHE to a "
            "writable folder, or pass --runtime torch"
        ) from None
    exports = [file for file in folder.glob("*.onnx") if not file.name.startswith(".")]
    for stale in sorted(exports, key=lambda file: file.stat().st_mtime, reverse=True)[EXPORT_CACHE_FILES:]:
        stale.unlink(missing_ok=True)
    return load_onnx(path, threads)


def torch_classifier(
    model: nn.Module, device: str | torch.device | None, amp: bool, amp_dtype: str | None
) -> Classifier:
    """A PyTorch module on `device` in eval mode, under autocast when `amp`."""
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    model = model.to(torch_device).eval()
    # The images are float32; a module kept in bfloat16 or float16 takes its own dtype (its convolutions refuse any
    # other), and predict takes the softmax of its logits in float32.
    dtype = next(model.parameters()).dtype

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with autocast(torch_device, amp, amp_dtype):
            return model(batch.to(torch_device, dtype, non_blocking=True))

    cfg = getattr(model, "pretrained_cfg", {})
    runs = f"torch on {torch_device}{' under autocast' if amp else ''}"
    return Classifier(forward, cfg, model.num_classes, cfg.get("label_names"), torch_device, runs)


def onnx_classifier(
    exported: OnnxModel,
    model_name: str | None,
    num_classes: int | None,
    in_chans: int | None,
    transform_overrides: dict[str, Any],
    input_img_mode: str | None = None,
) -> Classifier:
    """An exported file in onnxruntime; a --model, --num-classes, --in-chans, --input-img-mode or input size that
    contradicts the file is refused (its graph is fixed to the size it was exported at)."""
    config = exported.config
    stored = config.get("model_name")
    if model_name and not same_variant(stored, model_name):  # an alias or name.tag, on either side, is the same
        raise UsageError(f"{exported.path} holds {stored}, not --model {model_name}")
    if num_classes is not None and num_classes != exported.num_classes:
        raise UsageError(f"{exported.path} has {exported.num_classes} classes, not --num-classes {num_classes}")
    channels = config["input_size"][0]
    if in_chans is not None and in_chans != channels:
        raise UsageError(f"{exported.path} takes {channels} input channels, not --in-chans {in_chans}")
    mode = image_mode(channels, input_img_mode)
    if image_channels(mode) != channels:
        raise UsageError(
            f"{exported.path} takes {channels}-channel inputs but images are read as {mode}, "
            f"{image_channels(mode)} channel(s) (--input-img-mode)"
        )
    exported_size = list(config["input_size"])
    asked_size = list(data_config(config, **transform_overrides)["input_size"])
    if asked_size != exported_size:
        raise UsageError(
            f"{exported.path} was exported for {'x'.join(map(str, exported_size))} inputs, not "
            f"{'x'.join(map(str, asked_size))} (--img-size / --input-size): export it again at that size"
        )
    weights = "int8" if config.get("quantization") else "float32"
    runs = f"onnxruntime ({weights} weights) on {exported.path}"
    return Classifier(exported, config, exported.num_classes, config.get("class_names"), torch.device("cpu"), runs)


def predict(
    inputs: str | Path | Sequence[str | Path],
    model: str | nn.Module | None = None,
    checkpoint: str | Path | None = None,
    *,
    topk: int = 5,
    class_map: str | Path | Sequence[str] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    input_img_mode: str | None = None,
    use_ema: bool = False,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    amp_dtype: str | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    unsafe_load: bool = False,
    **transform_overrides: Any,
) -> list[Prediction]:
    """Top-k classes of each image file (folders are searched recursively), in input order, failures included.

    `model` is a variant name (default: the one `checkpoint` records, else sequencer2d_s) or a ready module, which is
    moved to `device` and put in eval mode. `checkpoint` may be an .onnx file from `export`: onnxruntime runs it with
    the preprocessing and class names stored in it. `runtime` is "torch", "onnxruntime" or "auto" (`choose_runtime`);
    onnxruntime on a checkpoint runs its ONNX export, made and checked once and cached (`cached_onnx_model`); `auto`
    makes that export only for EXPORT_PAYS_OFF_AT images or more and falls back to torch when it fails. `progress`
    shows the progress and the export on stderr.
    `threads` sets onnxruntime's intra-op threads (torch's are the process's: `torch.set_num_threads`).
    `in_chans` defaults to the channels the checkpoint records, and `input_img_mode`, the PIL mode images are read
    in, to the mode of the model's channels (RGB for 3, else L).
    `transform_overrides` (img_size, crop_pct, mean, ...) adjust the model's preprocessing.
    """
    if topk < 1:
        raise UsageError(f"topk must be at least 1, got {topk}")
    unknown = set(transform_overrides) - set(INPUT_KEYS)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}; preprocessing overrides are {INPUT_KEYS}")
    if isinstance(model, str) and is_onnx_file(model):
        raise UsageError(f"--model takes a variant name; pass the exported file as --checkpoint {model}")
    if not isinstance(model, str) and model is not None and checkpoint:
        raise UsageError("pass either a model name with a checkpoint or a ready model, not a module and a checkpoint")
    files = find_images(inputs)
    asked_runtime = runtime
    runtime = choose_runtime(runtime, checkpoint, model, device, amp)
    if runtime == "onnxruntime":
        if amp:
            raise UsageError("--amp is for the torch runtime; onnxruntime runs the file as exported (float32 or int8)")
        if device is not None and resolve_device(device).type != "cpu":
            raise UsageError(f"onnxruntime runs on the CPU here; --device {device} is for the torch runtime")
        if not is_onnx_file(checkpoint):
            if not checkpoint and not isinstance(model, nn.Module):
                # Random weights: their export would be made and cached at every call, pushing real exports out of
                # the cache (auto keeps torch for them, `choose_runtime`).
                raise UsageError(
                    "--runtime onnxruntime needs a checkpoint (its weights are exported once and cached); without "
                    "one the weights are random: pass --checkpoint, or --runtime torch"
                )
            # The export, and the cache key (the exporters' versions), need all three.
            require_onnx_packages(purpose="--runtime onnxruntime")
    if is_onnx_file(checkpoint):
        if use_ema:
            raise UsageError("--use-ema picks weights inside a training checkpoint; an .onnx file holds one set")
        exported = load_onnx(checkpoint, threads)
        classifier = onnx_classifier(exported, model, num_classes, in_chans, transform_overrides, input_img_mode)
    else:
        if model is None or isinstance(model, str):
            model = load_model(model, checkpoint, num_classes, in_chans, use_ema, unsafe_load)
        mode = image_mode(data_config(model)["input_size"][0], input_img_mode)  # the model's own channels
        check_image_input_fits(model, data_config(model, **transform_overrides)["input_size"], mode)
        classifier = None
        if runtime == "onnxruntime":
            try:
                path = cached_export_path(model, transform_overrides)
                # auto exports for a run long enough to repay the export, and otherwise runs one made before.
                if asked_runtime != "auto" or path.is_file() or len(files) >= EXPORT_PAYS_OFF_AT:
                    exported = cached_onnx_model(model, path, transform_overrides, threads, announce=progress)
                    classifier = onnx_classifier(exported, None, None, None, transform_overrides, input_img_mode)
            except Exception as error:
                if asked_runtime != "auto":
                    raise
                # auto only chose onnxruntime for speed; PyTorch gives the same classes.
                if progress:
                    print(f"onnxruntime not used ({type(error).__name__}: {error}); running torch", file=sys.stderr)
        if classifier is None:
            classifier = torch_classifier(model, device, amp, amp_dtype)
    transform = create_transform(classifier.config, train=False, **transform_overrides)
    names = class_names_for(classifier.num_classes, class_map, classifier.label_names)
    topk = min(topk, len(names))

    loader = DataLoader(
        ImageFiles(files, transform, image_mode(classifier.config["input_size"][0], input_img_mode)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=classifier.device.type == "cuda",
    )
    results = [Prediction(str(path)) for path in files]
    bar = progress_bar(show=progress, total=len(files), unit="img", leave=True)
    with torch.inference_mode(), bar:
        for indices, batch, failed in loader:
            for index, error in failed:
                results[index].error = error
            if batch is not None:
                probabilities, classes = classifier.forward(batch).float().softmax(dim=-1).topk(topk, dim=-1)
                for index, probs, top in zip(indices, probabilities.tolist(), classes.tolist(), strict=True):
                    results[index].top = [ClassScore(c, names[c], p) for c, p in zip(top, probs, strict=True)]
            bar.update(len(indices) + len(failed))
    classified = sum(prediction.error is None for prediction in results)
    if progress and classified:
        weights = f", weights from {checkpoint}" if checkpoint and not is_onnx_file(checkpoint) else ""
        print(f"classified {classified} image(s) with {classifier.runs}{weights}", file=sys.stderr)
    return results


def format_table(predictions: Sequence[Prediction]) -> str:
    """A human-readable listing: each file, then its classes with probabilities; unreadable files at the end."""
    lines = []
    for prediction in predictions:
        if prediction.error is None:
            lines.append(prediction.path)
            lines += [f"  {score.probability:7.2%}  {score.label} [{score.index}]" for score in prediction.top]
    failed = [p for p in predictions if p.error is not None]
    lines.append(f"{len(predictions) - len(failed)} classified, {len(failed)} unreadable")
    lines += [f"  unreadable: {p.path}: {p.error}" for p in failed]
    return "\n".join(lines) + "\n"


def write_predictions_csv(predictions: Sequence[Prediction], stream: TextIO) -> None:
    """One row per file: path, error, then index / label / probability for each rank."""
    k = max((len(p.top) for p in predictions), default=0)
    writer = csv.writer(stream, lineterminator="\n")
    ranked = ("index", "label", "probability")
    header = ["path", "error", *(f"{column}_{rank}" for rank in range(1, k + 1) for column in ranked)]
    writer.writerow(header)
    for prediction in predictions:
        row: list[Any] = [prediction.path, prediction.error or ""]
        for score in prediction.top:
            row += [score.index, score.label, f"{score.probability:.6f}"]
        row += [""] * (len(header) - len(row))
        writer.writerow(row)


def render(predictions: Sequence[Prediction], output_format: str) -> str:
    """The predictions as a table, CSV or JSON text."""
    if output_format == "table":
        return format_table(predictions)
    if output_format == "csv":
        buffer = io.StringIO()
        write_predictions_csv(predictions, buffer)
        return buffer.getvalue()
    if output_format == "json":
        return json.dumps([asdict(p) for p in predictions], indent=2) + "\n"
    raise UsageError(f"unknown output format {output_format!r}; expected one of {PREDICTION_FORMATS}")


def output_format_for(output: str | None, requested: str | None) -> str:
    """--format when given, else from --output's suffix (.csv, .json), else the table."""
    if requested:
        return requested
    suffix = Path(output).suffix.lower() if output else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "table")


def run(args: argparse.Namespace) -> int:
    """Classify, print or write the results; unreadable files are listed, a run where none could be read refused."""
    set_threads(args.threads)
    keywords = flag_values(predict, args, progress=True, **input_overrides(args))
    predictions = predict(args.inputs, args.model, args.checkpoint or None, **keywords)
    failed = [p for p in predictions if p.error is not None]
    if len(failed) == len(predictions):
        more = f" (and {len(failed) - 1} more files)" if len(failed) > 1 else ""
        raise DatasetError(f"no image could be read: {failed[0].path}: {failed[0].error}{more}")
    text = render(predictions, output_format_for(args.output, args.output_format))
    if args.output:
        with atomic_write(args.output) as f:  # written whole: a failure leaves earlier results as they were
            f.write(text.encode("utf-8"))
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if failed:
        print(f"{len(failed)} of {len(predictions)} files could not be read (listed in the output)", file=sys.stderr)
    return 0
