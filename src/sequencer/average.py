"""Checkpoint averaging (`average_checkpoints`, ranked by the metric each epoch recorded) and weights-only export,
to a file or a folder in the Hugging Face Hub layout and on to the Hub: the work of `sequencer average`."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sequencer import hub
from sequencer.builder import hub_config
from sequencer.checkpoint import (
    HUB_CONFIG,
    WEIGHT_FILES,
    WeightsRecord,
    extract_state_dict,
    from_authors_format,
    has_ema_weights,
    read_file,
    read_record,
    write_hub_folder,
    write_weights,
)
from sequencer.errors import CheckpointError, UsageError

# The names `sequencer train --checkpoint-hist` (and timm's train.py) give the kept epoch checkpoints.
EPOCH_CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pth\.tar")
OUTPUT_SUFFIXES = (".safetensors", ".pth", ".pt", ".pth.tar")


@dataclass
class Ranked:
    """A checkpoint file with the metric it recorded (None when it recorded none)."""

    path: Path
    epoch: int
    metric: float | None
    metric_name: str
    lower_is_better: bool


def find_checkpoints(inputs: list[str | Path]) -> list[Path]:
    """The files named, and each folder's checkpoint-EPOCH.pth.tar in epoch order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                (p for p in item.iterdir() if EPOCH_CHECKPOINT.fullmatch(p.name)),
                key=lambda p: int(EPOCH_CHECKPOINT.fullmatch(p.name).group(1)),
            )
            if not found:
                raise CheckpointError(
                    f"no checkpoint-EPOCH.pth.tar in {item}: train with --checkpoint-hist N to keep them, or pass a "
                    f"file (e.g. {item / 'last.pth.tar'}) to export its weights"
                )
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise CheckpointError(f"checkpoint not found: {item}")
    return files


def recorded_metric(obj: dict[str, Any], path: Path, use_ema: bool = True) -> Ranked:
    """The metric a training checkpoint recorded for its epoch: ours (its history row: the EMA's with `use_ema` when
    the run evaluated one) or timm's (`metric`)."""
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    name = str(args.get("eval_metric") or "top1")
    epoch = int(obj.get("epoch", -1))
    metric = obj.get("metric")
    if metric is None:
        row = next((row for row in obj.get("history", []) if row.get("epoch") == epoch), {})
        metric = row.get(f"ema_eval_{name}") if use_ema else None
        metric = row.get(f"eval_{name}") if metric is None else metric
    return Ranked(path, epoch, None if metric is None else float(metric), name, lower_is_better="loss" in name)


def rank_checkpoints(files: list[Path], num: int, use_ema: bool = True) -> list[Ranked]:
    """The `num` best files by their recorded metric (the EMA's with `use_ema`), best first (ties: the earlier
    epoch)."""
    ranked = [recorded_metric(read_file(path), path, use_ema) for path in files]
    unranked = [r.path.name for r in ranked if r.metric is None]
    if unranked:
        raise CheckpointError(
            f"cannot pick the {num} best: {', '.join(unranked[:3])} record no metric; name the files to average instead"
        )
    if len({(r.metric_name, r.lower_is_better) for r in ranked}) > 1:
        raise CheckpointError("the checkpoints were ranked by different --eval-metric values; name the files instead")
    sign = 1 if ranked[0].lower_is_better else -1
    return sorted(ranked, key=lambda r: (sign * r.metric, r.epoch))[:num]


def average_checkpoints(files: list[Path], use_ema: bool = True) -> tuple[dict[str, torch.Tensor], WeightsRecord]:
    """The elementwise mean of the files' weights (their EMA weights when `use_ema` and all hold them), and the
    record of the mean: the files' own (model, classes, trained input), which must agree, and what was averaged."""
    total: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    record = None
    kinds = set()
    for path in files:
        obj = read_file(path)
        ema = use_ema and has_ema_weights(obj)
        state_dict = from_authors_format(extract_state_dict(obj, use_ema=ema))
        own = replace(read_record(obj, state_dict, ema=ema), averaged_from=())
        # What was taken, not what was asked: a file of EMA weights alone gives them with --no-use-ema too.
        kinds.add("EMA" if own.ema else "raw")
        if not reference:
            reference, record = state_dict, own
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state_dict.items()}
            continue
        _check_same_layout(reference, state_dict, files[0], path)
        # Files written before records held model_args hold none: unknown, not "none" (the layout check above holds).
        record = replace(record, model_args=record.model_args or own.model_args)
        own = replace(own, model_args=own.model_args or record.model_args)
        if replace(own, ema=record.ema) != record:  # EMA or not: refused below, with its own message
            raise CheckpointError(
                f"{path} and {files[0]} record {_difference(own, record)}: average checkpoints of one run"
            )
        for key, value in state_dict.items():
            if value.is_floating_point():
                total[key] += value.double()
    if len(kinds) > 1:
        raise CheckpointError(
            "only some of the weights taken are EMA weights (--no-use-ema takes the raw ones of training checkpoints; "
            "a file of EMA weights alone has no others): average weights of one kind"
        )
    # Integer buffers (counters) are not averaged: the first (best) checkpoint's are kept.
    mean = {k: (v / len(files)).to(reference[k].dtype) if v.is_floating_point() else v for k, v in total.items()}
    return mean, replace(record, averaged_from=tuple(str(path) for path in files) if len(files) > 1 else ())


