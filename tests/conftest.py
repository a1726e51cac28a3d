"""Shared test fixtures: a small model whose logits differ between images, and its saved weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sequencer


def tiny_with_head(num_classes: int = 1000) -> torch.nn.Module:
    """sequencer2d_tiny with a random head: the zero-initialised one makes every logit 0 and comparisons vacuous."""
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny", num_classes=num_classes)
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_with_head()`'s weights in a .safetensors file."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    sequencer.save_weights(tiny_with_head(), path)
    return path
