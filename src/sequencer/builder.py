"""Models by name: `create_model` (timm's factory), `load_model` (a checkpoint, ready for inference).

The one place a model name is resolved (aliases, timm-style "name.tag", local-dir:DIR), a variant's config looked up
(also as timm's config.json, `hub_config`), the preprocessing config attached, weights loaded (a file, a folder in
the Hub layout, the Hugging Face Hub, a URL, the released files: the remote ones fetched here, through
`sequencer.hub`, so that `sequencer.checkpoint` reads local files only) and the mixers' kernel chosen
(`sequencer.model.route`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sequencer.checkpoint import LOCAL_DIR_PREFIX, Checkpoint, WeightsRecord, load_checkpoint, open_checkpoint
from sequencer.choices import DEFAULT_MODEL
from sequencer.errors import CheckpointError, UsageError
from sequencer.hub import fetch, released_weights
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

_logger = logging.getLogger(__name__)

# Every name of a registered variant (the variants' own and the aliases) to the variant it means.
VARIANT_OF = {**{name: name for name in VARIANTS}, **ALIASES}
# timm's port (timm.models.sequencer) registers these; any other variant it can build is sequencer2d_s with model_args.
TIMM_NAMES = ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l")
# Our architecture fields that timm's Sequencer2d takes as constructor arguments of the same name.
TIMM_ARGS = ("layers", "patch_sizes", "embed_dims", "hidden_sizes", "bidirectional", "union", "with_fc")


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
    num_classes: int | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] = (0, 1, 2, 3),
    unsafe_load: bool = False,
    rnn_impl: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered variant, optionally with weights (a file, an hf-hub:ORG/REPO, or True for the released);
    `name` local-dir:DIR builds the variant a folder in the Hub layout holds, with its weights and record.

    `num_classes` defaults to 1000, or to the folder's head (another count re-initialises the head, as in timm);
    `in_chans` to 3, or to the channels the folder's weights take (another count is refused).
    `overrides` replace fields of the variant's `SequencerConfig` (`img_size=392`, `drop_rate=0.1`); any other
    keyword is a TypeError, as in timm's factory. The parameters are made on `device` (the "meta" device too) and
    then cast to `dtype`. The mixers run on `rnn_impl` (see `sequencer.model.route`). A pickled checkpoint that
    needs more than tensors and plain containers is refused unless `unsafe_load`.
    """
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(SequencerConfig)})
    if unknown:
        raise TypeError(f"create_model() got an unexpected keyword argument {unknown[0]!r}")
    folder = None
    if name.startswith(LOCAL_DIR_PREFIX):
        if pretrained:
            raise UsageError(f"{name} names its weights; drop pretrained={pretrained!r}")
        name, folder = resolve_source(None, name, unsafe_load=unsafe_load)
        num_classes = folder.record.num_classes if num_classes is None else num_classes
        in_chans = input_channels(in_chans, folder)
        overrides = {**recorded_model_args(name, folder), **overrides}
    num_classes = 1000 if num_classes is None else num_classes
    in_chans = 3 if in_chans is None else in_chans
    variant = resolve_model_name(name)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build(name, variant, num_classes, in_chans, rnn_impl, drop_path_rate=drop_path_rate, **overrides)
    if dtype is not None:
        model.to(dtype=dtype)
    if folder:
        load_checkpoint(model, folder)
    elif pretrained:
        weights = released_weights(model.model_name, model.pretrained_cfg["url"]) if pretrained is True else pretrained
        load_pretrained(model, weights, unsafe_load=unsafe_load)
    return SequencerFeatures(model, out_indices) if features_only else model


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


def open_source(source: str | os.PathLike, use_ema: bool = False, unsafe_load: bool = False) -> Checkpoint:
    """`open_checkpoint` of a file or a folder in the Hub layout, or of hf-hub:ORG/REPO or http(s) weights fetched
    first (`sequencer.hub.fetch`); the opened checkpoint keeps the source's name for the errors about its weights."""
    opened = open_checkpoint(fetch(os.fspath(source)), use_ema=use_ema, unsafe_load=unsafe_load)
    return dataclasses.replace(opened, path=os.fspath(source))


def load_pretrained(
    model: nn.Module, source: str | os.PathLike, use_ema: bool = False, unsafe_load: bool = False
) -> None:
    """Load a checkpoint (see `open_source`; authors', timm's or ours, possibly wrapped) into `model`, strictly."""
    load_checkpoint(model, open_source(source, use_ema=use_ema, unsafe_load=unsafe_load))
    _logger.info("loaded weights from %s", source)


def resolve_source(
    name: str | None,
    checkpoint: str | os.PathLike | Checkpoint | None,
    use_ema: bool = False,
    unsafe_load: bool = False,
) -> tuple[str, Checkpoint | None]:
    """The model a command loads, decided once: `name` (an unknown one refused before any file is read), else the
    variant the checkpoint records when it is one of ours, else sequencer2d_s; with the checkpoint opened (fetched
    first if remote), once, for the caller to pass on."""
    if name:
        resolve_model_name(name)
    if checkpoint and not isinstance(checkpoint, Checkpoint):
        checkpoint = open_source(checkpoint, use_ema=use_ema, unsafe_load=unsafe_load)
    checkpoint = checkpoint or None
    recorded = checkpoint.record.model_name if checkpoint else None
    return name or (recorded if recorded and is_registered(recorded) else DEFAULT_MODEL), checkpoint


