"""A model trained on one-channel images (`--in-chans 1 --input-img-mode L`): every reader builds it with the
channels its weights record and reads images in L, with no channel flag; a flag that contradicts the file is refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import sequencer
from sequencer.builder import hub_config
from sequencer.checkpoint import record_of, write_hub_folder
from sequencer.data import DigitsDataset
from sequencer.errors import CheckpointError

TINY = "--model sequencer2d_tiny -j 0 --threads 1 --no-progress"


@pytest.fixture(scope="module")
def gray_run(run_cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the digits demo on L images, as README.md documents it."""
    output = tmp_path_factory.mktemp("gray") / "run"
    assert run_cli(f"train --in-chans 1 --input-img-mode L --epochs 1 {TINY} -o {output}") == 0
    return output


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four held-out digits as PNG files: two saved in L, two in RGB (predict converts them to what the model takes)."""
    folder = tmp_path_factory.mktemp("digits")
    images = DigitsDataset("validation", img_size=16, input_img_mode="L").images[:4]
    paths = [folder / f"{i}.png" for i in range(4)]
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        (image if i % 2 else image.convert("RGB")).save(path)
    return paths


def test_validate_scores_a_grayscale_run_as_the_run_did(
    run_cli, gray_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with open(gray_run / "summary.csv") as f:
        [row] = list(csv.DictReader(f))
    results = tmp_path / "r.json"
    assert run_cli(f"validate --checkpoint {gray_run / 'model_best.pth.tar'} -j 0 --results-file {results}") == 0
    scored = json.loads(results.read_text())
    assert scored["input_size"] == [1, 16, 16] and scored["count"] == 360
    assert scored["top1"] == pytest.approx(float(row["eval_top1"]), abs=1e-3)
    assert scored["loss"] == pytest.approx(float(row["eval_loss"]), abs=1e-3)


def test_predict_reads_images_in_l_for_a_one_channel_model(gray_run: Path, digit_images: list[Path]) -> None:
    best = gray_run / "model_best.pth.tar"
    model = sequencer.load_model(None, best)
    assert model.in_chans == 1 and model.pretrained_cfg["input_size"] == (1, 16, 16)
    transform = sequencer.create_transform(model)
    predictions = sequencer.predict(digit_images, checkpoint=best, runtime="torch")
    for path, prediction in zip(digit_images, predictions, strict=True):
        with torch.no_grad(), Image.open(path) as image:
            expected = model(transform(image.convert("L")).unsqueeze(0)).argmax().item()
        assert prediction.error is None and prediction.top[0].index == expected
        assert prediction.top[0].label == str(expected)  # the digits' class names, as the run recorded them


def test_an_onnx_export_of_a_grayscale_run_predicts_as_torch(
    run_cli, gray_run: Path, digit_images: list[Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    best = gray_run / "model_best.pth.tar"
    assert run_cli(f"export --checkpoint {best} -o {tmp_path / 'gray.onnx'}") == 0
    exported = sequencer.predict(digit_images, checkpoint=tmp_path / "gray.onnx")
    torch_run = sequencer.predict(digit_images, checkpoint=best, runtime="torch")
    assert [p.top[0].index for p in exported] == [p.top[0].index for p in torch_run]


def test_readers_build_the_channels_a_file_records(tmp_path: Path) -> None:
    model = sequencer.create_model("sequencer2d_tiny", in_chans=1, num_classes=3)
    model.pretrained_cfg["input_size"] = (1, 16, 16)
    record = record_of(model)
    assert record.input_size == (1, 16, 16)
    sequencer.save_weights(model, tmp_path / "gray.safetensors")
    write_hub_folder(model.state_dict(), record, hub_config(record, in_chans=1), tmp_path / "hub")
    loaded = sequencer.load_model(None, tmp_path / "gray.safetensors")
    from_folder = sequencer.create_model(f"local-dir:{tmp_path / 'hub'}")
    for built in (loaded, from_folder):
        assert built.in_chans == 1 and torch.equal(built.stem.proj.weight, model.stem.proj.weight)
    assert sequencer.load_model(None, tmp_path / "gray.safetensors", in_chans=1).in_chans == 1  # the same, given
    with pytest.raises(CheckpointError, match="1 input channel"):
        sequencer.load_model(None, tmp_path / "gray.safetensors", in_chans=3)
    with pytest.raises(CheckpointError, match="1 input channel"):
        sequencer.create_model(f"local-dir:{tmp_path / 'hub'}", in_chans=3)


def test_flags_that_contradict_a_grayscale_file_are_refused_in_one_line(
    assert_refused, gray_run: Path, digit_images: list[Path]
) -> None:
    best = gray_run / "model_best.pth.tar"
    assert_refused("validate", f"--checkpoint {best} -j 0 --in-chans 3", match="1 input channel")
    match = r"images are read as RGB, 3 channel\(s\) \(--input-img-mode\)"
    assert_refused("validate", f"--checkpoint {best} -j 0 --input-img-mode RGB", match=match)
    flags = f"--checkpoint {best} -j 0 --runtime torch --input-img-mode RGB"
    assert_refused("predict", digit_images[0], flags, match=match)