def _difference(one: WeightsRecord, other: WeightsRecord) -> str:
    """The first field in which two records differ, with both values."""
    theirs = other.as_dict()
    for key, value in one.as_dict().items():
        if value != theirs[key]:
            return f"different {key} ({value} vs {theirs[key]})"
    return "different records"


def _check_same_layout(
    reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor], reference_path: Path, path: Path
) -> None:
    """Refuse to average weights of different models: other keys or shapes."""
    if reference.keys() != other.keys():
        different = sorted(reference.keys() ^ other.keys())
        raise CheckpointError(
            f"{path} and {reference_path} hold different weights ({len(different)} keys in one only, e.g. "
            f"{different[0]}): average checkpoints of one model"
        )
    for key, value in reference.items():
        if other[key].shape != value.shape:
            raise CheckpointError(
                f"{key} is {tuple(other[key].shape)} in {path} but {tuple(value.shape)} in {reference_path}: "
                "average checkpoints of one model"
            )


def run(args: argparse.Namespace) -> int:
    """`sequencer average`: rank, average, write (a file, a Hub folder), upload; prints what went in."""
    output = Path(args.output) if args.output else None
    folder = Path(args.hf_folder) if args.hf_folder else None
    if not output and not folder:
        raise UsageError("name what to write: -o FILE, --hf-folder DIR or both")
    if output and not output.name.endswith(OUTPUT_SUFFIXES):
        raise UsageError(f"-o {output}: name a .safetensors or .pth file")
    if args.push_to_hub and not folder:
        raise UsageError("--push-to-hub uploads the --hf-folder: name one (--hf-folder DIR)")
    if args.hub_private and not args.push_to_hub:
        raise UsageError("--hub-private applies to the repository --push-to-hub makes: name one")
    if args.push_to_hub:
        hub.check_repo_id(args.push_to_hub)
    files = find_checkpoints(args.inputs)
    written = [output] if output else []
    if folder:
        written += [folder / WEIGHT_FILES[0], folder / HUB_CONFIG]
    if clash := next((path for path in written if any(path.resolve() == file.resolve() for file in files)), None):
        raise UsageError(f"{clash} is one of the inputs; write the average elsewhere")
    num = len(files) if args.num is None else args.num
    if num > len(files):
        raise UsageError(f"-n {num}, but only {len(files)} checkpoint(s) found: {', '.join(p.name for p in files)}")
    chosen = [r.path for r in rank_checkpoints(files, num, args.use_ema)] if num < len(files) else files
    state_dict, record = average_checkpoints(chosen, use_ema=args.use_ema)
    # Checked before anything is written: a variant timm cannot build is refused with no file left behind.
    stem = state_dict.get("stem.proj.weight")
    config = hub_config(record, in_chans=3 if stem is None else stem.shape[1]) if folder else None
    kind = "EMA weights" if record.ema else "weights"
    what = f"{kind} of" if len(chosen) == 1 else f"mean of the {kind} of {len(chosen)} checkpoints:"
    what += f" {', '.join(map(str, chosen))}"
    if output:
        write_weights(state_dict, record, output)
        print(f"wrote {output}: {what}")
    if folder:
        write_hub_folder(state_dict, record, config, folder)
        print(f"wrote {folder} (Hub layout: {HUB_CONFIG}, {WEIGHT_FILES[0]}): {what}")
    if args.push_to_hub:
        url = hub.upload(folder, args.push_to_hub, files=[HUB_CONFIG, WEIGHT_FILES[0]], private=args.hub_private)
        print(f"uploaded {HUB_CONFIG} and {WEIGHT_FILES[0]} of {folder} to {url}")
    return 0
