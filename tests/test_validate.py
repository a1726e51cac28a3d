"""`evaluate` against hand-computed metrics, and the `sequencer validate` command line of the paper's README."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sequencer import validate
from sequencer.checkpoint import save_weights
from sequencer.model import create_model
from test_data import make_image_tree

# SEQUENCER.md, verbatim except the script name and the dataset path.
README_COMMAND = "/path/to/imagenet --model sequencer2d_s -b 16 --input-size 3 224 224 --amp"


class FixedLogits(nn.Module):
    """A 'model' whose logits are the input itself, so metrics can be worked out by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def parse(command: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    validate.add_arguments(parser)
    return parser.parse_args(shlex.split(command))


def test_evaluate_matches_hand_computed_metrics() -> None:
    logits = torch.tensor(
        [
            [5.0, 4, 3, 2, 1, 0, -1],  # label 0: top-1 hit
            [5.0, 4, 3, 2, 1, 0, -1],  # label 4: top-5 hit only
            [5.0, 4, 3, 2, 1, 0, -1],  # label 6: miss
            [0.0, 9, 0, 0, 0, 0, 0],  # label 1: top-1 hit
            [0.0, 1, 5, 2, 3, 4, 9],  # label 2: top-5 hit only (second)
        ]
    )
    labels = torch.tensor([0, 4, 6, 1, 2])
    loader = DataLoader(TensorDataset(logits, labels), batch_size=2)  # uneven last batch
    metrics = validate.evaluate(FixedLogits(), loader, torch.device("cpu"))
    assert metrics["count"] == 5
    assert metrics["top1"] == pytest.approx(40.0) and metrics["top5"] == pytest.approx(80.0)
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert metrics["images_per_sec"] > 0


def test_top5_with_fewer_than_five_classes_is_top_k_over_all_classes() -> None:
    logits, labels = torch.tensor([[3.0, 2, 1], [3.0, 2, 1]]), torch.tensor([0, 2])
    metrics = validate.evaluate(FixedLogits(), DataLoader(TensorDataset(logits, labels)), torch.device("cpu"))
    assert metrics["top1"] == pytest.approx(50.0) and metrics["top5"] == pytest.approx(100.0)


def test_readme_command_parses_verbatim() -> None:
    args = parse(README_COMMAND)
    assert args.data == "/path/to/imagenet" and args.model == "sequencer2d_s" and args.batch_size == 16
    assert args.input_size == [3, 224, 224] and args.amp


def test_validate_command_prints_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_image_tree(tmp_path / "data", classes=3, per_class=3)
    model = create_model("sequencer2d_tiny", num_classes=3)
    save_weights(model, tmp_path / "tiny.pth")
    results = tmp_path / "results.json"
    args = parse(
        f"{root} --model sequencer2d_tiny --checkpoint {tmp_path / 'tiny.pth'} -b 4 "
        f"--input-size 3 32 32 --amp -j 0 --results-file {results}"
    )
    assert validate.run(args) == 0
    written = json.loads(results.read_text())
    assert written["count"] == 9 and written["input_size"] == [3, 32, 32] and written["amp"]
    # The head is zero-initialised: every logit ties, so top-1 is whatever the tie-break gives, top-5 covers all.
    assert written["top5"] == 100.0 and written["loss"] == pytest.approx(torch.log(torch.tensor(3.0)).item(), 1e-3)
    assert "top-1" in capsys.readouterr().out


def test_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert validate.run(parse(f"{tmp_path / 'missing'} --model sequencer2d_tiny")) == 2
    assert f"error: dataset folder not found: {tmp_path / 'missing'}" in capsys.readouterr().err


def test_training_checkpoint_supplies_the_input_size(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "data", classes=2, per_class=2)
    model = create_model("sequencer2d_tiny", num_classes=2)
    torch.save(
        {"state_dict": model.state_dict(), "epoch": 3, "args": {"img_size": 24, "crop_pct": None}},
        tmp_path / "last.pth.tar",
    )
    results = tmp_path / "results.json"
    base = f"{root} --model sequencer2d_tiny --checkpoint {tmp_path / 'last.pth.tar'} -j 0 --results-file {results}"
    assert validate.run(parse(base)) == 0
    assert json.loads(results.read_text())["input_size"] == [3, 24, 24]
    assert validate.run(parse(f"{base} --img-size 20")) == 0  # an explicit flag still wins
    assert json.loads(results.read_text())["input_size"] == [3, 20, 20]
