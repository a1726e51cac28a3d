"""Checkpoint averaging (`average_checkpoints`, ranked by the metric each epoch recorded) and weights-only export:
the work of `sequencer average`."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sequencer.checkpoint import atomic_save, extract_state_dict, read_file, recorded_model_name
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


def recorded_metric(obj: dict[str, Any], path: Path) -> Ranked:
    """The metric a training checkpoint recorded for its epoch: ours (its history row) or timm's (`metric`)."""
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    name = str(args.get("eval_metric") or "top1")
    epoch = int(obj.get("epoch", -1))
    metric = obj.get("metric")
    if metric is None:
        row = next((row for row in obj.get("history", []) if row.get("epoch") == epoch), {})
        metric = row.get(f"eval_{name}")
    lower_is_better = "loss" in name
    return Ranked(path, epoch, None if metric is None else float(metric), name, lower_is_better)


def rank_checkpoints(files: list[Path], num: int) -> list[Ranked]:
    """The `num` best files by their recorded metric, best first (ties: the earlier epoch)."""
    ranked = [recorded_metric(read_file(path), path) for path in files]
    unranked = [r.path.name for r in ranked if r.metric is None]
    if unranked:
        raise CheckpointError(
            f"cannot pick the {num} best: {', '.join(unranked[:3])} record no metric; name the files to average instead"
        )
    if len({(r.metric_name, r.lower_is_better) for r in ranked}) > 1:
        raise CheckpointError("the checkpoints were ranked by different --eval-metric values; name the files instead")
    sign = 1 if ranked[0].lower_is_better else -1
    return sorted(ranked, key=lambda r: (sign * r.metric, r.epoch))[:num]


def average_checkpoints(files: list[Path], use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str | None, bool]:
    """The elementwise mean of the files' weights, their model name, and whether those were EMA weights."""
    total: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    model_name = None
    kinds = set()
    for path in files:
        obj = read_file(path)
        kinds.add("EMA" if use_ema and any(key in obj for key in ("state_dict_ema", "model_ema")) else "raw")
        name = recorded_model_name(obj)
        if model_name and name and name != model_name:
            raise CheckpointError(f"{path} holds a {name}, {files[0]} a {model_name}: average checkpoints of one model")
        model_name = model_name or name
        state_dict = extract_state_dict(obj, use_ema=use_ema)
        if not reference:
            reference = state_dict
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state_dict.items()}
            continue
        _check_same_layout(reference, state_dict, files[0], path)
        for key, value in state_dict.items():
            if value.is_floating_point():
                total[key] += value.double()
    if len(kinds) > 1:
        raise CheckpointError("only some of the checkpoints hold EMA weights; --no-use-ema averages the raw ones")
    # Integer buffers (counters) are not averaged: the first (best) checkpoint's are kept.
    mean = {k: (v / len(files)).to(reference[k].dtype) if v.is_floating_point() else v for k, v in total.items()}
    return mean, model_name, kinds == {"EMA"}


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
    """`sequencer average`: rank, average, write; prints what went in."""
    output = Path(args.output)
    if not output.name.endswith(OUTPUT_SUFFIXES):
        raise UsageError(f"-o {output}: name a .safetensors or .pth file")
    files = find_checkpoints(args.inputs)
    if any(path.resolve() == output.resolve() for path in files):
        raise UsageError(f"-o {output} is one of the inputs; write the average to another file")
    num = len(files) if args.num is None else args.num
    if num > len(files):
        raise UsageError(f"-n {num}, but only {len(files)} checkpoint(s) found: {', '.join(p.name for p in files)}")
    chosen = [r.path for r in rank_checkpoints(files, num)] if num < len(files) else files
    state_dict, model_name, ema = average_checkpoints(chosen, use_ema=args.use_ema)
    metadata = {"model_name": model_name or "", "averaged_from": ", ".join(str(p) for p in chosen)}
    if "head.fc.weight" in state_dict:
        metadata["num_classes"] = str(state_dict["head.fc.weight"].shape[0])
    atomic_save({"state_dict": state_dict, "metadata": metadata, "model_name": model_name or ""}, output)
    kind = "EMA weights" if ema else "weights"
    what = f"{kind} of" if len(chosen) == 1 else f"mean of the {kind} of {len(chosen)} checkpoints:"
    print(f"wrote {output}: {what} {', '.join(str(p) for p in chosen)}")
    return 0
