"""`evaluate` and `validate` against hand-computed metrics, and the `sequencer validate` command line of the paper's
README."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sequencer import validate
from sequencer.builder import create_model
from sequencer.checkpoint import save_weights
from sequencer.data import DigitsDataset, class_indices, imagenet_synsets
from sequencer.errors import DatasetError, UsageError
from sequencer.validate import load_real_labels, load_valid_classes

# The authors' README validation command, verbatim except the script name and the dataset path.
README_COMMAND = "/path/to/imagenet --model sequencer2d_s -b 16 --input-size 3 224 224 --amp"


class FixedLogits(nn.Module):
    """A 'model' whose logits are the input itself, so metrics can be worked out by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


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


def test_evaluate_shows_a_labelled_progress_bar_on_a_terminal_only(capture_stderr) -> None:
    loader = DataLoader(TensorDataset(torch.eye(3), torch.arange(3)), batch_size=1)
    for terminal, label in [(True, "sequencer2d_s on val"), (False, "val")]:
        stream = capture_stderr(terminal)
        assert validate.evaluate(FixedLogits(), loader, torch.device("cpu"), progress=label)["top1"] == 100.0
        assert ("sequencer2d_s on val" in stream.getvalue() and "/3 [" in stream.getvalue()) == terminal
    quiet = capture_stderr(terminal=True)
    validate.evaluate(FixedLogits(), loader, torch.device("cpu"))  # no label: no bar
    assert quiet.getvalue() == ""


def test_readme_command_parses_verbatim(parse_cli) -> None:
    args = parse_cli("validate", README_COMMAND)
    assert args.data == "/path/to/imagenet" and args.model == "sequencer2d_s" and args.batch_size == 16
    assert args.input_size == [3, 224, 224] and args.amp


