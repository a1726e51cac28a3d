"""Sequencer: Deep LSTM for Image Classification, the reference implementation."""

from sequencer.checkpoint import CheckpointError, load_pretrained, save_weights
from sequencer.data import create_transform
from sequencer.deploy import export
from sequencer.inference import predict
from sequencer.model import Sequencer, SequencerFeatures, count_parameters, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Sequencer", "SequencerFeatures", "count_parameters", "create_model", "create_transform",
    "export", "list_models", "load_pretrained", "predict", "save_weights",
]
