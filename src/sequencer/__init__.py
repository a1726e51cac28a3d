"""Sequencer: Deep LSTM for Image Classification, the reference implementation."""

from sequencer.checkpoint import CheckpointError, load_pretrained, save_weights
from sequencer.model import Sequencer, SequencerFeatures, count_parameters, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Sequencer", "SequencerFeatures", "count_parameters", "create_model", "list_models",
    "load_pretrained", "save_weights",
]