def test_validate_command_prints_and_writes_results(
    make_image_tree, parse_cli, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = make_image_tree(tmp_path / "data", classes=6, per_class=2)
    # Class 0 one image, class 1 three, the rest two: no class but 1 has a quarter of the images.
    (root / "val" / "class_0" / "0.png").rename(root / "val" / "class_1" / "moved.png")
    model = create_model("sequencer2d_tiny", num_classes=6)
    # A head of zero weights makes every image's logits its bias: class 1 first, class 0 last, on every image.
    bias = torch.tensor([0.0, 5, 4, 3, 2, 1])
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.copy_(bias)
    save_weights(model, tmp_path / "tiny.pth")
    results = tmp_path / "results.json"
    args = parse_cli(
        "validate",
        f"{root} --model sequencer2d_tiny --checkpoint {tmp_path / 'tiny.pth'} -b 5 "
        f"--input-size 3 32 32 --amp -j 0 --results-file {results}",
    )
    assert validate.run(args) == 0
    written = json.loads(results.read_text())
    assert written["count"] == 12 and written["input_size"] == [3, 32, 32] and written["amp"]
    # Top-1: the 3 images of class 1; top-5: all but the one of class 0.
    assert written["top1"] == 25.0 and written["top5"] == round(100 * 11 / 12, 4)
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    loss = nn.functional.cross_entropy(bias.expand(12, 6), labels).item()
    assert written["loss"] == pytest.approx(loss, rel=1e-3)
    out = capsys.readouterr().out
    assert "top-1 25.000  top-5 91.667" in out and "(12 images, 0 skipped, input 3x32x32)" in out
    # Read at another size than the weights were trained at, the line says both.
    assert validate.run(parse_cli("validate", f"{root} --checkpoint {tmp_path / 'tiny.pth'} --img-size 16 -j 0")) == 0
    assert "(12 images, 0 skipped, input 3x16x16, trained at 3x32x32)" in capsys.readouterr().out


def test_missing_dataset_is_a_clear_error(assert_refused, tmp_path: Path) -> None:
    match = re.escape(f"error: dataset folder not found: {tmp_path / 'missing'}")
    assert_refused("validate", f"{tmp_path / 'missing'} --model sequencer2d_tiny", match=match)


def test_training_checkpoint_supplies_the_input_size(make_image_tree, run_cli, tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "data", classes=2, per_class=2)
    model = create_model("sequencer2d_tiny", num_classes=2)
    torch.save(
        {"state_dict": model.state_dict(), "epoch": 3, "args": {"img_size": 24, "crop_pct": None}},
        tmp_path / "last.pth.tar",
    )
    results = tmp_path / "results.json"
    base = f"{root} --model sequencer2d_tiny --checkpoint {tmp_path / 'last.pth.tar'} -j 0 --results-file {results}"
    assert run_cli("validate", base) == 0
    assert json.loads(results.read_text())["input_size"] == [3, 24, 24]
    assert run_cli("validate", f"{base} --img-size 20") == 0  # an explicit flag still wins
    assert json.loads(results.read_text())["input_size"] == [3, 20, 20]
    # A run trained with --input-size: an asked --img-size still wins (timm reads input_size first).
    torch.save({"state_dict": model.state_dict(), "args": {"input_size": [3, 28, 28]}}, tmp_path / "last.pth.tar")
    assert run_cli("validate", base) == 0
    assert json.loads(results.read_text())["input_size"] == [3, 28, 28]
    assert run_cli("validate", f"{base} --img-size 20") == 0
    assert json.loads(results.read_text())["input_size"] == [3, 20, 20]


def sure_of(tmp_path: Path, scores: dict[int, float], num_classes: int = 1000) -> Path:
    """A sequencer2d_tiny checkpoint whose logits are `scores` (class -> logit, others 0) for any image."""
    model = create_model("sequencer2d_tiny", num_classes=num_classes)  # zero-initialised head: the bias is the logit
    with torch.no_grad():
        for index, score in scores.items():
            model.head.fc.bias[index] = score
    path = tmp_path / f"sure_of_{'_'.join(map(str, scores))}.safetensors"
    save_weights(model, path)
    return path


def test_validate_in_python_scores_the_digits_as_worked_out_by_hand(tmp_path: Path) -> None:
    # The same logits for every image, sure of class 3: top-1 is the share of 3s, the loss follows from the two cases.
    checkpoint = sure_of(tmp_path, {3: 4.0}, num_classes=10)
    results = validate.validate(model="sequencer2d_tiny", checkpoint=checkpoint, batch_size=100, workers=0)
    targets = DigitsDataset("validation").targets
    share = targets.count(3) / len(targets)
    assert results["data"] == "digits" and results["count"] == len(targets) == 360 and results["num_skipped"] == 0
    assert results["top1"] == pytest.approx(100 * share) and results["input_size"] == [3, 32, 32]
    log_p = torch.log_softmax(torch.tensor([0.0, 0, 0, 4, 0, 0, 0, 0, 0, 0], dtype=torch.float64), dim=0)
    assert results["loss"] == pytest.approx(-(share * log_p[3] + (1 - share) * log_p[0]).item(), rel=1e-5)
    assert results["checkpoint"] == str(checkpoint) and results["valid_labels"] is None and "real_top1" not in results


def tiny_args(parse_cli: Callable[..., argparse.Namespace], command: str, tmp_path: Path) -> argparse.Namespace:
    """`sequencer validate COMMAND` on the tiny model at 32 px, writing tmp_path/results.json."""
    return parse_cli(
        "validate", f"{command} --model sequencer2d_tiny --input-size 3 32 32 -j 0 --results-file {tmp_path / 'r.json'}"
    )


def validate_results(parse_cli: Callable[..., argparse.Namespace], command: str, tmp_path: Path) -> dict:
    """Run `tiny_args(COMMAND)` and return its results file."""
    assert validate.run(tiny_args(parse_cli, command, tmp_path)) == 0
    return json.loads((tmp_path / "r.json").read_text())


def test_wordnet_id_folders_take_their_imagenet_index(make_image_tree, parse_cli, tmp_path: Path) -> None:
    synsets = imagenet_synsets()
    sure = 500  # a head sure of class 500, on a tree of two WordNet-id folders of which 500 is one
    root = make_image_tree(
        tmp_path / "data", [synsets[3], synsets[sure]], per_class=2, size=12, splits=(), suffix=".JPEG"
    )
    results = validate_results(parse_cli, f"{root} --checkpoint {sure_of(tmp_path, {sure: 10.0})}", tmp_path)
    assert results["count"] == 4 and results["top1"] == pytest.approx(50.0)  # folders numbered 0, 1 gave 0.0


def test_numbered_folders_take_their_number_also_when_some_are_missing(
    make_image_tree, parse_cli, tmp_path: Path
) -> None:
    # ImageNet-V2 names its folders 0..999; sorted as text, "10" would come second and be read as class 1.
    root = make_image_tree(tmp_path / "data", ["0", "2", "10"], per_class=2, size=12, splits=(), suffix=".JPEG")
    results = validate_results(parse_cli, f"{root} --checkpoint {sure_of(tmp_path, {10: 10.0})}", tmp_path)
    assert results["top1"] == pytest.approx(100 / 3, abs=1e-3)


def test_class_count_mismatch_is_one_line_before_the_model_runs(
    make_image_tree, assert_refused, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_tree(tmp_path / "data", classes=3, per_class=1)
    checkpoint = sure_of(tmp_path, {0: 1.0})

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the class counts were checked")

    monkeypatch.setattr(validate, "load_model", no_model)
    command = f"{root} --model sequencer2d_tiny --checkpoint {checkpoint} -j 0 --results-file {tmp_path / 'r.json'}"
    match = r"error: the model has 1000 classes but the data has 3.*--num-classes 3"
    assert_refused("validate", *shlex.split(command), match=match, absent=[tmp_path / "r.json"])


def test_class_indices_rules() -> None:
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets[0] == "n01440764"
    assert class_indices([synsets[7], synsets[2]], 1000) == [7, 2]
    assert class_indices(["1", "999"], 1000) == [1, 999]
    assert class_indices(["cat", "dog"], 2) == [0, 1]
    assert class_indices(["dog"], 2, model_class_names=["cat", "dog"]) == [1]  # a training checkpoint's names
    with pytest.raises(DatasetError, match="the model has 1000 classes but the data has 2"):
        class_indices(["1", "1000"], 1000)  # not a class number of this model
    with pytest.raises(DatasetError, match="the model has 3 classes but the data has 2"):
        class_indices(["cat", "dog"], 3)


def test_valid_labels_mask_the_logits_to_imagenet_a(make_image_tree, parse_cli, tmp_path: Path) -> None:
    in_a = load_valid_classes("imagenet-a", 1000)
    assert len(in_a) == 200 and 15 in in_a.tolist() and 0 not in in_a.tolist()  # timm's packaged list
    # The head prefers class 0 (not an ImageNet-A class) over class 15 (one), and the images are of class 15.
    root = make_image_tree(tmp_path / "data", [imagenet_synsets()[15]], per_class=2, size=12, splits=(), suffix=".JPEG")
    checkpoint = sure_of(tmp_path, {0: 10.0, 15: 5.0})
    assert validate_results(parse_cli, f"{root} --checkpoint {checkpoint}", tmp_path)["top1"] == 0.0
    masked = validate_results(parse_cli, f"{root} --checkpoint {checkpoint} --valid-labels imagenet-a", tmp_path)
    assert masked["top1"] == 100.0 and masked["valid_labels"] == "imagenet-a"
    subset = tmp_path / "subset.txt"
    subset.write_text("15\n7\n")
    assert (
        validate_results(parse_cli, f"{root} --checkpoint {checkpoint} --valid-labels {subset}", tmp_path)["top1"]
        == 100.0
    )
    with pytest.raises(DatasetError, match="not among --valid-labels"):
        # class 15 is not one of ImageNet-R's 200
        validate.validate(
            data=root, model="sequencer2d_tiny", checkpoint=checkpoint, workers=0, valid_labels="imagenet-r"
        )
    with pytest.raises(UsageError, match="neither imagenet-a nor imagenet-r nor a file"):
        load_valid_classes("imagenet-b", 1000)


def test_real_labels_score_against_the_reassessed_labels(make_image_tree, parse_cli, tmp_path: Path) -> None:
    assert load_real_labels()["ILSVRC2012_val_00000002"] == [970, 795]  # timm's packaged file, 50,000 entries
    with pytest.raises(UsageError, match="put DATA before --real-labels"):
        load_real_labels(tmp_path)  # `validate --real-labels DATA`: argparse hands the folder to --real-labels
    synsets = imagenet_synsets()
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3, 4)]
    root = make_image_tree(
        tmp_path / "val", [synsets[5], synsets[9]], file_names=names, per_class=2, size=12, splits=()
    )
    # Image 1 has no ReaL label (left out), 2 and 3 list class 5, 4 only class 9: the head, sure of 5, gets 2 of 3.
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[], [5], [9, 5], [9]]))
    results = validate_results(
        parse_cli, f"{root} --checkpoint {sure_of(tmp_path, {5: 10.0})} --real-labels {real}", tmp_path
    )
    assert results["top1"] == 50.0 and results["real_top1"] == pytest.approx(200 / 3, abs=1e-3)
    assert results["real_count"] == 3
    other = make_image_tree(tmp_path / "other", [synsets[5]], per_class=2, size=12, splits=(), suffix=".JPEG")
    with pytest.raises(DatasetError, match="have no ReaL labels"):
        validate.validate(
            data=other, model="sequencer2d_tiny", checkpoint=sure_of(tmp_path, {5: 10.0}), workers=0, real_labels=real
        )


