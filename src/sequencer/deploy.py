"""Export: `sequencer.export()` writes a model as ONNX, TorchScript or a torch.export ExportedProgram, loads the file
back and checks its logits; and the run of `sequencer export`."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sequencer.builder import load_model, resolve_model_name
from sequencer.checkpoint import LOCAL_DIR_PREFIX, RECORD_INPUT_KEYS, WeightsRecord, record_of
from sequencer.choices import EXPORT_FORMATS, INPUT_KEYS, QUANTIZATIONS
from sequencer.config import flag_values, input_overrides
from sequencer.data import check_input_fits, data_config
from sequencer.errors import CheckpointError, MissingDependencyError, SequencerError, UsageError
from sequencer.files import atomic_path
from sequencer.model import route

SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pt2": "exported-program"}
# Where the weights' record (`WeightsRecord`, with crop_mode and any quantization) is stored: an ONNX metadata_props
# key, or an extra file in the TorchScript / .pt2 archive.
CONFIG_KEY = "sequencer_config"
CONFIG_FILE = f"{CONFIG_KEY}.json"
# The lowest opset torch's ONNX exporter writes: it converts a lower request afterwards, which fails for nn.LSTM's
# graph and then leaves the file at this opset.
LOWEST_OPSET = 18
# What torch.onnx's exporter (onnx, onnxscript) and our check of the written file (onnxruntime) import.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# What a file's config must hold for `predict` to rebuild the preprocessing (crop_mode and class_names are optional).
_REQUIRED_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")


class ExportCheckError(SequencerError, RuntimeError):
    """The exported file's outputs differ from PyTorch's by more than the tolerance (the file is kept, under
    `failed_path`'s name)."""


def failed_path(path: str | Path) -> Path:
    """Where an export that fails its check is kept: `<stem>.failed<suffix>` beside `path`, which it never replaces."""
    path = Path(path)
    return path.with_name(f"{path.stem}.failed{path.suffix}")


def missing_onnx_packages(packages: tuple[str, ...] = ONNX_PACKAGES) -> list[str]:
    """Those of `packages` that are not installed."""
    return [name for name in packages if importlib.util.find_spec(name) is None]


def require_onnx_packages(packages: tuple[str, ...] = ONNX_PACKAGES, purpose: str = "ONNX export") -> None:
    """Raise MissingDependencyError naming the `export` extra when one of `packages` (what `purpose` needs) is
    missing."""
    missing = missing_onnx_packages(packages)
    if missing:
        raise MissingDependencyError(
            f"{purpose} needs {', '.join(packages)}; {', '.join(missing)} not installed: "
            'pip install "sequencer[export]"'
        )


def is_onnx_file(path: str | Path | None) -> bool:
    """Whether `path` names an ONNX file (by its suffix)."""
    return path is not None and SUFFIXES.get(Path(path).suffix.lower()) == "onnx"


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for `path` with every graph optimisation on and `threads` intra-op threads
    (default: onnxruntime's, one per physical core); a file onnxruntime cannot load is a CheckpointError."""
    require_onnx_packages(("onnxruntime",), "running an .onnx file")
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidProtobuf, NoSuchFile

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidArgument, InvalidProtobuf, NoSuchFile) as error:
        reason = str(error).splitlines()[0].split(" failed:")[-1]
        raise CheckpointError(f"{path} is not an ONNX file onnxruntime can load: {reason}") from None


@dataclass
class OnnxModel:
    """An exported ONNX file in an onnxruntime session, with the preprocessing `export` stored in it."""

    path: Path
    session: Any
    config: dict[str, Any]

    @property
    def num_classes(self) -> int:
        """Width of the logits."""
        width = self.session.get_outputs()[0].shape[-1]
        return width if isinstance(width, int) else int(self.config["num_classes"])

    @property
    def record(self) -> WeightsRecord:
        """What the exported weights are, as `export` stored it."""
        return WeightsRecord.from_dict(self.config)

    @property
    def fixed_batch(self) -> int | None:
        """The one batch size the graph takes, or None when it takes any."""
        batch = self.session.get_inputs()[0].shape[0]
        return batch if isinstance(batch, int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a CPU float32 image batch of any size (a fixed-batch file runs it padded, chunk by chunk)."""
        batch = self.fixed_batch
        if batch is not None and x.shape[0] != batch:
            chunks = []
            for chunk in x.split(batch):
                padded = torch.cat([chunk, chunk.new_zeros(batch - chunk.shape[0], *chunk.shape[1:])])
                chunks.append(self(padded)[: chunk.shape[0]])
            return torch.cat(chunks)
        feed = {self.session.get_inputs()[0].name: x.detach().cpu().float().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxModel:
    """An ONNX file written by `export`, ready to run; a CheckpointError for any other file (no stored config)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    session = onnx_session(path, threads)
    text = session.get_modelmeta().custom_metadata_map.get(CONFIG_KEY)
    if text is None:
        raise CheckpointError(
            f"{path} is not a Sequencer export: it has no {CONFIG_KEY!r} metadata (input size, mean, std, crop); "
            "write the file with `sequencer export`"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its {CONFIG_KEY!r} metadata is not JSON ({error})") from None
    missing = [key for key in _REQUIRED_CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise CheckpointError(f"{path}: its {CONFIG_KEY!r} metadata lacks {', '.join(missing)}")
    return OnnxModel(path, session, config)


def quantize_onnx(source: Path, target: Path) -> None:
    """Write `source` to `target` with int8 weights (onnxruntime's dynamic quantization); the stored config says so.

    Dynamic rather than static: it needs no calibration images, and the activation ranges it computes per batch
    cannot be wrong for images unlike a calibration set; Sequencer's work outside its LSTMs is MatMuls, which it
    covers. Written to a temporary file beside `target` first, so that a failure leaves no half-written file.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    # The exporter records the weights' shapes too; the quantizer turns Gemm into MatMul by transposing its weight,
    # and its shape inference then fails on the stale record. Shapes of initializers are implied by the data anyway.
    initializers = {tensor.name for tensor in model.graph.initializer}
    kept = [info for info in model.graph.value_info if info.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    [entry] = [prop for prop in model.metadata_props if prop.key == CONFIG_KEY]
    entry.value = json.dumps({**json.loads(entry.value), "quantization": "int8-dynamic"})
    with _quiet_quantizer_advice(), atomic_path(target) as scratch:
        # The linears only: the stem and downsampling convolutions are under 3% of Sequencer2D-S's MACs, and
        # onnxruntime 1.23 has no CPU kernel for the ConvInteger that quantizing them writes.
        quantize_dynamic(model, scratch, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


@contextlib.contextmanager
def _quiet_quantizer_advice() -> Iterator[None]:
    """Drop the quantizer's root-logger advice to pre-process the model (its symbolic shape inference and graph
    optimisations; onnxruntime's session applies the latter when it loads the file)."""

    def advice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing before quantization")

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


@dataclass
class ExportResult:
    """What was written and how closely the reloaded file matches PyTorch (max |logit difference| per batch size)."""

    path: Path
    format: str
    input_size: tuple[int, int, int]
    dynamic_batch: bool
    tolerance: float
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    trivial: bool = False  # every reference logit was zero (an untrained zero head), so the check compared nothing
    # With --quantize: the quantized file against PyTorch on the same check images (the tolerance is not applied).
    quantization: str | None = None
    quantized_top1_agreement: tuple[int, int] | None = None  # (images whose top-1 class is PyTorch's, images)
    quantized_max_abs_diff: float | None = None

    @property
    def passed(self) -> bool:
        """Whether every checked batch size is within the tolerance."""
        return all(diff <= self.tolerance for diff in self.max_abs_diff.values())

    def summary(self) -> str:
        """One line per fact: the file, then the check."""
        diffs = ", ".join(f"{diff:.2e} at batch {batch}" for batch, diff in self.max_abs_diff.items())
        verdict = "passed" if self.passed else "FAILED"
        shape = "dynamic batch" if self.dynamic_batch else f"batch {next(iter(self.max_abs_diff))}"
        weights = f" with {self.quantization} weights" if self.quantization else ""
        checked = " of the float32 export" if self.quantization else ""
        lines = [
            f"wrote {self.format}{weights} to {self.path} (input {shape} x {' x '.join(map(str, self.input_size))})",
            f"check{checked} against PyTorch: max |logit diff| {diffs} (tolerance {self.tolerance:.0e}): {verdict}",
        ]
        if self.quantized_top1_agreement is not None:
            same, total = self.quantized_top1_agreement
            lines.append(
                f"{self.quantization} file against PyTorch on the same {total} images: top-1 agreement {same}/{total} "
                f"({same / total:.1%}), max |logit diff| {self.quantized_max_abs_diff:.2e}"
            )
        if self.trivial:
            lines.append(
                "note: all reference logits are zero (untrained zero-initialised head); load a checkpoint "
                "for a meaningful check"
            )
        return "\n".join(lines)


def check_opset(opset: int, fmt: str) -> None:
    """Refuse an opset the ONNX exporter cannot write, before any work."""
    if fmt != "onnx":
        raise UsageError(f"--opset {opset} applies to ONNX files, not {fmt}")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not LOWEST_OPSET <= opset <= newest:
        raise UsageError(
            f"--opset {opset}: torch's ONNX exporter writes opsets {LOWEST_OPSET} to {newest} (onnx "
            f"{onnx.__version__}); nothing was written"
        )


def format_for(path: str | Path, requested: str | None = None) -> str:
    """The requested format, else the one the file suffix names (.onnx, .pt / .ts, .pt2)."""
    if requested:
        if requested not in EXPORT_FORMATS:
            raise UsageError(f"unknown export format {requested!r}; expected one of {', '.join(EXPORT_FORMATS)}")
        return requested
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"cannot tell the export format from {path!r}; name it .onnx, .pt or .pt2, or pass --format")
    return SUFFIXES[suffix]


@contextlib.contextmanager
def _quiet_export_warnings() -> Iterator[None]:
    """Hide warnings that say nothing about the exported file's correctness (the numeric check does that)."""
    with warnings.catch_warnings():
        # nn.LSTM re-caches its own registered parameters in `_flat_weights` while torch.export traces it.
        warnings.filterwarnings("ignore", message=r".*_flat_weights.*were assigned during export", category=UserWarning)
        # Raised from inside torch's own decompositions during the ONNX export.
        warnings.filterwarnings("ignore", message=r"_check_is_size will be removed", category=FutureWarning)
        # TorchScript is deprecated upstream, but it is what the caller asked for.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _write(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    fmt: str,
    dynamic_batch: bool,
    config_json: str,
    opset: int | None,
) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    if fmt == "onnx":
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
        )
        written = next(entry.version for entry in program.model_proto.opset_import if entry.domain in ("", "ai.onnx"))
        if opset is not None and written != opset:
            raise UsageError(f"--opset {opset}: the exporter could only write opset {written}; nothing was written")
        program.model.metadata_props[CONFIG_KEY] = config_json
        program.save(path, external_data=False)
    elif fmt == "torchscript":
        # Scripting (not tracing) keeps the shape checks and works for any batch size.
        torch.jit.save(torch.jit.script(model), str(path), _extra_files={CONFIG_FILE: config_json})
    else:
        # Non-strict, as torch 2.9 and later do by default: torch 2.7's strict (dynamo) export of a static batch
        # breaks its graph at the mixers' mode switch, which a non-strict export sees skipped.
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=False)
        torch.export.save(program, path, extra_files={CONFIG_FILE: config_json})


