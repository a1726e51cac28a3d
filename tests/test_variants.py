"""`variants()` and `sequencer variants` on generated trees under the released folder names, and the robustness
extra's absence."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from sequencer.analysis import robustness
from sequencer.analysis.variants import TEST_SETS, variants
from sequencer.builder import create_model
from sequencer.checkpoint import save_weights
from sequencer.data import imagenet_synsets

SURE = 15  # the class the test model always predicts: one of ImageNet-A's 200, not one of ImageNet-R's


def images(make_image_tree: Callable[..., Path], folder: Path, count: int = 1, names: list[str] | None = None) -> None:
    """`count` tiny JPEGs (or one per name) in `folder`, through the shared tree builder."""
    per_class = len(names) if names else count
    make_image_tree(folder.parent, [folder.name], per_class, size=12, splits=(), suffix=".JPEG", file_names=names)


@pytest.fixture(scope="module")
def sure_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1000-class sequencer2d_tiny that predicts class SURE for every image (zero head weights, one large bias)."""
    model = create_model("sequencer2d_tiny", num_classes=1000)
    with torch.no_grad():
        model.head.fc.bias[SURE] = 10.0
    path = tmp_path_factory.mktemp("weights") / "sure.safetensors"
    save_weights(model, path)
    return path


@pytest.fixture
def test_sets_root(make_image_tree, tmp_path: Path) -> Path:
    """ImageNet val (ReaL file names), -A, -V2 and two -C corruptions under their released names; no -R, -Sketch."""
    synsets = imagenet_synsets()
    root = tmp_path / "datasets"
    val_names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 5)]
    images(make_image_tree, root / "imagenet" / "val" / synsets[3], names=val_names[:2])
    images(make_image_tree, root / "imagenet" / "val" / synsets[SURE], names=val_names[2:])
    images(make_image_tree, root / "imagenet-a" / synsets[SURE], 2)
    images(make_image_tree, root / "imagenet-a" / synsets[11], 2)  # A's class 11: the model, sure of 15, misses these
    for number in ("0", str(SURE), "999"):
        images(make_image_tree, root / "imagenetv2-matched-frequency-format-val" / number, 1)
    for severity in range(1, 6):  # fog at every severity: normalisable by AlexNet's mean error
        images(make_image_tree, root / "imagenet-c" / "fog" / str(severity) / synsets[SURE], 1)
    images(
        make_image_tree, root / "imagenet-c" / "snow" / "1" / synsets[2], 1
    )  # snow at one severity only: not normalisable
    return root


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["dataset"]: row for row in csv.DictReader(f)}


def test_suite_scores_each_dataset_found_and_names_the_missing(
    run_cli,
    tmp_path: Path,
    test_sets_root: Path,
    sure_checkpoint: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = tmp_path / "real.json"
    # Val images 1-2 are of class 3 (one also lists SURE), 3 has no ReaL label, 4 is SURE: ReaL top-1 2 of 3.
    real.write_text(json.dumps([[3], [3, SURE], [], [SURE]]))
    out = tmp_path / "out"
    reads, real_read = [], safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, **kw: reads.append(path) or real_read(path, **kw))
    command = (  # no --model: the one the checkpoint records, read with its weights once
        f"variants {test_sets_root} --checkpoint {sure_checkpoint} --real-labels {real} "
        f"--input-size 3 32 32 -b 2 -j 0 --out {out}"
    )
    assert run_cli(command) == 0
    assert len(reads) == 1
    rows = read_rows(out / "variants.csv")
    assert {row["model"] for row in rows.values()} == {"sequencer2d_tiny"}
    assert float(rows["ImageNet"]["value"]) == 50.0 and rows["ImageNet"]["images"] == "4"
    assert float(rows["ImageNet-ReaL"]["value"]) == pytest.approx(200 / 3, abs=1e-2)
    assert rows["ImageNet-ReaL"]["images"] == "3" and rows["ImageNet-ReaL"]["sequencer2d_s"] == "87.37"
    assert float(rows["ImageNet-A"]["value"]) == 50.0  # the two A classes, scored among A's 200
    assert float(rows["ImageNet-V2"]["value"]) == pytest.approx(100 / 3, abs=1e-2)  # folder "15" is class 15
    assert rows["ImageNet-V2"]["folder"].endswith("imagenetv2-matched-frequency-format-val")
    # fog: never wrong, snow: always wrong, at one severity only: no AlexNet normalisation, the plain mean error.
    assert rows["ImageNet-C"]["metric"] == "mean error over 2 of 15 corruptions"
    assert float(rows["ImageNet-C"]["value"]) == pytest.approx(100 / 6, abs=1e-2)
    assert rows["ImageNet-R"]["value"] == rows["ImageNet-Sketch"]["value"] == ""
    assert rows["ImageNet-R"]["sequencer2d_m"] == "46.2"
    printed = capsys.readouterr().out
    assert "missing: ImageNet-R (looked for" in printed and "ImageNet-Sketch (looked for" in printed
    with Image.open(out / "variants.png") as figure:
        assert figure.size[0] > 600


