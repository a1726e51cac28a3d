"""What the analysis commands share: building our models or timm's from a name, and choosing their images."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
from torch import nn
from torch.utils.data import Dataset, Subset

from sequencer.builder import create_model, is_registered, load_model, resolve_source
from sequencer.checkpoint import Checkpoint, extract_state_dict, read_file
from sequencer.config import ModelSource
from sequencer.errors import CheckpointError, UsageError
from sequencer.hub import fetch


def model_of(
    name: str | None, checkpoint: str | os.PathLike = "", use_ema: bool = False, unsafe_load: bool = False
) -> tuple[str, str | Checkpoint]:
    """--model, else the model the checkpoint records (as predict, validate and export take it), else sequencer2d_s;
    and the checkpoint, opened once when it holds one of our variants: the spec to build from."""
    checkpoint = os.fspath(checkpoint or "")
    if name and not is_registered(name):
        return name, checkpoint
    check_model_specs([(name or "sequencer2d_s", checkpoint)])  # a missing file is its own error
    name, opened = resolve_source(name, checkpoint, use_ema, unsafe_load)
    return name, opened or checkpoint


def parse_model_spec(spec: str) -> tuple[str, str]:
    """`NAME` or `NAME=CHECKPOINT` to (name, checkpoint path or "")."""
    name, _, checkpoint = spec.partition("=")
    if not name:
        raise UsageError(f"empty model name in {spec!r}; expected NAME or NAME=CHECKPOINT")
    return name, checkpoint


def check_model_specs(specs: Sequence[tuple[str, str | Checkpoint]], need_weights: bool = False) -> None:
    """Fail before any work on an unknown model name, a missing checkpoint file or (if needed) no checkpoint."""
    for name, checkpoint in specs:
        if isinstance(checkpoint, Checkpoint):  # opened, so there, and of one of our variants (`model_of`)
            continue
        if not is_registered(name) and not timm.is_model(name):
            raise UsageError(
                f"unknown model {name!r}: neither a Sequencer variant (see `sequencer summary`) "
                "nor a timm model (see timm.list_models())"
            )
        remote = checkpoint.startswith(("http://", "https://", "hf-hub:"))
        if checkpoint and not remote and not Path(checkpoint).is_file():
            raise CheckpointError(f"checkpoint of {name} not found: {checkpoint}")
        if need_weights and not checkpoint:
            raise UsageError(
                f"no weights for {name}: accuracy needs trained weights "
                "(--checkpoint PATH for --model, NAME=PATH for --compare)"
            )


def compared_models(flags: argparse.Namespace, need_weights: bool = False) -> list[tuple[str, str | Checkpoint]]:
    """--model with its checkpoint (opened once, passed on) and each --compare NAME[=CHECKPOINT], all checked first."""
    specs = [model_of(flags.model, flags.checkpoint, flags.use_ema, flags.unsafe_load)]
    specs += map(parse_model_spec, flags.compare)
    check_model_specs(specs, need_weights)
    return specs


def model_labels(specs: Sequence[tuple[str, str | Checkpoint]]) -> list[str]:
    """A distinct label per (name, checkpoint): the name, plus the checkpoint's file name where a name comes twice."""
    names = [name for name, _ in specs]
    paths = [ckpt.path if isinstance(ckpt, Checkpoint) else ckpt for _, ckpt in specs]
    labels = [
        f"{name} ({Path(path).name or 'random init'})" if names.count(name) > 1 else name
        for name, path in zip(names, paths, strict=True)
    ]
    return [
        f"{label} #{labels[:i].count(label) + 1}" if labels.count(label) > 1 else label
        for i, label in enumerate(labels)
    ]


def build_compared_model(
    name: str,
    checkpoint: str | os.PathLike | Checkpoint = "",
    num_classes: int | None = None,
    img_size: int | None = None,
    use_ema: bool = False,
    in_chans: int | None = None,
    unsafe_load: bool = False,
) -> nn.Module:
    """A model the analyses measure or compare: one of our variants or any timm model, in eval mode, with weights from
    `checkpoint` (one of ours opened already too; none: random init)."""
    # Classes: `num_classes`, else the checkpoint's classifier, else 1000. timm models with a fixed input size
    # (ViTs) are built for `img_size`; timm resamples their position embeddings when loading the file.
    if isinstance(checkpoint, Checkpoint):
        return load_model(name, checkpoint, num_classes, in_chans)
    checkpoint = os.fspath(checkpoint or "")
    if is_registered(name):
        if not checkpoint:  # random weights are a legitimate subject here (the ERF at initialisation)
            return create_model(name, num_classes=num_classes or 1000, in_chans=in_chans).eval()
        return load_model(name, checkpoint, num_classes, in_chans, use_ema, unsafe_load)
    check_model_specs([(name, checkpoint)])
    cfg = timm.models.get_pretrained_cfg(name)
    kwargs: dict[str, Any] = dict(in_chans=3 if in_chans is None else in_chans)
    if img_size and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    if checkpoint:
        checkpoint = fetch(checkpoint, with_config=False)  # timm's file overlay takes a local file
        # Read as data first: an unreadable or code-bearing file is a CheckpointError here, not a traceback in timm.
        contents = read_file(checkpoint, unsafe_load=unsafe_load)
        if num_classes is None and cfg is not None and isinstance(cfg.classifier, str):
            # The output classes of the file's classifier (cfg.classifier: its module path), when it has one.
            weight = extract_state_dict(contents, use_ema).get(f"{cfg.classifier}.weight")
            num_classes = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None
        # A file overlay goes through timm's own loading path: key filters, position-embedding resampling. The
        # overlay's class count is the file's, else timm would drop the file's classifier as one of another size.
        overlay: dict[str, Any] = dict(file=checkpoint, source="")
        if num_classes is not None:
            overlay["num_classes"] = num_classes
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(name, **kwargs).eval()


def build_flagged_model(
    name: str,
    checkpoint: str | os.PathLike | Checkpoint,
    flags: ModelSource | argparse.Namespace,
    img_size: int | None = None,
) -> nn.Module:
    """`build_compared_model` with a command's --num-classes, --use-ema, --in-chans and --unsafe-load from `flags`."""
    return build_compared_model(
        name,
        checkpoint,
        num_classes=flags.num_classes,
        img_size=img_size,
        use_ema=flags.use_ema,
        in_chans=flags.in_chans,
        unsafe_load=flags.unsafe_load,
    )


def training_size(model: nn.Module) -> int:
    """The input side a built model's weights were trained at: what its file records, else its config's default."""
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def evenly_spaced_subset(dataset: Dataset, limit: int | None) -> Dataset:
    """At most `limit` samples spread over the whole dataset (class-folder sets are sorted by class), or all of it."""
    if not limit or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise UsageError(f"--limit must be a positive number of images, got {limit}")
    return Subset(dataset, np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int)).tolist())
