"""Sequencer: Deep LSTM for Image Classification, the reference implementation."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public API, imported on first use so that `import sequencer.cli` (and `sequencer --help`) stays light.
_EXPORTS = {
    "CheckpointError": "sequencer.errors",
    "SequencerError": "sequencer.errors",
    "Sequencer": "sequencer.model",
    "SequencerConfig": "sequencer.model",
    "SequencerFeatures": "sequencer.model",
    "count_parameters": "sequencer.model",
    "list_models": "sequencer.model",
    "create_model": "sequencer.builder",
    "load_model": "sequencer.builder",
    "route": "sequencer.model",
    "create_transform": "sequencer.data",
    "export": "sequencer.deploy",
    "load_pretrained": "sequencer.builder",
    "save_weights": "sequencer.checkpoint",
    "predict": "sequencer.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sequencer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
