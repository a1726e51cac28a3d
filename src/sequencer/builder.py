"""Models by name: `create_model` (timm's factory), `load_model` (a checkpoint, ready for inference).

The one place a model name is resolved (aliases, timm-style "name.tag"), a variant's config looked up, the
preprocessing config attached, weights loaded (a file, the Hugging Face Hub, the released files) and the mixers'
kernel chosen (`sequencer.model.route`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import warnings
from typing import Any

import torch
from torch import nn

from sequencer.checkpoint import Checkpoint, load_checkpoint, load_pretrained, open_checkpoint
from sequencer.choices import DEFAULT_MODEL
from sequencer.errors import CheckpointError, UsageError
from sequencer.hub import released_weights
from sequencer.model import (
    ALIASES,
    VARIANTS,
    Sequencer,
    SequencerConfig,
    SequencerFeatures,
    default_cfg,
    list_models,
    route,
)

# Every name of a registered variant (the variants' own and the aliases) to the variant it means.
VARIANT_OF = {**{name: name for name in VARIANTS}, **ALIASES}


def is_registered(name: str) -> bool:
    """Whether `name` (an alias or a timm-style "name.tag" too) is one of our variants rather than a timm model."""
    return name.split(".")[0] in VARIANT_OF


def resolve_model_name(name: str) -> str:
    """The registered variant that `name` (an alias or a timm-style "name.tag" too) means; UsageError if none."""
    base = name.split(".")[0]
    if base not in VARIANT_OF:
        close = difflib.get_close_matches(base, list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(list_models())}"
        raise UsageError(f"unknown model {name!r}{hint}")
    return VARIANT_OF[base]


def model_config(name: str) -> SequencerConfig:
    """The architecture of the registered variant `name`."""
    return VARIANTS[resolve_model_name(name)]


def create_model(
    name: str,
    pretrained: str | os.PathLike | bool | None = None,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    unsafe_load: bool = False,
    rnn_impl: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered variant, optionally with weights (a file, an hf-hub:ORG/REPO, or True for the released).

    `overrides` replace fields of the variant's `SequencerConfig` (`img_size=392`, `drop_rate=0.1`); any other
    keyword is a TypeError, as in timm's factory. The parameters are made on `device` (the "meta" device too) and
    then cast to `dtype`. The mixers run on `rnn_impl` (see `sequencer.model.route`). A pickled checkpoint that
    needs more than tensors and plain containers is refused unless `unsafe_load`.
    """
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(SequencerConfig)})
    if unknown:
        raise TypeError(f"create_model() got an unexpected keyword argument {unknown[0]!r}")
    variant = resolve_model_name(name)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build(name, variant, num_classes, in_chans, rnn_impl, drop_path_rate=drop_path_rate, **overrides)
    if dtype is not None:
        model.to(dtype=dtype)
    if pretrained:
        url = model.pretrained_cfg["url"]
        weights = released_weights(model.model_name, url) if pretrained is True else pretrained
        load_pretrained(model, weights, unsafe_load=unsafe_load)
    if features_only:
        return SequencerFeatures(model, tuple(out_indices))
    return model


def build(name: str, variant: str, num_classes: int, in_chans: int, rnn_impl: str, **overrides: Any) -> Sequencer:
    """The registered `variant` as `name` asked for it, on `rnn_impl`, with its preprocessing config attached."""
    config = dataclasses.replace(VARIANTS[variant], num_classes=num_classes, in_chans=in_chans, **overrides)
    model = Sequencer(config)
    route(model, rnn_impl=rnn_impl)
    base = name.split(".")[0]  # timm-style tags such as "sequencer2d_s.in1k" name the same network
    cfg = default_cfg(base, config)
    cfg.update(num_classes=num_classes, input_size=(in_chans, config.img_size, config.img_size))
    model.pretrained_cfg = model.default_cfg = cfg
    model.model_name = base
    return model


def recorded_or_default(name: str | None, checkpoint: Checkpoint | None) -> str:
    """`name`, else the variant the checkpoint records when it is one of ours, else sequencer2d_s."""
    if name:
        return name
    recorded = checkpoint.record.model_name if checkpoint else None
    return recorded if recorded and is_registered(recorded) else DEFAULT_MODEL


def load_model(
    name: str | None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    use_ema: bool = False,
    unsafe_load: bool = False,
) -> nn.Module:
    """A variant in eval mode with a checkpoint's weights, for inference: `num_classes` defaults to the file's head,
    whose size must then match (loading would otherwise re-initialise it), and its record (class names, trained
    input) is kept. `name` None: the variant the checkpoint records (`recorded_or_default`)."""
    if name:
        resolve_model_name(name)  # an unknown name is the error, before any warning or reading a file
    if checkpoint and not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint, use_ema=use_ema, unsafe_load=unsafe_load)
    name = recorded_or_default(name, checkpoint)
    variant = resolve_model_name(name)
    if not checkpoint:
        warnings.warn(
            f"no checkpoint given: {name} has random initial weights (and a zero classifier), so its outputs are "
            "meaningless; pass a weights file (--checkpoint PATH)",
            UserWarning,
            stacklevel=2,
        )
        return build(name, variant, num_classes or 1000, in_chans, "auto").eval()
    file_classes = checkpoint.record.num_classes
    if num_classes is None:
        num_classes = file_classes or 1000
    elif file_classes is not None and file_classes != num_classes:
        raise CheckpointError(
            f"{checkpoint.path} has a {file_classes}-class head but {num_classes} classes were asked for"
        )
    model = build(name, variant, num_classes, in_chans, "auto")
    load_checkpoint(model, checkpoint)
    return model.eval()