def test_unknown_model_is_one_line_before_the_data_is_read(assert_refused, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "build_dataset", lambda *a, **k: pytest.fail("the data was read first"))
    assert_refused("validate", "--model", "sequencer2d_q", match="error: unknown model 'sequencer2d_q'")


@pytest.mark.slow
def test_two_processes_share_the_images_and_write_what_one_process_does(
    make_image_tree, tiny_model, run_cli, torchrun, tmp_path: Path
) -> None:
    # 15 images: shards of 8 and 7, where a padded DistributedSampler would count one image twice (16).
    root = make_image_tree(tmp_path / "data", classes=3, per_class=5, size=32, splits=("val",))
    model = tiny_model(3)
    with torch.no_grad():  # classes 0 and 2 swapped: this model then gets 2 of 3 classes right, not none
        model.head.fc.weight[[0, 2]] = model.head.fc.weight[[2, 0]].clone()
        model.head.fc.bias[[0, 2]] = model.head.fc.bias[[2, 0]].clone()
    checkpoint = tmp_path / "tiny.safetensors"
    save_weights(model, checkpoint)
    flags = f"{root} --model sequencer2d_tiny --checkpoint {checkpoint} -b 2 -j 0 --threads 1 --device cpu"
    assert run_cli("validate", f"{flags} --results-file {tmp_path / 'one.json'}") == 0
    command = ["-m", "sequencer", "validate", *shlex.split(flags), "--results-file", str(tmp_path / "two.json")]
    launch = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint"]
    result = torchrun.run([*launch, torchrun.endpoint()], command, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sequencer2d_tiny: top-1") == 1  # rank 0 alone prints
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["count"] == two["count"] == 15 and 0 < one["top1"] < 100  # a score that can differ
    assert two["loss"] == pytest.approx(one["loss"], abs=2e-4)  # sums in another order
    assert {k: v for k, v in two.items() if k not in ("loss", "images_per_sec")} == {
        k: v for k, v in one.items() if k not in ("loss", "images_per_sec")
    }


def test_without_model_the_model_the_checkpoint_records_is_validated(run_cli, tmp_path: Path, capsys) -> None:
    checkpoint = sure_of(tmp_path, {3: 4.0}, num_classes=10)  # save_weights records sequencer2d_tiny
    results = tmp_path / "results.json"
    assert run_cli("validate", f"--checkpoint {checkpoint} -b 100 -j 0 --results-file {results}") == 0
    written = json.loads(results.read_text())
    assert written["model"] == "sequencer2d_tiny" and written["input_size"] == [3, 32, 32]
    assert capsys.readouterr().out.startswith("sequencer2d_tiny: top-1 ")
    named = validate.validate(model="sequencer2d_tiny", checkpoint=checkpoint, batch_size=100, workers=0)
    assert written["top1"] == round(named["top1"], 4)
