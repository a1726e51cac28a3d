"""Reading and writing weights: the authors' key format, timm's, and our own (timm's layout plus metadata)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from sequencer.errors import CheckpointError
from sequencer.files import atomic_write, plain
from sequencer.model import ALIASES, VARIANTS

_logger = logging.getLogger(__name__)

WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")

# What names a folder in the Hub layout to the readers, as to timm's create_model: local-dir:DIR.
LOCAL_DIR_PREFIX = "local-dir:"
# The Hub layout's description of the weights beside them, as timm's save_for_hf writes it.
HUB_CONFIG = "config.json"
# The Hub layout's weights, as timm's push_to_hub writes them, newest format first.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The key of the record in a torch checkpoint and in a safetensors file's metadata (JSON there).
RECORD_KEY = "sequencer_record"
# The record's input fields, in timm's pretrained_cfg keys: how images are read for these weights.
RECORD_INPUT_KEYS = ("input_size", "crop_pct", "mean", "std", "interpolation")

# timm's train.py pickles its argparse.Namespace beside the weights: plain data, safe to rebuild.
SAFE_GLOBALS = [argparse.Namespace]
UNSAFE_LOAD_HINT = "pass --unsafe-load (Python: unsafe_load=True) only if you trust whoever made the file"


def read_file(path: str | os.PathLike, unsafe_load: bool = False) -> dict[str, Any]:
    """Load a local .pth / .pth.tar / .safetensors file, or a folder in the Hub layout, into a dict on the CPU, as
    data (`sequencer.builder.open_source` fetches hf-hub: and http(s) weights first).

    A pickle is read with torch's weights-only unpickler, which rebuilds tensors and plain containers and runs no
    code; one that needs anything else is refused unless `unsafe_load` (it could run code). Any file that cannot
    be read raises `CheckpointError` naming it and what is wrong.
    """
    path = str(path).removeprefix(LOCAL_DIR_PREFIX)
    if Path(path).is_dir():
        return _read_hub_folder(Path(path), unsafe_load)
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if export := _export_kind(path):
        raise CheckpointError(f"{path} is {export}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    with open(path, "rb") as f:
        return _read_pickle(f, path, unsafe_load)


def _read_hub_folder(folder: Path, unsafe_load: bool) -> dict[str, Any]:
    """A folder in the Hub layout (`write_hub_folder`, timm's `save_for_hf`): its weights, with their stored record,
    else the one its config.json holds (timm's names: architecture, label_names, pretrained_cfg's input)."""
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None or not (folder / HUB_CONFIG).is_file():
        raise CheckpointError(
            f"{folder} is a folder without the Hub layout ({HUB_CONFIG} and {' or '.join(WEIGHT_FILES)}): pass a "
            "weights file in it (a run's model_best.pth.tar), or the folder to `sequencer average`"
        )
    contents = read_file(weights, unsafe_load=unsafe_load)
    if stored_record(contents) is not None:
        return contents
    try:
        config = json.loads((folder / HUB_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / HUB_CONFIG}: not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / HUB_CONFIG}: expected a JSON object, found {type(config).__name__}")
    # timm's older config.json is a pretrained_cfg alone, its architecture included and its class names `labels`.
    cfg = config.get("pretrained_cfg", config)
    names = config.get("label_names", cfg.get("label_names", cfg.get("labels")))
    record = {
        "model_name": config.get("architecture"),
        "class_names": names if isinstance(names, list) else None,
        **{key: cfg[key] for key in RECORD_INPUT_KEYS if cfg.get(key) is not None},
    }
    timm_args = config.get("model_args")
    if isinstance(timm_args, dict) and isinstance(record["model_name"], str):
        record["model_args"] = model_args_from_timm(record["model_name"], timm_args)
    state_dict = extract_state_dict(contents)
    stem = state_dict.get("stem.proj.weight")
    if record.get("input_size") and stem is not None and stem.dim() == 4:
        # timm keeps its pretrained_cfg's 3-channel input_size whatever in_chans the model was built with.
        record["input_size"] = [int(stem.shape[1]), *record["input_size"][1:]]
    return {"state_dict": state_dict, RECORD_KEY: record}


def _read_safetensors(path: str) -> dict[str, Any]:
    """The tensors, wrapped with the record their metadata holds (`save_weights`, `average`), when it holds one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if RECORD_KEY in metadata:
        return {"state_dict": tensors, RECORD_KEY: metadata[RECORD_KEY]}
    if "class_names" not in metadata and not metadata.get("model_name"):
        return tensors
    # Files written before the record: their metadata's loose keys, read as a training checkpoint's.
    contents: dict[str, Any] = {"state_dict": tensors, "model_name": metadata.get("model_name")}
    contents.update({key: json.loads(metadata[key]) for key in ("class_names", "args") if key in metadata})
    contents["averaged_from"] = metadata.get("averaged_from", "")
    return contents


def _export_kind(path: str) -> str | None:
    """What `sequencer export` file `path` is, with what takes it, or None when it is no export."""
    weights = "the other commands need the weights file it was exported from"
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte header length, then the JSON header; its first byte may be ONNX's 0x08 by chance.
    safetensors = head[8:9] == b"{"
    if path.endswith(".onnx") or (head[:1] == b"\x08" and not head.startswith(b"PK") and not safetensors):
        return f"an ONNX export: `sequencer predict --checkpoint {path}` runs it; {weights}"
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    files = {name.rsplit("/", 1)[-1] for name in names}
    if files & {"archive_format", "serialized_exported_program.json"}:
        return f"a torch.export archive: torch.export.load runs it; {weights}"
    if "constants.pkl" in files or any("/code/" in name for name in names):
        return f"a TorchScript export: torch.jit.load runs it; {weights}"
    return None


def _unsafe_globals(f: BinaryIO) -> list[str]:
    """The Python globals a pickled checkpoint names beyond what the weights-only unpickler allows; [] if unreadable."""
    f.seek(0)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:  # any failure to parse means the file is damaged, not that it is foreign
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    return [name for name in found if name not in allowed]


def _read_pickle(f: BinaryIO, path: str, unsafe_load: bool) -> dict[str, Any]:
    head = f.read(16)
    f.seek(0)
    if not head:
        raise CheckpointError(f"{path} is empty: not a torch checkpoint")
    # torch.save writes a zip archive or (its legacy format) a pickle of protocol 2; the unpickler would read any
    # other bytes as opcodes and fail with whatever they spell (a text file: "KeyError: 101").
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = "a safetensors file: name it .safetensors" if head[8:10] == b'{"' else f"it starts with {head!r}"
        raise CheckpointError(f"{path} is not a torch checkpoint (a zip archive or a pickle): {kind}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        foreign = _unsafe_globals(f)
        if not foreign:
            raise CheckpointError(f"{path}: not a torch checkpoint or corrupt (unpickling failed)") from None
        if not unsafe_load:
            raise CheckpointError(
                f"{path} holds Python objects ({', '.join(foreign[:3])}) that loading would have to run code to "
                f"build; refused: {UNSAFE_LOAD_HINT}"
            ) from None
        _logger.warning("%s: loading with full pickle (--unsafe-load): it can run code from the file", path)
        f.seek(0)
        obj = torch.load(f, map_location="cpu", weights_only=False)
    except RuntimeError as error:  # a zip archive torch cannot read: truncated or damaged
        message = str(error).split(".")[0]
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({message})") from None
    except (EOFError, KeyError, ValueError, OSError) as error:  # a damaged pickle
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found a {type(obj).__name__}")
    return obj


def extract_state_dict(obj: dict[str, Any], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Unwrap `model` / `state_dict` / `state_dict_ema` and strip DDP's `module.` prefix."""
    order = ("state_dict_ema", "model_ema", *WRAPPERS) if use_ema else WRAPPERS
    for key in order:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"no state dict of tensors found; top-level keys: {[str(k) for k in obj][:10]}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def from_authors_format(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the authors' keys (`blocks.{stage}.{j}`, `head`) to ours (`stages.{stage}.blocks.{j}`, `head.fc`)."""
    if not any(k.startswith("blocks.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        # The authors append the downsampling to the end of a stage; it starts the next stage in ours.
        key = re.sub(r"^blocks\.(\d+)\.\d+\.down\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.down.", key)
        key = re.sub(r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        out[key] = value
    return out


def recorded_model_name(contents: dict[str, Any]) -> str | None:
    """The model a checkpoint says it holds: ours and `sequencer train`'s record it, timm's train.py its args."""
    args = contents.get("args")
    from_args = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    return contents.get("model_name") or contents.get("arch") or from_args or None


@dataclass(frozen=True)
class WeightsRecord:
    """What a weights file is: the model, its classes, the input it was trained at, and whose weights these are.

    Every writer stores it (training checkpoints, `average`, `save_weights`, `export`) and every reader gets it from
    `read_record` (through `open_checkpoint`) or, for an exported file, `WeightsRecord.from_dict` of its metadata."""

    model_name: str | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None  # in class-index order
    input_size: tuple[int, int, int] | None = None  # (C, H, W) the weights were trained at
    crop_pct: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    ema: bool = False  # the weights are an exponential moving average of the training weights
    averaged_from: tuple[str, ...] = ()  # the checkpoints these weights are the mean of (`sequencer average`)
    # The architecture's changes to the registered variant (SequencerConfig fields, e.g. from --model-kwargs).
    model_args: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, no tuples): what torch, JSON and YAML all store as it is."""
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsRecord:
        """The record a writer stored (`as_dict`); unknown keys are ignored, missing ones left unknown."""
        known = {f.name for f in fields(cls)}
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        return cls(**{key: value for key, value in values.items() if key in known})

    def input_config(self) -> dict[str, Any]:
        """The recorded input as timm's pretrained_cfg keys (those recorded only)."""
        return {key: getattr(self, key) for key in RECORD_INPUT_KEYS if getattr(self, key) is not None}


# SequencerConfig fields recorded elsewhere (the classes, the input's channels) or that only training reads.
NOT_MODEL_ARGS = ("num_classes", "in_chans", "drop_rate", "drop_path_rate")


def model_args_of(model: nn.Module) -> dict[str, Any]:
    """How a built model's architecture differs from its registered variant's, as plain data (lists, not tuples)."""
    config, name = getattr(model, "config", None), getattr(model, "model_name", None)
    variant = VARIANTS.get(ALIASES.get(name, name)) if name else None
    if config is None or variant is None:
        return {}
    changed = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in NOT_MODEL_ARGS}
    return {k: plain(v) for k, v in changed.items() if v != getattr(variant, k)}


def model_args_from_timm(architecture: str, timm_args: dict[str, Any]) -> dict[str, Any]:
    """timm's `model_args` for its Sequencer2d (config.json) as our architecture changes to the variant it names:
    the fields of the same name, and `mlp_ratios` as our `mlp_ratio` when one ratio serves every stage."""
    variant = VARIANTS.get(ALIASES.get(architecture, architecture))
    if variant is None:
        return {}
    # timm's img_size (a pair, newer timm writes it) shapes nothing in its port: the input is pretrained_cfg's.
    skipped = (*NOT_MODEL_ARGS, "img_size")
    args = {key: value for key, value in timm_args.items() if hasattr(variant, key) and key not in skipped}
    ratios = timm_args.get("mlp_ratios")
    if isinstance(ratios, list | tuple) and len(set(ratios)) == 1:
        args["mlp_ratio"] = ratios[0]
    return {key: plain(value) for key, value in args.items() if plain(value) != plain(getattr(variant, key))}


def record_of(model: nn.Module) -> WeightsRecord:
    """The record of a built model's weights: its name, architecture, classes and the input its pretrained_cfg holds."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    return WeightsRecord(
        model_name=getattr(model, "model_name", None),
        num_classes=getattr(model, "num_classes", None),
        class_names=tuple(map(str, names)) if names else None,
        ema=bool(cfg.get("ema", False)),
        averaged_from=tuple(cfg.get("averaged_from", ())),
        model_args=model_args_of(model),
        **{key: tuple(v) if isinstance(v := cfg.get(key), list) else v for key in RECORD_INPUT_KEYS},
    )


def apply_record(model: nn.Module, record: WeightsRecord) -> None:
    """Make the record the model's own: its preprocessing, class names and what its weights are (pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return
    if record.class_names and len(record.class_names) == getattr(model, "num_classes", -1):
        cfg["label_names"] = list(record.class_names)
    cfg.update(record.input_config())
    cfg.update(ema=record.ema, averaged_from=list(record.averaged_from))


def stored_record(contents: dict[str, Any]) -> dict[str, Any] | None:
    """The record a writer stored in a file's contents (a dict, or JSON in safetensors metadata), if any."""
    stored = contents.get(RECORD_KEY)
    stored = json.loads(stored) if isinstance(stored, str) else stored
    return stored if isinstance(stored, dict) else None


def read_record(contents: dict[str, Any], state_dict: dict[str, torch.Tensor], ema: bool = False) -> WeightsRecord:
    """What a file's contents say they are: the stored record, else what older files and timm's train.py recorded
    (their run's flags, class names and model name); `ema`: the EMA weights were the ones taken from the file."""
    head = state_dict.get("head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else None
    stored = stored_record(contents)
    if stored is not None:
        record = WeightsRecord.from_dict(stored)
        return replace(record, num_classes=num_classes, ema=record.ema or ema)
    args = contents.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    given = {key: tuple(v) if isinstance(v := args.get(key), list) else v for key in RECORD_INPUT_KEYS}
    if not given["input_size"] and args.get("img_size"):
        size = int(args["img_size"])
        given["input_size"] = (int(args.get("in_chans") or 3), size, size)
    names = contents.get("class_names")
    averaged = contents.get("averaged_from") or ""
    return WeightsRecord(
        model_name=recorded_model_name(contents),
        num_classes=num_classes,
        class_names=tuple(map(str, names)) if isinstance(names, list) and names else None,
        ema=ema,
        averaged_from=tuple(averaged.split(", ")) if averaged else (),
        **{key: value for key, value in given.items() if value},
    )


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file read as data (`open_checkpoint`): its weights unwrapped into our key format, and what the
    file says they are, read once."""

    path: str
    contents: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    record: WeightsRecord


def has_ema_weights(contents: dict[str, Any]) -> bool:
    """Whether a checkpoint holds EMA weights: a training run's beside its raw ones, or an EMA file of its own."""
    training_ema = any(isinstance(contents.get(key), dict) for key in ("state_dict_ema", "model_ema"))
    return training_ema or bool((stored_record(contents) or {}).get("ema"))


def open_checkpoint(
    source: str | os.PathLike | dict[str, Any], use_ema: bool = False, unsafe_load: bool = False
) -> Checkpoint:
    """A checkpoint file in any supported format (see `read_file`), or its contents already in memory, with its
    weights unwrapped and renamed to our keys and its record read, once. `use_ema` on a file without EMA weights is
    refused: the raw weights would be scored under the EMA's name."""
    path = "the state dict" if isinstance(source, dict) else str(source)
    contents = source if isinstance(source, dict) else read_file(source, unsafe_load=unsafe_load)
    if use_ema and not has_ema_weights(contents):
        raise CheckpointError(f"--use-ema: {path} holds no EMA weights (train with --model-ema); drop --use-ema")
    state_dict = from_authors_format(extract_state_dict(contents, use_ema=use_ema))
    record = read_record(contents, state_dict, ema=use_ema)
    return Checkpoint(path=path, contents=contents, state_dict=state_dict, record=record)


def _as_flags(model_args: dict[str, Any]) -> str:
    """Architecture changes as --model-kwargs words ("none" when there are none)."""
    return " ".join(f"{key}={value}" for key, value in model_args.items()) or "none"


def load_checkpoint(model: nn.Module, checkpoint: Checkpoint, strict: bool = True) -> None:
    """Load an opened checkpoint's weights into `model`; a head of another size is re-initialised, with a warning.

    Weights that do not fit are a one-line `CheckpointError`: the model the file holds when it records another,
    else how many keys are missing, unexpected or of another shape, with the first of each. The class names the
    file records become the model's `pretrained_cfg["label_names"]` (timm's key) when they fit its head, and the
    input the weights were trained at its preprocessing (`apply_record`).
    """
    state_dict, source = checkpoint.state_dict, checkpoint.path
    own = model.state_dict()
    # Listed in the model's own order, so the first names point at the earliest layer that does not fit.
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    head = [k for k in reshaped if k.startswith("head.fc.")]  # a head for another number of classes: replaced
    mismatched = [k for k in reshaped if k not in head]
    if strict and (missing or unexpected or mismatched):
        name = getattr(model, "model_name", type(model).__name__)
        recorded, recorded_args = checkpoint.record.model_name, checkpoint.record.model_args
        if recorded and recorded != name:
            raise CheckpointError(f"{source} holds {recorded} weights; this model is {name}")
        if recorded and recorded_args != (built_args := model_args_of(model)):
            raise CheckpointError(
                f"{source} holds {recorded} weights with the architecture changes {_as_flags(recorded_args)}; this "
                f"model has {_as_flags(built_args)} (--model-kwargs)"
            )
        problems = [
            f"{label} keys ({len(keys)}): {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        if mismatched:
            first = mismatched[0]
            more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
            shapes = f"file {tuple(state_dict[first].shape)} vs model {tuple(own[first].shape)}"
            problems.append(f"shape mismatch for {first}: {shapes}{more}")
        raise CheckpointError(
            f"{source} does not fit {name} ({len(own)} keys in the model, {len(state_dict)} in the file): "
            + "; ".join(problems)
        )
    if head:
        _logger.warning(
            "checkpoint head has %d classes, model has %d: the classifier head is re-initialised (transfer learning)",
            state_dict["head.fc.weight"].shape[0],
            own["head.fc.weight"].shape[0],
        )
        state_dict = {k: v for k, v in state_dict.items() if k not in head}
        state_dict.update({k: own[k] for k in head})
    model.load_state_dict(state_dict, strict=strict)
    apply_record(model, checkpoint.record)


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a state dict in any supported key format (authors', timm's, ours; wrapped or not) into `model`."""
    load_checkpoint(model, open_checkpoint(state_dict), strict=strict)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save (safetensors for a .safetensors path) written atomically: a crash never leaves half a file.

    A full disk is a `CheckpointError` saying so; the file that was at `path` before is then intact."""
    path = Path(path)
    try:
        with atomic_write(path) as f:
            if path.suffix == ".safetensors":
                from safetensors.torch import save

                f.write(save(obj["state_dict"], metadata=obj.get("metadata")))
            else:
                torch.save(obj, f)
    except (OSError, RuntimeError) as error:
        if not _disk_full(error):
            raise
        before = f"the previous {path.name} survives intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"cannot write {path}: no space left on the disk; {before}") from error


def _disk_full(error: BaseException | None) -> bool:
    """Whether an ENOSPC / EDQUOT caused `error`: torch's writer reports a failed write as a RuntimeError whose
    context is the OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's weights in our format, .safetensors or a torch .pth file, with their record (`record_of`)."""
    write_weights({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, record_of(model), path)


def write_weights(state_dict: dict[str, torch.Tensor], record: WeightsRecord, path: str | os.PathLike) -> None:
    """Write weights and their record, atomically: .safetensors (the record in its metadata) or a torch file."""
    if Path(path).suffix == ".safetensors":
        atomic_save({"state_dict": state_dict, "metadata": {RECORD_KEY: json.dumps(record.as_dict())}}, path)
    else:
        atomic_save({"state_dict": state_dict, RECORD_KEY: record.as_dict()}, path)


def write_hub_folder(
    state_dict: dict[str, torch.Tensor], record: WeightsRecord, config: dict[str, Any], folder: str | os.PathLike
) -> None:
    """Write the Hub layout into `folder`: model.safetensors (with the record) and timm's `config` as config.json."""
    folder = Path(folder)
    write_weights(state_dict, record, folder / WEIGHT_FILES[0])
    with atomic_write(folder / HUB_CONFIG) as f:
        f.write(json.dumps(config, indent=2).encode())
