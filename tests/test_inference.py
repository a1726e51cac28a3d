"""`sequencer predict` / `sequencer.predict`: the model's preprocessing, top-k labels, outputs, unreadable files."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import sequencer
from sequencer import inference
from sequencer.checkpoint import CheckpointError
from sequencer.data import ImageFolderDataset
from sequencer.deploy import load_onnx
from sequencer.errors import UsageError


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three random images of different sizes and formats (one nested), a garbage .jpg and a non-image file."""
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(root / "nested" / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(root / "c.jpeg")  # greyscale
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 8)
    (root / "notes.txt").write_text("not an image")
    return root


def expected_top(model: torch.nn.Module, path: Path, k: int) -> list[int]:
    """Top-k classes computed by hand with the public preprocessing, one image at a time."""
    transform = sequencer.create_transform(model)
    with Image.open(path) as image:
        x = transform(image.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model(x).topk(k).indices[0].tolist()


def test_folder_with_a_corrupt_file_reports_it_and_classifies_the_rest(
    tiny_model, checkpoint: Path, image_folder: Path
) -> None:
    # batch_size 2 puts the corrupt file in a batch with a good one, so results must map back to the right files.
    predictions = sequencer.predict(image_folder, "sequencer2d_tiny", checkpoint, topk=3, batch_size=2)
    by_name = {Path(p.path).name: p for p in predictions}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.jpeg", "corrupt.jpg"]  # notes.txt is not an image
    assert "corrupt.jpg" in by_name["corrupt.jpg"].path and by_name["corrupt.jpg"].error
    assert by_name["corrupt.jpg"].top == []
    model = tiny_model()
    names = inference.imagenet_class_names()
    for name in ("a.png", "b.jpg", "c.jpeg"):
        prediction = by_name[name]
        assert prediction.error is None
        assert [s.index for s in prediction.top] == expected_top(model, Path(prediction.path), 3)
        assert [s.label for s in prediction.top] == [names[s.index] for s in prediction.top]
        probabilities = [s.probability for s in prediction.top]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_a_folder_gives_predict_every_image_that_training_reads(tmp_path: Path) -> None:
    suffixes = (".png", ".jpg", ".bmp", ".webp", ".tiff", ".ppm")
    (tmp_path / "cls").mkdir()
    for i, suffix in enumerate(suffixes):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "cls" / f"{i}{suffix}")
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    found = [path.name for path in inference.find_images(tmp_path)]
    assert found == [f"{i}{suffix}" for i, suffix in enumerate(suffixes)]
    assert found == [Path(path).name for path, _ in ImageFolderDataset(tmp_path).samples]


def test_imagenet_class_names_are_the_standard_short_names() -> None:
    from torchvision.models import ResNet50_Weights

    names = inference.imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[1], names[999]) == ("tench", "goldfish", "toilet tissue")
    assert names[134] == "crane (n02012849)" and names[517] == "crane (n03126707)"
    # torchvision's hand-edited list agrees everywhere but where it renamed the two repeated lemmas.
    torchvision_names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    differ = [i for i, (ours, theirs) in enumerate(zip(names, torchvision_names, strict=True)) if ours != theirs]
    assert set(differ) <= {134, 517, 638, 639}


