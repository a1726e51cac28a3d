"""A weights file says what it is: every writer stores one record (model, classes, trained input, EMA or average)
and every reader takes it, so a file scores and reads images the same after each hop between commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sequencer
from sequencer.analysis.common import build_compared_model, model_of, training_size
from sequencer.builder import create_model, load_model
from sequencer.checkpoint import WeightsRecord, read_file, record_of
from sequencer.deploy import CONFIG_FILE, load_onnx
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
    labels = [p.top[0].label for p in sequencer.predict(some_images(data), checkpoint=files["train"], runtime="torch")]
    return {"record": expected_record(best), "top1": scores["top1"], "loss": scores["loss"], "labels": labels}


def some_images(data: Path) -> list[Path]:
    return sorted((data / "val").rglob("*.png"))[::4]


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
    got = [p.top[0].label for p in sequencer.predict(some_images(data), checkpoint=path, runtime="torch", topk=1)]
    assert got == reference["labels"] and set(got) <= set(CLASSES)
    # average (one file: its weights alone) and export keep the record.
    assert run_cli(f"average {path} -o {tmp_path / 'again.pth'}") == 0
    assert expected_record(load_model(None, tmp_path / "again.pth")) == reference["record"]
    # export (a .pt2 archive of a fixed batch of 1: the quickest export to write and check; every format and batch
    # stores the same record)
    exported = sequencer.export(None, tmp_path / "again.pt2", checkpoint=path, dynamic_batch=False, batch_size=1)
    stored = {CONFIG_FILE: ""}
    torch.export.load(exported.path, extra_files=stored)
    record = WeightsRecord.from_dict(json.loads(stored[CONFIG_FILE]))
    assert (record.model_name, record.num_classes, record.class_names, record.input_size) == reference["record"]
    # The analyses (erf, resolution, robustness, variants) build through one function, from the file alone (opened
    # once: the name and the weights come from the same Checkpoint).
    name, opened = model_of(None, path)
    model = build_compared_model(name, opened)
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


# ----------------------------------------------------------------------------------------------------------------
# No silent mismatch
# ----------------------------------------------------------------------------------------------------------------


def test_class_names_are_mapped_by_name_or_refused(files, make_image_tree, tmp_path: Path, assert_refused) -> None:
    best = files["save_weights.safetensors"]
    # Two of the three classes: folder "emu" is class 2 by name, not class 1 by position.
    subset = make_image_tree(tmp_path / "subset", classes=["dog", "emu"], per_class=4, splits=["val"])
    predicted = sequencer.predict(sorted(subset.rglob("*.png")), checkpoint=best, runtime="torch", topk=1)
    by_name = 100 * sum(p.top[0].label == Path(p.path).parent.name for p in predicted) / len(predicted)
    assert validate(data=subset, checkpoint=best, workers=0)["top1"] == pytest.approx(by_name)
    other = make_image_tree(tmp_path / "other", classes=["one", "two", "zero"], per_class=2, splits=["val"])
    assert_refused("validate", other, "--checkpoint", best, match=r"\(one, two, zero\) are not the model's \(cat, dog")


def test_use_ema_on_a_file_without_ema_weights_is_refused(files, data: Path, assert_refused) -> None:
    weights = files["save_weights.safetensors"]
    assert_refused("validate", data, "--checkpoint", weights, "--use-ema", match="holds no EMA weights")


def test_a_class_count_that_is_not_the_data_s_or_one_class_is_refused(
    make_image_tree, data: Path, tmp_path: Path, assert_refused
) -> None:
    out = tmp_path / "out"
    assert_refused("train", data, RUN, "--num-classes 5", "-o", out, match="--num-classes 5, but", absent=[out])
    one = make_image_tree(tmp_path / "one", classes=["only"], per_class=8)
    assert_refused("train", one, RUN, "-o", out, match="one class: a classifier needs at least two", absent=[out])


# ----------------------------------------------------------------------------------------------------------------
# Labels that say what was measured
# ----------------------------------------------------------------------------------------------------------------


def test_an_ema_run_reports_the_model_and_its_ema(run_cli, data: Path, tmp_path: Path, caplog) -> None:
    # One epoch with a one-epoch warm-up: the schedule is all warm-up, which the start of the log says.
    command = f"train {data} {RUN} --epochs 1 --warmup-epochs 1 --cooldown-epochs 0 --model-ema -o {tmp_path}"
    with caplog.at_level("INFO"):
        assert run_cli(command) == 0
    assert "most of them warming up to --lr" in caplog.text
    epoch_line = next(line for line in caplog.text.splitlines() if "epoch 0/0" in line)
    assert "held-out loss" in epoch_line and "EMA: loss" in epoch_line and "(best by the EMA)" in epoch_line
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["ema_eval_loss", "ema_eval_top1", "ema_eval_top5"] and "eval_top1" in header
    # An EMA kept on the CPU is not evaluated, as in timm's train.py (on a GPU its batches are elsewhere): said so.
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_cli(f"{command}/cpu-ema --model-ema-force-cpu") == 0
    assert "the EMA is kept on the CPU and not evaluated" in caplog.text and "EMA: loss" not in caplog.text
    assert "ema_eval_top1" not in (tmp_path / "cpu-ema" / "summary.csv").read_text()


def test_training_curves_count_epochs_from_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from sequencer.plotting import plot_training_curves

    plotted = {}
    monkeypatch.setattr(
        Figure, "savefig", lambda figure, *_, **__: plotted.update(x=figure.axes[0].lines[0].get_xdata())
    )
    rows = [dict(epoch=e, train_loss=1.0, eval_loss=1.0, eval_top1=50.0, eval_top5=90.0, lr=1e-3) for e in (0, 1)]
    plot_training_curves(rows, tmp_path / "curves.png")
    assert list(plotted["x"]) == [0, 1]  # as the log, summary.csv and checkpoint-EPOCH.pth.tar count them


def test_predict_says_which_runtime_ran_which_file(run_cli, files, data: Path, capfd) -> None:
    weights = files["save_weights.safetensors"]
    assert run_cli("predict", data / "val" / "cat", "--checkpoint", weights, "--runtime", "torch") == 0
    assert f"classified 8 image(s) with torch on cpu, weights from {weights}" in capfd.readouterr().err
    assert run_cli("predict", data / "val" / "cat", "--checkpoint", files["export.onnx"]) == 0
    assert f"with onnxruntime (float32 weights) on {files['export.onnx']}" in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Export means what it says
# ----------------------------------------------------------------------------------------------------------------


def test_an_opset_the_exporter_cannot_write_is_refused_before_work(files, tmp_path: Path, assert_refused) -> None:
    out = tmp_path / "m.onnx"
    for opset in ("17", "999"):
        words = ("export", "--checkpoint", files["train"], "-o", out, "--opset", opset)
        assert_refused(*words, match=f"--opset {opset}: torch's ONNX exporter writes opsets 18 to", absent=[out])


def test_a_fixed_batch_export_classifies_any_number_of_images(files, data: Path, tmp_path: Path) -> None:
    fixed = sequencer.export(None, tmp_path / "fixed.onnx", checkpoint=files["train"], dynamic_batch=False)
    assert load_onnx(fixed.path).fixed_batch == 2 and load_onnx(files["export.onnx"]).fixed_batch is None
    images = sorted((data / "val").rglob("*.png"))[:5]  # 5 images: two full batches of 2 and one padded
    for batch_size in (1, 5):
        got = sequencer.predict(images, checkpoint=fixed.path, topk=1, batch_size=batch_size)
        want = sequencer.predict(images, checkpoint=files["train"], runtime="torch", topk=1)
        assert [p.top[0].index for p in got] == [p.top[0].index for p in want]


# ----------------------------------------------------------------------------------------------------------------
# Errors that lied or crashed: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------------


def test_a_run_stopped_before_its_first_checkpoint_starts_again_with_the_same_command(
    run_cli, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from sequencer import train as train_module

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    command = f"train {data} {RUN} --epochs 1 --cooldown-epochs 0 --warmup-epochs 0 -o {tmp_path}"
    with monkeypatch.context() as patch, caplog.at_level("INFO"):
        patch.setattr(train_module, "train_one_epoch", interrupt)
        assert run_cli(command) == 130
    assert "no checkpoint was written yet: the same command starts the run again" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.yaml"]
    assert run_cli(command) == 0 and (tmp_path / "last.pth.tar").is_file()


@pytest.mark.parametrize("command", ["predict {images}", "validate {data}", "train {data} " + RUN])
@pytest.mark.parametrize("values", ["0.5 0.5", "0.1 0.2 0.3 0.4"])
def test_a_mean_or_std_that_fits_no_channel_count_is_refused(
    command: str, values: str, files, data: Path, tmp_path: Path, assert_refused
) -> None:
    words = command.format(images=data / "val", data=data)
    weights = "" if words.startswith("train") else f" --checkpoint {files['train']}"
    out = tmp_path / "out"
    flag = "--std" if values.startswith("0.1") else "--mean"
    match = f"{flag} takes 1 or 3 values \\(one per input channel\\), got {len(values.split())}"
    assert_refused(f"{words}{weights} {flag} {values} -o {out}", match=match, absent=[out])


def test_ctrl_c_in_a_command_is_one_line(run_cli, files, data: Path, capfd, monkeypatch: pytest.MonkeyPatch) -> None:
    from sequencer import inference

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "predict", interrupt)
    assert run_cli("predict", data / "val", "--checkpoint", files["train"]) == 130
    assert capfd.readouterr().err == "sequencer predict: interrupted\n"


def test_unwritable_places_are_refused_in_one_line(
    files, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, assert_refused
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("SEQUENCER_CACHE", str(not_a_folder))
    words = ("predict", data / "val" / "cat", "--checkpoint", files["train"], "--runtime", "onnxruntime")
    assert_refused(*words, match="cannot write predict's ONNX export into .*SEQUENCER_CACHE")
    # --resume writes into the resumed run's folder; /proc stands for a read-only file system (root passes permission
    # checks, not that).
    assert_refused(
        "train", data, RUN, "--resume", "/proc/self/last.pth.tar", match="/proc/self is not a writable folder"
    )


def test_an_image_side_too_large_is_refused_before_work(data: Path, tmp_path: Path, assert_refused) -> None:
    out = tmp_path / "out"
    assert_refused("train", data, RUN, "--img-size 100000 -o", out, match="--img-size: .*<= 4096", absent=[out])


def test_files_export_wrote_and_run_folders_are_named_for_what_they_are(files, tmp_path: Path, assert_refused):
    scripted = sequencer.export(None, tmp_path / "m.pt", checkpoint=files["train"]).path
    for path, what in ((scripted, "a TorchScript export: torch.jit.load"), (files["train"].parent, "is a folder")):
        assert_refused("validate", "--checkpoint", path, match=what)