def load_exported(path: str | Path, fmt: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A CPU function image batch -> logits running an exported file (onnxruntime for ONNX)."""
    fmt = format_for(path, fmt)
    if fmt == "onnx":
        require_onnx_packages()
        return load_onnx(path)
    if fmt == "torchscript":
        with _quiet_export_warnings():
            return torch.jit.load(str(path), map_location="cpu").eval()
    return torch.export.load(path).module()


def export(
    model: str | nn.Module | None,
    output: str | Path,
    format: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    use_ema: bool = False,
    unsafe_load: bool = False,
    dynamic_batch: bool = True,
    batch_size: int = 2,
    tolerance: float = 1e-4,
    opset: int | None = None,
    quantize: str | None = None,
    **config_overrides: Any,
) -> ExportResult:
    """Write `model` (a variant name loaded from `checkpoint`, None for the one it records, or a module) to `output`,
    reload it and check it.

    The example input has `batch_size` images of the model's input size (`img_size` / `input_size` override it);
    a static export is fixed to that batch, a dynamic one is checked at two more sizes. A module is copied, not
    changed; one in another dtype (bfloat16, float16) is exported as a float32 copy, with a warning. The preprocessing
    config (and the class names a checkpoint recorded) is stored in the file (key / extra file `sequencer_config`).
    The file is written and checked under a temporary name, and replaces `output` only once it passes: when its logits
    differ by more than `tolerance`, ExportCheckError, and the file is kept as `failed_path(output)`.
    `quantize="int8"` (ONNX only) then replaces the checked float32 file by `quantize_onnx`'s and reports how far its
    top-1 classes and logits are from PyTorch's on the same images.
    """
    fmt = format_for(output, format)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"unknown quantization {quantize!r}; expected one of {', '.join(QUANTIZATIONS)}")
    if quantize and fmt != "onnx":
        raise UsageError(f"--quantize {quantize} needs the ONNX format (onnxruntime quantizes ONNX files), not {fmt}")
    if fmt == "onnx":
        require_onnx_packages()
    if fmt == "exported-program" and Path(output).suffix != ".pt2":
        raise UsageError(f"torch.export archives must be named *.pt2 (torch.export.load needs it), got {output}")
    if fmt == "onnx" and Path(output).suffix.lower() != ".onnx":
        # predict picks onnxruntime by the suffix: under another name the file would be read as TorchScript.
        raise UsageError(f"ONNX files must be named *.onnx (predict runs them by that suffix), got {output}")
    if not tolerance >= 0:
        raise UsageError(f"--tolerance must be a non-negative number, got {tolerance}")
    unknown = set(config_overrides) - {*INPUT_KEYS, "crop_mode"}
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    if batch_size < 1 or (dynamic_batch and batch_size < 2):
        # torch.export specialises a dimension whose example size is 1, so a dynamic batch needs at least 2.
        fixed = " (a fixed batch of 1: --no-dynamic-batch)" if dynamic_batch else ""
        raise UsageError(f"batch_size must be >= {2 if dynamic_batch else 1} here, got {batch_size}{fixed}")
    if opset is not None:
        check_opset(opset, fmt)
    if model is None or isinstance(model, str):
        # An unknown variant or a local checkpoint (a file, a Hub folder) that does not exist is refused before
        # anything is loaded.
        if model:
            resolve_model_name(model)
        remote = str(checkpoint).startswith(("http://", "https://", "hf-hub:"))
        if checkpoint and not remote and not Path(str(checkpoint).removeprefix(LOCAL_DIR_PREFIX)).exists():
            raise CheckpointError(f"checkpoint not found: {checkpoint}")
        model = load_model(model, checkpoint, num_classes, in_chans, use_ema, unsafe_load)
    elif checkpoint:
        raise UsageError("pass either a model name with a checkpoint or a ready model, not a module and a checkpoint")
    else:
        model = copy.deepcopy(model)  # the caller's module keeps its device and RNN code path
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        # The exporters, the check's inputs and onnxruntime's float path all work in float32.
        warnings.warn(f"exporting a float32 copy of the {str(dtype).removeprefix('torch.')} model", stacklevel=2)
    # Eval mode on the CPU in float32, on the library-RNN code path that every exporter can trace (for good: this is
    # our copy).
    model.cpu().float().eval()
    route(model, rnn_impl="reference")
    cfg = data_config(model, **config_overrides)
    # What the file is: the model's record, with the input it is exported for (the overrides asked included).
    record = replace(record_of(model), **{key: cfg[key] for key in RECORD_INPUT_KEYS})
    config = {**record.as_dict(), "crop_mode": cfg.get("crop_mode")}
    input_size = tuple(cfg["input_size"])
    check_input_fits(model, input_size)  # before any file or folder is made
    generator = torch.Generator().manual_seed(0)
    batches = [batch_size, 1, batch_size + 3] if dynamic_batch else [batch_size]
    inputs = {batch: torch.randn(batch, *input_size, generator=generator) for batch in batches}

    path = Path(output)
    with _quiet_export_warnings(), torch.no_grad():
        # First, so that an input the model cannot take fails with the model's own error before any folder is made.
        references = {batch: model(x) for batch, x in inputs.items()}
    # Written and checked under a temporary name beside `path`, which is replaced only by a file that passed: a good
    # export already there survives a failed check or an interrupted one (predict would run whatever is at `path`).
    with atomic_path(path) as scratch:
        with _quiet_export_warnings(), torch.no_grad():
            _write(model, inputs[batch_size], scratch, fmt, dynamic_batch, json.dumps(config), opset)
            runner = load_exported(scratch, fmt)
            result = ExportResult(path, fmt, input_size, dynamic_batch, tolerance)
            for batch, x in inputs.items():
                result.max_abs_diff[batch] = (runner(x).float() - references[batch]).abs().max().item()
        result.trivial = all(not ref.any() for ref in references.values())
        if not result.passed:
            kept = failed_path(path)
            os.replace(scratch, kept)  # atomic_path then finds no temporary file and leaves `path` alone
            result.path = kept
            raise ExportCheckError(
                f"{result.summary()}\nthe file was kept at {kept} for inspection; {path} was not replaced"
            )
        if quantize:
            quantize_onnx(scratch, scratch)
            quantized = load_exported(scratch, fmt)
            logits = {batch: quantized(x) for batch, x in inputs.items()}
            same = sum(int((logits[b].argmax(-1) == references[b].argmax(-1)).sum()) for b in inputs)
            result.quantization = quantize
            result.quantized_top1_agreement = (same, sum(batches))
            result.quantized_max_abs_diff = max((logits[b] - references[b]).abs().max().item() for b in inputs)
    return result


def run(args: argparse.Namespace) -> int:
    """Export, check, and say how it went; exit 1 when the written file fails the check (2 for a refused request)."""
    keywords = flag_values(export, args, checkpoint=args.checkpoint or None, **input_overrides(args))
    # A failed check is the command's answer, not a refused request: its own exit code (1), and its full report.
    try:
        result = export(args.model, args.output, args.format, **keywords)
    except ExportCheckError as error:
        print(f"sequencer export: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