def recorded_channels(checkpoint: Checkpoint) -> int | None:
    """The input channels a checkpoint's weights take: as its stem's weight shows, else as its record says."""
    stem = checkpoint.state_dict.get("stem.proj.weight")
    if stem is not None and stem.dim() == 4:
        return int(stem.shape[1])
    return int(checkpoint.record.input_size[0]) if checkpoint.record.input_size else None


def input_channels(in_chans: int | None, checkpoint: Checkpoint | None) -> int:
    """The input channels to build a model with: `in_chans`, else those the checkpoint's weights take, else 3; a
    `CheckpointError` when `in_chans` contradicts the checkpoint (its stem would not load)."""
    recorded = recorded_channels(checkpoint) if checkpoint else None
    if in_chans is not None and recorded is not None and in_chans != recorded:
        raise CheckpointError(
            f"{checkpoint.path} takes {recorded} input channel(s) but {in_chans} were asked for (--in-chans)"
        )
    return in_chans if in_chans is not None else recorded or 3


def load_model(
    name: str | None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    use_ema: bool = False,
    unsafe_load: bool = False,
) -> nn.Module:
    """A variant in eval mode with a checkpoint's weights (a source `open_source` takes, or one it opened), for
    inference: `num_classes` defaults to the file's head, whose size must then match (loading would otherwise
    re-initialise it), `in_chans` to the channels its weights take (`input_channels`), and its record (class names,
    trained input) is kept. `name` None: the variant the checkpoint records (`resolve_source`)."""
    name, checkpoint = resolve_source(name, checkpoint, use_ema, unsafe_load)
    variant = resolve_model_name(name)
    if not checkpoint:
        warnings.warn(
            f"no checkpoint given: {name} has random initial weights (and a zero classifier), so its outputs are "
            "meaningless; pass a weights file (--checkpoint PATH)",
            UserWarning,
            stacklevel=2,
        )
        return build(name, variant, num_classes or 1000, 3 if in_chans is None else in_chans, "auto").eval()
    file_classes = checkpoint.record.num_classes
    if num_classes is None:
        num_classes = file_classes or 1000
    elif file_classes is not None and file_classes != num_classes:
        raise CheckpointError(
            f"{checkpoint.path} has a {file_classes}-class head but {num_classes} classes were asked for"
        )
    in_chans = input_channels(in_chans, checkpoint)
    model = build(name, variant, num_classes, in_chans, "auto", **recorded_model_args(name, checkpoint))
    load_checkpoint(model, checkpoint)
    return model.eval()


def recorded_model_args(name: str, checkpoint: Checkpoint) -> dict[str, Any]:
    """The architecture changes the checkpoint records, when it records the variant `name` means (else none)."""
    return dict(checkpoint.record.model_args) if same_variant(checkpoint.record.model_name, name) else {}


def same_variant(recorded: str | None, name: str) -> bool:
    """Whether a file's recorded model name is one of our variants and the one `name` (an alias or tag too) means."""
    return bool(recorded) and is_registered(recorded) and resolve_model_name(recorded) == resolve_model_name(name)


def hub_config(record: WeightsRecord, in_chans: int = 3) -> dict[str, Any]:
    """timm's config.json (as its `save_for_hf` writes it) for weights of the recorded variant: the timm name that
    builds it, with model_args where timm registers no such variant, and the record's classes and input."""
    name = record.model_name
    if not name or not is_registered(name):
        recorded = f"model {name!r}" if name else "no model"
        raise CheckpointError(f"the weights record {recorded}, not a Sequencer variant timm could build")
    variant = resolve_model_name(name)
    config = dataclasses.replace(VARIANTS[variant], **record.model_args)
    if config.mixer != "2d" or config.cell != "lstm" or config.pos_embed:
        raise UsageError(
            f"timm's Sequencer port builds LSTM 2D mixers without a position table only: {name} would not load in timm"
        )
    base = variant.removesuffix("_392") if variant.removesuffix("_392") in TIMM_NAMES else TIMM_NAMES[0]
    reference = VARIANTS[base]
    model_args: dict[str, Any] = {
        key: getattr(config, key) for key in TIMM_ARGS if getattr(config, key) != getattr(reference, key)
    }
    if config.mlp_ratio != reference.mlp_ratio:
        model_args["mlp_ratios"] = [config.mlp_ratio] * len(config.layers)
    if in_chans != 3:
        model_args["in_chans"] = in_chans
    num_classes = record.num_classes or 0
    # Not the release url (not these weights), nor a pool_size, which holds at one input size only (timm's is None).
    cfg = {key: value for key, value in default_cfg(variant, config).items() if key not in ("architecture", "url")}
    cfg.update(input_size=(in_chans, config.img_size, config.img_size), pool_size=None, num_classes=num_classes)
    cfg.update(record.input_config())
    out = {
        "architecture": base,
        "num_classes": num_classes,
        "num_features": config.embed_dims[-1],
        "global_pool": "avg",
    }
    if model_args:
        out["model_args"] = model_args
    if record.class_names and len(record.class_names) == num_classes:
        out["label_names"] = list(record.class_names)
    return {**out, "pretrained_cfg": cfg}
