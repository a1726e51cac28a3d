"""Datasets, transforms and loaders: class-folder trees, CIFAR, and a built-in digits set that needs no download."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.data import create_transform as timm_create_transform
from timm.data import resolve_data_config
from torch import nn

_CONFIG_KEYS = ("input_size", "img_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def data_config(model: nn.Module | dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The model's preprocessing (input size, crop_pct, interpolation, mean, std), with `overrides` applied."""
    cfg = model if isinstance(model, dict) else getattr(model, "pretrained_cfg", {})
    args = {k: v for k, v in overrides.items() if v not in (None, "")}
    return resolve_data_config(args=args, pretrained_cfg=dict(cfg))


def create_transform(model: nn.Module | dict[str, Any], train: bool = False, **overrides: Any) -> Callable:
    """The transform a model expects: resize by crop_pct, centre crop, normalise (or timm's training pipeline)."""
    cfg = data_config(model, **{k: overrides.pop(k) for k in list(overrides) if k in _CONFIG_KEYS})
    return timm_create_transform(**cfg, is_training=train, **overrides)