def test_variants_in_python_scores_the_folders_named_and_returns_rows_and_the_missing(
    tmp_path: Path, test_sets_root: Path, sure_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    rows, missing = variants(
        imagenet_a=test_sets_root / "imagenet-a",
        imagenetv2=test_sets_root / "imagenetv2-matched-frequency-format-val",
        model="sequencer2d_tiny",
        checkpoint=sure_checkpoint,
        input_size=(3, 32, 32),
        batch_size=2,
        workers=0,
    )
    by_title = {row["dataset"]: row for row in rows}
    assert [row["dataset"] for row in rows] == [test_set.title for test_set in TEST_SETS]
    assert by_title["ImageNet-A"]["value"] == 50.0 and by_title["ImageNet-A"]["images"] == 4
    assert (
        by_title["ImageNet-V2"]["value"] == pytest.approx(100 / 3, abs=1e-3) and by_title["ImageNet-V2"]["images"] == 3
    )
    assert by_title["ImageNet-A"]["sequencer2d_l"] == 35.1 and by_title["ImageNet-R"]["value"] == ""
    assert [text.split(" (")[0] for text in missing] == ["ImageNet-ReaL", "ImageNet-R", "ImageNet-Sketch", "ImageNet-C"]
    assert all(text.endswith("(looked for no ROOT given)") for text in missing)
    assert not list((tmp_path / "cwd").iterdir())  # the command writes the files, not the function


def test_suite_mce_when_every_severity_is_present_and_the_flags_override_root(
    make_image_tree, run_cli, tmp_path: Path, test_sets_root: Path, sure_checkpoint: Path
) -> None:
    corrupted = test_sets_root / "imagenet-c"
    for severity in range(2, 6):
        images(make_image_tree, corrupted / "snow" / str(severity) / imagenet_synsets()[SURE], 1)
    (corrupted / "snow" / "1" / imagenet_synsets()[2] / "0.JPEG").unlink()
    (corrupted / "snow" / "1" / imagenet_synsets()[2]).rmdir()
    images(make_image_tree, corrupted / "snow" / "1" / imagenet_synsets()[SURE], 1)
    sketch = tmp_path / "elsewhere" / "sketch"
    images(make_image_tree, sketch / imagenet_synsets()[SURE], 1)
    out = tmp_path / "out"
    command = (
        f"variants --imagenet-c {corrupted} --imagenet-sketch {sketch} --model sequencer2d_tiny "
        f"--checkpoint {sure_checkpoint} --input-size 3 32 32 -j 0 --out {out}"
    )
    assert run_cli(command) == 0
    rows = read_rows(out / "variants.csv")
    assert rows["ImageNet-C"]["metric"] == "mCE over 2 of 15 corruptions" and float(rows["ImageNet-C"]["value"]) == 0
    assert float(rows["ImageNet-Sketch"]["value"]) == 100.0 and rows["ImageNet-A"]["value"] == ""


def test_suite_errors_are_one_line_before_any_work(assert_refused, tmp_path: Path, test_sets_root: Path) -> None:
    out = tmp_path / "o"
    empty = tmp_path / "empty"
    match = r"error: no dataset found: ImageNet-ReaL \(looked for"
    assert_refused("variants", empty, "--model", "sequencer2d_tiny", "--out", out, match=match, absent=[out])
    three = tmp_path / "three.safetensors"
    save_weights(create_model("sequencer2d_tiny", num_classes=3), three)
    command = f"variants {test_sets_root} --model sequencer2d_tiny --checkpoint {three} --out {out}"
    assert_refused(command, match="need a 1000-class model; sequencer2d_tiny has 3", absent=[out])
    command = f"variants {test_sets_root} --model sequencer2d_tiny --img-size 4 --out {out}"
    assert_refused(command, match=r"input 4x4 is smaller than .* \(--img-size / --input-size\)", absent=[out])


@pytest.fixture
def without_imagecorruptions(monkeypatch: pytest.MonkeyPatch):
    """`import imagecorruptions` fails as it would without the robustness extra (and the cached module is dropped)."""
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    robustness.imagecorruptions.cache_clear()
    yield
    robustness.imagecorruptions.cache_clear()


def test_robustness_without_its_extra_names_the_install_command(
    assert_refused, tmp_path: Path, test_sets_root: Path, checkpoint: Path, without_imagecorruptions
) -> None:
    out = tmp_path / "rob"
    command = f"robustness {test_sets_root / 'imagenet'} --model sequencer2d_tiny --checkpoint {checkpoint} --out {out}"
    match = r'error: the ImageNet-C corruptions need the imagecorruptions.*pip install "sequencer\[robustness\]"$'
    assert_refused(command, match=match, absent=[out])


@pytest.mark.slow
def test_two_processes_share_every_dataset_and_write_what_one_process_does(
    run_cli, torchrun, tmp_path: Path, test_sets_root: Path, sure_checkpoint: Path
) -> None:
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[3], [3, SURE], [], [SURE]]))
    flags = [str(test_sets_root), "--model", "sequencer2d_tiny", "--checkpoint", str(sure_checkpoint)]
    flags += ["--real-labels", str(real), "--input-size", "3", "32", "32", "-b", "2", "-j", "0", "--device", "cpu"]
    assert run_cli("variants", *flags, "--out", tmp_path / "one") == 0
    launch = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint"]
    command = ["-m", "sequencer", "variants", *flags, "--out", str(tmp_path / "two")]
    result = torchrun.run([*launch, torchrun.endpoint()], command, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone writes and prints
    one, two = (read_rows(tmp_path / name / "variants.csv") for name in ("one", "two"))
    # Shards of 2 and 2 (ImageNet, -A), 2 and 1 (-V2), 1 and none (each -C folder): every image counted once.
    assert [(row["images"], row["value"]) for row in one.values()][:3] == [
        ("4", "50.0"),
        ("3", "66.667"),
        ("4", "50.0"),
    ]
    assert two == one
