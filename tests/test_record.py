"""A weights file says what it is: every writer stores one record (model, classes, trained input, EMA or average)
and every reader takes it, so a file scores and reads images the same after each hop between commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sequencer
from sequencer.analysis.common import build_compared_model, model_of, training_size
from sequencer.builder import create_model, load_model
from sequencer.checkpoint import read_file, record_of
from sequencer.deploy import load_onnx
from sequencer.validate import validate

CLASSES = ("cat", "dog", "emu")
SIZE = 16  # not sequencer2d_tiny's default 32: a reader that forgets the trained input reads at 32
RUN = f"--model sequencer2d_tiny --img-size {SIZE} -b 4 -j 0 --threads 1 --no-progress --opt adamw --lr 3e-3"
WRITERS = ("train", "average", "save_weights.safetensors", "save_weights.pth", "export.onnx")


@pytest.fixture(scope="module")
def data(make_image_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("data"), classes=list(CLASSES), per_class=8)


@pytest.fixture(scope="module")
def files(run_cli, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same weights as each writer writes them: a run's model_best, `average -n 1` of the run, `save_weights`
    of the loaded best, and its ONNX export."""
    folder = tmp_path_factory.mktemp("files")
    run = folder / "run"
    assert run_cli(f"train {data} {RUN} --epochs 3 --cooldown-epochs 0 --checkpoint-hist 3 --output {run}") == 0
    out = {"train": run / "model_best.pth.tar", "average": folder / "average.safetensors"}
    assert run_cli(f"average {run} -n 1 -o {out['average']}") == 0
    best = load_model(None, out["train"])
    for name in ("save_weights.safetensors", "save_weights.pth"):
        out[name] = folder / name.replace("save_weights", "weights")
        sequencer.save_weights(best, out[name])
    out["export.onnx"] = folder / "model.onnx"
    sequencer.export(None, out["export.onnx"], checkpoint=out["save_weights.safetensors"])
    return out


def expected_record(model: torch.nn.Module) -> tuple:
    record = record_of(model)
    return record.model_name, record.num_classes, record.class_names, record.input_size


@pytest.fixture(scope="module")
def reference(files: dict[str, Path], data: Path) -> dict:
    best = load_model(None, files["train"])
    scores = validate(data=data, checkpoint=files["train"], workers=0)
    return {"record": expected_record(best), "top1": scores["top1"], "loss": scores["loss"]}


def test_the_reference_run_records_its_input_and_classes(reference: dict) -> None:
    assert reference["record"] == ("sequencer2d_tiny", 3, CLASSES, (3, SIZE, SIZE))
    assert reference["top1"] > 34  # learned something: a silently misread file would score at chance or below


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS[:-1])
def test_every_reader_takes_the_record_of_a_weights_file(
    writer: str, run_cli, files, reference, data: Path, tmp_path: Path
) -> None:
    path = files[writer]
    # Python: the builder's two doors.
    assert expected_record(load_model(None, path)) == reference["record"]
    assert expected_record(create_model("sequencer2d_tiny", num_classes=3, pretrained=path)) == reference["record"]
    # validate: the same score, read at the trained 16 px with the classes mapped by name.
    scores = validate(data=data, checkpoint=path, workers=0)
    assert (scores["top1"], scores["input_size"]) == (reference["top1"], [3, SIZE, SIZE])
    assert scores["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    # predict: the recorded class names, and the same classes as the reference file.
    images = sorted((data / "val").rglob("*.png"))[::4]
    got = sequencer.predict(images, checkpoint=path, runtime="torch", topk=1)
    want = sequencer.predict(images, checkpoint=files["train"], runtime="torch", topk=1)
    assert [p.top[0].label for p in got] == [p.top[0].label for p in want]
    assert {p.top[0].label for p in got} <= set(CLASSES)
    # average (one file: its weights alone) and export keep the record.
    assert run_cli(f"average {path} -o {tmp_path / 'again.pth'}") == 0
    assert expected_record(load_model(None, tmp_path / "again.pth")) == reference["record"]
    exported = sequencer.export(None, tmp_path / "again.onnx", checkpoint=path)
    record = load_onnx(exported.path).record
    assert (record.model_name, record.num_classes, record.class_names, record.input_size) == reference["record"]
    # The analyses (erf, resolution, robustness, variants) build through one function, from the file alone.
    name = model_of(None, path)
    model = build_compared_model(name, path)
    assert name == "sequencer2d_tiny" and expected_record(model) == reference["record"]
    assert training_size(model) == SIZE  # what resolution stars as "trained at"


def test_an_exported_file_carries_the_record_and_predicts_the_same(files, reference, data: Path) -> None:
    record = load_onnx(files["export.onnx"]).record
    assert (record.model_name, record.num_classes, record.class_names, record.input_size) == reference["record"]
    images = sorted((data / "val").rglob("*.png"))
    got = sequencer.predict(images, checkpoint=files["export.onnx"], topk=1)
    want = sequencer.predict(images, checkpoint=files["train"], runtime="torch", topk=1)
    assert [p.top[0].label for p in got] == [p.top[0].label for p in want]


@pytest.mark.parametrize("command", ["validate {data}", "export -o {tmp}/x.onnx", "average {file} -o {tmp}/x.pth"])
def test_an_export_given_where_weights_are_needed_says_what_it_is(
    command: str, files, data: Path, tmp_path: Path, assert_refused
) -> None:
    onnx = files["export.onnx"]
    words = command.format(data=data, tmp=tmp_path, file=onnx)
    flags = "" if words.startswith("average") else f" --checkpoint {onnx}"
    assert_refused(words + flags, match="an ONNX export: `sequencer predict --checkpoint", absent=[tmp_path / "x.pth"])


def test_average_of_a_run_then_validate_scores_as_the_run(run_cli, files, reference, data: Path, tmp_path) -> None:
    # The path: average of the run's kept epochs, then validate of the file alone (no --img-size).
    average = tmp_path / "avg.safetensors"
    assert run_cli(f"average {files['train'].parent} -o {average}") == 0
    scores = validate(data=data, checkpoint=average, workers=0)
    assert scores["input_size"] == [3, SIZE, SIZE]
    record = read_file(average)["sequencer_record"]
    assert '"averaged_from": [' in record and '"class_names": ["cat", "dog", "emu"]' in record
    assert scores["top1"] >= reference["top1"] - 35  # the mean of three epochs, not a misread file