def test_cli_writes_csv_json_and_table(
    run_cli, checkpoint: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [str(image_folder), "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint), "-j", "0"]
    assert run_cli("predict", *[*common, "--topk", "2", "-o", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "path",
        "error",
        "index_1",
        "label_1",
        "probability_1",
        "index_2",
        "label_2",
        "probability_2",
    ]
    bad = [r for r in rows if r["path"].endswith("corrupt.jpg")]
    assert len(rows) == 4 and len(bad) == 1 and bad[0]["error"] and bad[0]["label_1"] == ""
    names = inference.imagenet_class_names()
    assert all(r["label_1"] == names[int(r["index_1"])] for r in rows if not r["error"])

    assert run_cli("predict", *[*common, "--topk", "4", "-o", str(tmp_path / "out.json")]) == 0
    records = json.loads((tmp_path / "out.json").read_text())
    assert {len(r["top"]) for r in records if r["error"] is None} == {4}
    assert [r["path"] for r in records if r["error"]] == [str(image_folder / "corrupt.jpg")]

    capsys.readouterr()
    assert run_cli("predict", *[*common, "--topk", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 classified, 1 unreadable" in out and f"unreadable: {image_folder / 'corrupt.jpg'}" in out


def test_cli_refuses_in_one_line_when_nothing_can_be_read_or_a_path_is_missing(
    assert_refused, checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    model = f"--model sequencer2d_tiny --checkpoint {checkpoint} -j 0"
    (tmp_path / "bad.json").write_text('{"0": "cat",')
    for inputs, message in [
        (f"{image_folder / 'a.png'} --class-map {tmp_path / 'bad.json'}", f"class map {tmp_path / 'bad.json'} is not"),
        (image_folder / "corrupt.jpg", f"no image could be read: {image_folder / 'corrupt.jpg'}: "),
        (f"{image_folder / 'a.png'} {tmp_path / 'nope.jpg'}", f"{tmp_path / 'nope.jpg'}: no such file or folder"),
    ]:
        command = f"{inputs} {model} -o {tmp_path / 'out.json'}"
        assert_refused("predict", command, match=re.escape(message), absent=[tmp_path / "out.json"])


def test_class_map_and_num_classes(tiny_model, tmp_path: Path, image_folder: Path) -> None:
    weights = tmp_path / "ten.pth"
    sequencer.save_weights(tiny_model(num_classes=10), weights)
    image = image_folder / "a.png"
    # The head size comes from the checkpoint; without a class map the labels are the indices. (The torch runtime:
    # class maps apply after either engine, and an export of these weights would cost the suite seconds.)
    [plain] = sequencer.predict(image, "sequencer2d_tiny", weights, topk=10, runtime="torch")
    assert sorted(s.label for s in plain.top) == sorted(str(i) for i in range(10))

    names = [f"class {chr(ord('a') + i)}" for i in range(10)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    [mapped] = sequencer.predict(
        image, "sequencer2d_tiny", weights, topk=3, class_map=tmp_path / "names.txt", runtime="torch"
    )
    assert [s.label for s in mapped.top] == [names[s.index] for s in plain.top[:3]]

    (tmp_path / "names.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    [from_json] = sequencer.predict(
        image, "sequencer2d_tiny", weights, topk=3, class_map=tmp_path / "names.json", runtime="torch"
    )
    assert [s.label for s in from_json.top] == [s.label for s in mapped.top]

    # name -> index, the names numbers themselves (numbered class folders): read by the values, not the keys.
    shifted = {str(i): (i + 1) % 10 for i in range(10)}  # class "9" at index 0, class "0" at index 1 ...
    (tmp_path / "shifted.json").write_text(json.dumps(shifted))
    [numbered] = sequencer.predict(
        image, "sequencer2d_tiny", weights, topk=3, class_map=tmp_path / "shifted.json", runtime="torch"
    )
    assert [s.label for s in numbered.top] == [str((s.index - 1) % 10) for s in plain.top[:3]]

    (tmp_path / "short.txt").write_text("\n".join(names[:9]))
    with pytest.raises(ValueError, match="has 9 names but the model has 10 classes"):
        sequencer.predict(image, "sequencer2d_tiny", weights, class_map=tmp_path / "short.txt", runtime="torch")
    with pytest.raises(CheckpointError, match="10-class head but 1000 classes"):
        sequencer.predict(image, "sequencer2d_tiny", weights, num_classes=1000)


def test_bad_input_gives_clear_errors(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(ValueError, match="no images found"):
        sequencer.predict(tmp_path, "sequencer2d_tiny")
    with pytest.raises(ValueError, match="topk must be at least 1"):
        sequencer.predict(image_folder, "sequencer2d_tiny", topk=0)
    with pytest.warns(UserWarning, match="no checkpoint given"):
        [prediction] = sequencer.predict(image_folder / "a.png", "sequencer2d_tiny", topk=1)
    assert prediction.error is None


def test_create_transform_resizes_by_crop_pct_and_centre_crops() -> None:
    model = sequencer.create_model("sequencer2d_s")  # 224 px, crop_pct 0.875, bicubic
    transform = sequencer.create_transform(model, train=False)
    resize = next(t for t in transform.transforms if isinstance(t, transforms.Resize))
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    x = transform(Image.new("RGB", (400, 300), (124, 116, 104)))  # ImageNet's mean colour normalises to ~0
    assert x.shape == (3, 224, 224) and x.abs().max() < 0.02


def test_predict_labels_classes_by_the_names_the_checkpoint_records(
    tiny_model, tmp_path: Path, image_folder: Path
) -> None:
    model = tiny_model(num_classes=3)
    names = ["cat", "dog", "otter"]
    torch.save({"state_dict": model.state_dict(), "epoch": 0, "class_names": names}, tmp_path / "run.pth.tar")
    [trained] = sequencer.predict(image_folder / "a.png", "sequencer2d_tiny", tmp_path / "run.pth.tar", topk=3)
    assert sorted(s.label for s in trained.top) == names and all(s.label == names[s.index] for s in trained.top)
    # save_weights keeps them (safetensors metadata), so a clean weights file labels the same way.
    labelled = sequencer.create_model("sequencer2d_tiny", num_classes=3, pretrained=tmp_path / "run.pth.tar")
    assert labelled.pretrained_cfg["label_names"] == names
    sequencer.save_weights(labelled, tmp_path / "w.safetensors")
    [clean] = sequencer.predict(image_folder / "a.png", "sequencer2d_tiny", tmp_path / "w.safetensors", topk=3)
    assert [s.label for s in clean.top] == [s.label for s in trained.top]


@pytest.fixture(scope="module")
def onnx_file(onnx_export: tuple[Path, str]) -> Path:
    """The `checkpoint` fixture's weights exported to ONNX (dynamic batch) by `sequencer export`, once a session."""
    return onnx_export[0]


def test_an_export_of_an_alias_is_its_variant_under_either_name(onnx_file: Path) -> None:
    exported = load_onnx(onnx_file)
    aliased = replace(exported, config={**exported.config, "model_name": "sequencer2d_s_vertical"})
    for name in ("sequencer2d_s_vertical", "sequencer2d_vertical"):
        assert inference.onnx_classifier(aliased, name, None, None, {}).config["model_name"] == "sequencer2d_s_vertical"
    with pytest.raises(UsageError, match=r"holds sequencer2d_s_vertical, not --model sequencer2d_s$"):
        inference.onnx_classifier(aliased, "sequencer2d_s", None, None, {})


def test_an_exported_onnx_file_predicts_the_checkpoints_top_k_in_every_output_format(
    run_cli, checkpoint: Path, onnx_file: Path, image_folder: Path, tmp_path: Path
) -> None:
    # batch_size 2 puts the corrupt file beside a good one, as in the PyTorch test above.
    from_torch = sequencer.predict(image_folder, "sequencer2d_tiny", checkpoint, topk=5, batch_size=2, runtime="torch")
    from_onnx = sequencer.predict(image_folder, checkpoint=onnx_file, topk=5, batch_size=2, threads=1)
    assert [p.path for p in from_onnx] == [p.path for p in from_torch]
    assert [p.error is None for p in from_onnx] == [p.error is None for p in from_torch] == [True, True, False, True]
    for ours, theirs in zip(from_onnx, from_torch, strict=True):
        assert [(s.index, s.label) for s in ours.top] == [(s.index, s.label) for s in theirs.top]
        assert [s.probability for s in ours.top] == pytest.approx([s.probability for s in theirs.top], abs=1e-5)

    common = [str(image_folder), "-j", "0", "--threads", "1", "--topk", "3"]
    torch_run = ["--runtime torch --model sequencer2d_tiny --checkpoint", checkpoint]
    for suffix in (".csv", ".json"):
        assert run_cli("predict", *common, "--checkpoint", onnx_file, "-o", tmp_path / f"onnx{suffix}") == 0
        assert run_cli("predict", *common, *torch_run, "-o", tmp_path / f"pt{suffix}") == 0
    with open(tmp_path / "onnx.csv", newline="") as f, open(tmp_path / "pt.csv", newline="") as g:
        onnx_rows, torch_rows = list(csv.DictReader(f)), list(csv.DictReader(g))
    ranks = ("index_1", "label_1", "index_2", "index_3")
    assert [[r[k] for k in ("path", *ranks)] for r in onnx_rows] == [
        [r[k] for k in ("path", *ranks)] for r in torch_rows
    ]
    onnx_json, torch_json = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("onnx", "pt"))
    assert [[s["index"] for s in r["top"]] for r in onnx_json] == [[s["index"] for s in r["top"]] for r in torch_json]


def test_runtime_onnxruntime_runs_a_checkpoint_through_an_optimised_session(
    checkpoint: Path, onnx_file: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    from sequencer import deploy

    exported = deploy.load_onnx(onnx_file, threads=1)
    options = exported.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # predict's cache already holds the checkpoint's export (`sequencer export`'s file, the same call with the same
    # options): onnxruntime runs it, nothing is exported again. (The auto test below exports into the cache.)
    monkeypatch.setenv("SEQUENCER_CACHE", str(tmp_path / "cache"))
    cached = inference.cached_export_path(sequencer.load_model("sequencer2d_tiny", checkpoint), {})
    cached.parent.mkdir(parents=True)
    shutil.copyfile(onnx_file, cached)
    monkeypatch.setattr(inference, "export", lambda *args, **kwargs: pytest.fail("exported again"))
    from_torch = sequencer.predict(image_folder / "a.png", "sequencer2d_tiny", checkpoint, topk=4, runtime="torch")
    converted = sequencer.predict(
        image_folder / "a.png", "sequencer2d_tiny", checkpoint, topk=4, runtime="onnxruntime", threads=1
    )
    assert [s.index for s in converted[0].top] == [s.index for s in from_torch[0].top]


def test_onnx_files_that_cannot_be_used_are_refused_in_one_line(
    run_cli, assert_refused, onnx_file: Path, image_folder: Path, tmp_path: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    # A valid ONNX model that `sequencer export` did not write: no stored preprocessing.
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 32, 32])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]), foreign)
    truncated = tmp_path / "truncated.onnx"
    data = onnx_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out" / "preds.csv"
    for flags, message in [
        (f"--checkpoint {foreign}", f"{foreign} is not a Sequencer export: it has no 'sequencer_config' metadata"),
        (f"--checkpoint {truncated}", f"{truncated} is not an ONNX file onnxruntime can load"),
        (f"--checkpoint {tmp_path / 'none.onnx'}", "checkpoint not found"),
        (f"--checkpoint {onnx_file} --model sequencer2d_s", f"{onnx_file} holds sequencer2d_tiny, not --model"),
        (f"--checkpoint {onnx_file} --img-size 48", "was exported for 3x32x32 inputs, not 3x48x48"),
        (f"--checkpoint {onnx_file} --num-classes 10", "has 1000 classes, not --num-classes 10"),
        (f"--checkpoint {onnx_file} --amp", "--amp is for the torch runtime"),
        (f"--checkpoint {onnx_file} --use-ema", "--use-ema picks weights inside a training checkpoint"),
        (f"--checkpoint {onnx_file} --runtime torch", "onnxruntime runs it, not the torch runtime"),
        (f"--model {onnx_file}", f"pass the exported file as --checkpoint {onnx_file}"),
    ]:
        assert_refused("predict", image_folder, flags, "-j 0 -o", out, match=re.escape(message), absent=[out.parent])
    # A timm-style tag names the same variant as the file's.
    assert run_cli("predict", image_folder, f"--checkpoint {onnx_file} --model sequencer2d_tiny.in1k -j 0 -o", out) == 0


def test_without_onnxruntime_checkpoints_still_predict_and_onnx_files_name_the_extra(
    run_cli, assert_refused, checkpoint: Path, onnx_file: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees for a package that is not installed
    assert run_cli("predict", image_folder / "a.png", "--model sequencer2d_tiny --checkpoint", checkpoint, "-j 0") == 0
    match = r'error: running an \.onnx file needs onnxruntime.*pip install "sequencer\[export\]"'
    assert_refused("predict", image_folder / "a.png", "--checkpoint", onnx_file, "-j 0", match=match)


def test_auto_runs_a_checkpoint_in_onnxruntime_through_one_cached_export(
    run_cli, tiny_model, checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQUENCER_CACHE", str(tmp_path / "cache"))
    exports: list[Path] = []
    real_export = inference.export

    def counted_export(model: torch.nn.Module, path: Path, **options: object) -> object:
        exports.append(path)
        return real_export(model, path, **options)

    monkeypatch.setattr(inference, "export", counted_export)
    onnx_runs: list[Path] = []
    real_classifier = inference.onnx_classifier
    monkeypatch.setattr(
        inference,
        "onnx_classifier",
        lambda exported, *rest: onnx_runs.append(exported.path) or real_classifier(exported, *rest),
    )
    image = image_folder / "a.png"
    from_torch = sequencer.predict(image, "sequencer2d_tiny", checkpoint, topk=5, runtime="torch")
    # Two images, nothing cached: an export would cost more than it saves, so auto runs torch.
    pays_off = inference.EXPORT_PAYS_OFF_AT
    monkeypatch.setattr(inference, "EXPORT_PAYS_OFF_AT", 3)
    short = sequencer.predict([image, image_folder / "c.jpeg"], "sequencer2d_tiny", checkpoint, topk=5, threads=1)
    assert exports == [] and onnx_runs == []
    assert [s.index for s in short[0].top] == [s.index for s in from_torch[0].top]
    # Three images repay it: exported once; later runs of any length read the cache.
    three = [image, image_folder / "c.jpeg", image_folder / "nested" / "b.jpg"]
    [first, *_] = sequencer.predict(three, "sequencer2d_tiny", checkpoint, topk=5, threads=1)
    assert len(exports) == 1 and len(onnx_runs) == 1
    monkeypatch.setattr(inference, "EXPORT_PAYS_OFF_AT", pays_off)
    [again] = sequencer.predict(image, "sequencer2d_tiny", checkpoint, topk=5, threads=1)
    assert run_cli("predict", image, "--model sequencer2d_tiny --checkpoint", checkpoint, "-j 0 --threads 1") == 0
    assert len(exports) == 1 and len(onnx_runs) == 3  # the command (unset flags) reads the function's file
    [cached] = (tmp_path / "cache" / "onnx").iterdir()
    assert cached.name.startswith("sequencer2d_tiny-") and cached.suffix == ".onnx"
    assert inference.load_onnx(cached).config["input_size"] == [3, 32, 32]
    for ours in (first, again):
        assert [s.index for s in ours.top] == [s.index for s in from_torch[0].top]
        assert [s.probability for s in ours.top] == pytest.approx([s.probability for s in from_torch[0].top], abs=1e-5)

    # A cached file damaged later (say a full disk elsewhere) is exported again, not a failure on every run.
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(inference, "export", lambda model, path, **options: exports.append(path.write_bytes(good)))
    [repaired] = sequencer.predict(image, "sequencer2d_tiny", checkpoint, topk=5, threads=1)
    assert len(exports) == 2 and cached.read_bytes() == good
    assert [s.index for s in repaired.top] == [s.index for s in from_torch[0].top]

    # Other weights are another export; the cache keeps only the most recently used files.
    monkeypatch.setattr(inference, "export", counted_export)
    monkeypatch.setattr(inference, "EXPORT_CACHE_FILES", 1)
    other = tmp_path / "other.pth"
    sequencer.save_weights(tiny_model(num_classes=7), other)
    [seven] = sequencer.predict(image, "sequencer2d_tiny", other, topk=7, threads=1, runtime="onnxruntime")
    assert len(exports) == 3 and sorted(s.index for s in seven.top) == list(range(7))
    assert [path.name for path in (tmp_path / "cache" / "onnx").iterdir()] != [cached.name]
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 1


def test_auto_keeps_torch_where_onnxruntime_would_not_run_the_same_model(
    tiny_model, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    choose = inference.choose_runtime
    assert choose("auto", checkpoint, "sequencer2d_tiny", "cpu") == "onnxruntime"
    assert choose("auto", checkpoint.with_suffix(".onnx"), None, "cpu") == "onnxruntime"
    assert choose("auto", None, "sequencer2d_tiny", "cpu") == "torch"  # random weights: nothing worth caching
    assert choose("auto", checkpoint, "sequencer2d_tiny", "cpu", amp=True) == "torch"
    assert choose("auto", None, tiny_model(), "cpu") == "torch"
    assert choose("torch", checkpoint, "sequencer2d_tiny", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        choose("tensorrt", checkpoint)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # one of the exporter's packages missing
    assert choose("auto", checkpoint, "sequencer2d_tiny", "cpu") == "torch"


def test_auto_falls_back_to_torch_when_the_export_fails_and_says_so(
    run_cli, checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from sequencer.deploy import ExportCheckError

    monkeypatch.setenv("SEQUENCER_CACHE", str(tmp_path / "cache"))

    def failing_export(model: torch.nn.Module, path: Path, **options: object) -> None:
        Path(path).write_bytes(b"half a file")
        raise ExportCheckError("max |logit diff| 1.0 (tolerance 1e-04): failed")

    monkeypatch.setattr(inference, "export", failing_export)
    monkeypatch.setattr(inference, "EXPORT_PAYS_OFF_AT", 1)  # one image is worth an export here
    image = image_folder / "a.png"
    from_torch = sequencer.predict(image, "sequencer2d_tiny", checkpoint, topk=3, runtime="torch")
    assert run_cli("predict", image, "--model sequencer2d_tiny --checkpoint", checkpoint, "-j 0 --topk 3") == 0
    captured = capsys.readouterr()
    assert "exporting sequencer2d_tiny to ONNX once" in captured.err
    assert "onnxruntime not used (ExportCheckError: max |logit diff| 1.0" in captured.err
    assert [line.split()[-1] for line in captured.out.splitlines()[1:4]] == [f"[{s.index}]" for s in from_torch[0].top]
    assert list((tmp_path / "cache" / "onnx").iterdir()) == []  # no half-written file is left to be read later
    with pytest.raises(ExportCheckError):
        sequencer.predict(image, "sequencer2d_tiny", checkpoint, runtime="onnxruntime")
    # A cache that cannot be written (a read-only home, a file in its place) is one more reason to run torch.
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("SEQUENCER_CACHE", str(tmp_path / "a file"))
    [fallback] = sequencer.predict(image, "sequencer2d_tiny", checkpoint, topk=3, progress=True)
    assert [s.index for s in fallback.top] == [s.index for s in from_torch[0].top]
    assert "onnxruntime not used (CheckpointError: cannot write predict's ONNX export" in capsys.readouterr().err


def test_a_training_checkpoint_brings_the_input_it_was_trained_at(
    tiny_model, image_folder: Path, tmp_path: Path
) -> None:
    model = tiny_model(num_classes=10)
    trained = {"img_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": None, "model": "x"}
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "args": trained}, tmp_path / "run.pth.tar")
    sequencer.save_weights(model, tmp_path / "plain.pth")
    loaded = sequencer.load_model("sequencer2d_tiny", tmp_path / "run.pth.tar")
    cfg = loaded.pretrained_cfg
    assert cfg["input_size"] == (3, 16, 16) and cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.25,) * 3
    assert cfg["crop_pct"] == sequencer.create_model("sequencer2d_tiny").pretrained_cfg["crop_pct"]  # not given

    def top(checkpoint: Path, **overrides: object) -> list[tuple[int, float]]:
        [prediction] = sequencer.predict(
            image_folder / "a.png", "sequencer2d_tiny", checkpoint, topk=10, runtime="torch", **overrides
        )
        return [(s.index, round(s.probability, 5)) for s in prediction.top]

    as_trained = top(tmp_path / "plain.pth", img_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert top(tmp_path / "run.pth.tar") == as_trained != top(tmp_path / "plain.pth")
    assert top(tmp_path / "run.pth.tar", img_size=32, mean=None) != as_trained  # flags still win
    # Weights saved from that model keep what it expects, in either format.
    for name in ("clean.safetensors", "clean.pth"):
        sequencer.save_weights(loaded, tmp_path / name)
        assert sequencer.load_model("sequencer2d_tiny", tmp_path / name).pretrained_cfg == cfg
        assert top(tmp_path / name) == as_trained


def test_without_model_the_checkpoints_recorded_model_is_built(
    run_cli, assert_refused, tiny_model, checkpoint: Path, image_folder: Path, tmp_path: Path, capsys
) -> None:
    image = image_folder / "a.png"
    [named] = sequencer.predict(image, "sequencer2d_tiny", checkpoint, topk=3, runtime="torch")
    [recorded] = sequencer.predict(image, checkpoint=checkpoint, topk=3, runtime="torch")  # save_weights records it
    assert recorded.top == named.top
    capsys.readouterr()
    assert run_cli("predict", image, "--checkpoint", checkpoint, "-j 0 --runtime torch --topk 3") == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:4]] == [
        f"[{s.index}]" for s in named.top
    ]
    # A file that records no model, or one that is not ours, still means the default model, and says what it holds.
    model = tiny_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pth")
    match = "does not fit sequencer2d_s"
    assert_refused("predict", image, "--checkpoint", tmp_path / "plain.pth", "-j 0", match=match)
    torch.save({"state_dict": model.state_dict(), "arch": "resnet50"}, tmp_path / "foreign.pth")
    match = "holds resnet50 weights; this model is sequencer2d_s"
    assert_refused("predict", image, "--checkpoint", tmp_path / "foreign.pth", "-j 0", match=match)


def test_an_output_file_is_written_whole(
    run_cli, checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "top.csv"
    out.write_text("earlier results\n")
    # Text that fails to encode part-way: a write straight onto the file would leave it truncated.
    monkeypatch.setattr(inference, "render", lambda predictions, output_format: "path,error\n\ud800")
    argv = ["predict", image_folder / "a.png", "--model", "sequencer2d_tiny", "--checkpoint", checkpoint]
    with pytest.raises(UnicodeEncodeError):
        run_cli(*argv, "--runtime", "torch", "-j", "0", "-o", out)
    assert out.read_text() == "earlier results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["top.csv"]


def test_runtime_onnxruntime_without_the_onnx_packages_names_the_extra(
    assert_refused, checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.metadata import PackageNotFoundError

    monkeypatch.setenv("SEQUENCER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import` sees for a package that is not installed
    real_version = inference.version

    def version(name: str) -> str:
        if name == "onnx":
            raise PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(inference, "version", version)
    match = r"error: --runtime onnxruntime needs onnx, onnxscript, onnxruntime; onnx not installed.*sequencer\[export\]"
    argv = ["predict", image_folder / "a.png", "--model", "sequencer2d_tiny", "--checkpoint", checkpoint]
    assert_refused(*argv, "--runtime", "onnxruntime", "-j", "0", match=match, absent=[tmp_path / "cache"])


def test_runtime_onnxruntime_needs_a_checkpoint(
    assert_refused, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Random weights would be exported into predict's cache at every call, pushing real exports out.
    monkeypatch.setenv("SEQUENCER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inference, "export", lambda *args, **kwargs: pytest.fail("exported random weights"))
    match = re.escape("--runtime onnxruntime needs a checkpoint")
    argv = ["predict", image_folder / "a.png", "--model", "sequencer2d_tiny", "--runtime", "onnxruntime", "-j", "0"]
    assert_refused(*argv, match=match, absent=[tmp_path / "cache"])
    with pytest.raises(UsageError, match=match):
        sequencer.predict(image_folder / "a.png", "sequencer2d_tiny", runtime="onnxruntime")


def test_a_bfloat16_module_predicts_float32_probabilities(tiny_model, image_folder: Path) -> None:
    model = tiny_model(num_classes=3)
    expected = sequencer.predict(image_folder / "a.png", model=model, topk=1, runtime="torch", img_size=16)
    [prediction] = sequencer.predict(
        image_folder / "a.png", model=model.to(torch.bfloat16), topk=3, runtime="torch", img_size=16
    )
    assert all(isinstance(score.probability, float) for score in prediction.top)
    assert abs(sum(score.probability for score in prediction.top) - 1) < 1e-5  # softmax taken in float32
    assert prediction.top[0].index == expected[0].top[0].index


def test_an_export_that_fails_its_check_leaves_nothing_in_the_cache(
    checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sequencer import deploy

    monkeypatch.setenv("SEQUENCER_CACHE", str(tmp_path / "cache"))
    reload = deploy.load_exported
    monkeypatch.setattr(deploy, "load_exported", lambda path, fmt: lambda x: reload(path, fmt)(x) + 0.01)
    with pytest.raises(deploy.ExportCheckError):
        sequencer.predict(image_folder / "a.png", "sequencer2d_tiny", checkpoint, runtime="onnxruntime")
    assert list((tmp_path / "cache" / "onnx").iterdir()) == []
