"""`train --checkpoint-hist` keeps the N best epochs; `sequencer average` averages them or exports one checkpoint."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sequencer import train as train_module
from sequencer.average import average_checkpoints
from sequencer.builder import create_model
from sequencer.checkpoint import extract_state_dict, read_file, record_of, save_weights, write_weights
from sequencer.errors import CheckpointError
from sequencer.train import update_checkpoint_history

TINY_RUN = (
    "--model sequencer2d_tiny --img-size 16 -b 4 -j 0 --threads 1 --no-progress --opt adamw --lr 2e-3 "
    "--model-ema --model-ema-decay 0.5 --eval-metric loss --cooldown-epochs 0"
)


@pytest.fixture(scope="module")
def data(make_image_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("data"), classes=2, per_class=8)


@pytest.fixture(scope="module")
def run_dir(run_cli, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch run (with EMA) that keeps the 2 best epochs by held-out loss."""
    output = tmp_path_factory.mktemp("run")
    command = f"train {data} {TINY_RUN} --epochs 3 --checkpoint-hist 2 --output {output}"
    assert run_cli(command) == 0
    return output


def epoch_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*.pth.tar"))


def mean_of(paths: list[Path], key: str) -> dict[str, torch.Tensor]:
    dicts = [read_file(p)[key] for p in paths]
    return {k: torch.stack([d[k] for d in dicts]).mean(0) for k in dicts[0]}


def test_ema_and_raw_weights_are_never_averaged_together(tmp_path: Path) -> None:
    model = create_model("sequencer2d_tiny", num_classes=2)
    write_weights(model.state_dict(), replace(record_of(model), ema=True), tmp_path / "ema.safetensors")
    save_weights(model, tmp_path / "raw.safetensors")
    files = [tmp_path / "ema.safetensors", tmp_path / "raw.safetensors"]
    for use_ema in (True, False):  # in either order: the kind was read from the first file's flag only
        for order in (files, files[::-1]):
            with pytest.raises(CheckpointError, match="only some of the weights taken are EMA weights"):
                average_checkpoints(order, use_ema=use_ema)


def test_files_from_before_records_held_model_args_average_with_newer_ones(tmp_path: Path) -> None:
    model = create_model("sequencer2d_tiny", num_classes=2, mlp_ratio=2.0)
    write_weights(model.state_dict(), replace(record_of(model), model_args={}), tmp_path / "older.safetensors")
    save_weights(model, tmp_path / "newer.safetensors")
    for files in ([tmp_path / "older.safetensors", tmp_path / "newer.safetensors"], [tmp_path / "newer.safetensors"]):
        assert average_checkpoints(files)[1].model_args == {"mlp_ratio": 2.0}


@pytest.mark.slow
def test_run_keeps_exactly_the_best_epochs(run_dir: Path) -> None:
    with open(run_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    best_two = sorted(rows, key=lambda row: (float(row["eval_loss"]), int(row["epoch"])))[:2]
    assert epoch_files(run_dir) == sorted(f"checkpoint-{row['epoch']}.pth.tar" for row in best_two)
    for row in best_two:
        assert read_file(run_dir / f"checkpoint-{row['epoch']}.pth.tar")["epoch"] == int(row["epoch"])


@pytest.mark.slow
def test_average_is_the_mean_of_the_kept_files_and_loads(run_cli, run_dir: Path, tmp_path: Path) -> None:
    kept = sorted(run_dir.glob("checkpoint-*.pth.tar"))
    for flag, key, suffix in (([], "state_dict_ema", ".safetensors"), (["--no-use-ema"], "state_dict", ".pth")):
        output = tmp_path / f"avg{suffix}"
        assert run_cli("average", str(run_dir), "-n", "2", "-o", str(output), *flag) == 0
        expected = mean_of(kept, key)
        model = create_model("sequencer2d_tiny", num_classes=2, pretrained=str(output))
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(loaded[name], tensor, rtol=1e-6, atol=1e-7, msg=f"{key}: {name}")
        # The average is not one of its inputs (EMA and raw weights differ, and so do the two epochs).
        assert not torch.equal(loaded["stem.proj.weight"], read_file(kept[0])[key]["stem.proj.weight"])


@pytest.mark.slow
def test_n_picks_the_best_by_the_recorded_metric(run_cli, run_dir: Path, tmp_path: Path) -> None:
    kept = sorted(run_dir.glob("checkpoint-*.pth.tar"))
    best = min(kept, key=lambda p: (read_file(p)["history"][-1]["eval_loss"], read_file(p)["epoch"]))
    output = tmp_path / "best.safetensors"
    assert run_cli("average", str(run_dir), "-n", "1", "-o", str(output)) == 0
    written = extract_state_dict(read_file(output))  # the file records the model name beside the weights
    for name, tensor in read_file(best)["state_dict_ema"].items():
        assert torch.equal(written[name], tensor)


@pytest.mark.slow
def test_export_of_one_training_checkpoint_keeps_only_the_weights(run_cli, run_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "weights.pth"
    assert run_cli("average", str(run_dir / "last.pth.tar"), "--no-use-ema", "-o", str(output)) == 0
    exported = read_file(output)
    assert set(exported) == {"state_dict", "sequencer_record"}
    record = exported["sequencer_record"]
    assert (record["model_name"], record["num_classes"], record["input_size"]) == ("sequencer2d_tiny", 2, [3, 16, 16])
    last = read_file(run_dir / "last.pth.tar")["state_dict"]
    assert all(torch.equal(exported["state_dict"][k], v) for k, v in last.items())
    model = create_model("sequencer2d_tiny", num_classes=2, pretrained=str(output))
    assert torch.equal(model.state_dict()["head.fc.weight"], last["head.fc.weight"])


@pytest.mark.slow
def test_resumed_run_keeps_the_same_files(
    run_cli, data: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_epoch = train_module.train_one_epoch

    def interrupt_last_epoch(config, run_state, data, state, *args, **kwargs):
        if state.epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(config, run_state, data, state, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupt_last_epoch)
    command = f"train {data} {TINY_RUN} --epochs 3 --checkpoint-hist 2 --output {tmp_path}".split()
    assert run_cli(*command) == 130
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    assert run_cli(*command, "--resume", str(tmp_path / "last.pth.tar")) == 0
    assert epoch_files(tmp_path) == epoch_files(run_dir)
    for name in epoch_files(run_dir):
        resumed, uninterrupted = read_file(tmp_path / name), read_file(run_dir / name)
        assert all(torch.equal(resumed["state_dict"][k], v) for k, v in uninterrupted["state_dict"].items())


def fake_checkpoint(epoch: int) -> dict:
    return {"epoch": epoch, "state_dict": {"w": torch.full((2,), float(epoch))}}


def test_history_keeps_the_best_and_resumes_its_bookkeeping(tmp_path: Path) -> None:
    losses = [5.0, 3.0, 4.0, 1.0, 2.0, 1.0]
    history: list[dict] = []
    for epoch, loss in enumerate(losses[:4]):
        history.append({"epoch": epoch, "eval_loss": loss})
        update_checkpoint_history(fake_checkpoint(epoch), history, tmp_path, "loss", keep=2)
    assert epoch_files(tmp_path) == ["checkpoint-1.pth.tar", "checkpoint-3.pth.tar"]
    # A resumed run restores the history from last.pth.tar and finds the kept files on disk. A file from a
    # later epoch of an abandoned run in this folder (not in the history) is not ranked: it goes.
    (tmp_path / "checkpoint-9.pth.tar").write_bytes(b"stale")
    resumed = list(history)
    for epoch, loss in enumerate(losses[4:], start=4):
        resumed.append({"epoch": epoch, "eval_loss": loss})
        kept = update_checkpoint_history(fake_checkpoint(epoch), resumed, tmp_path, "loss", keep=2)
    assert kept == [3, 5]  # ties (1.0 at epochs 3 and 5) would keep the earlier one first
    assert epoch_files(tmp_path) == ["checkpoint-3.pth.tar", "checkpoint-5.pth.tar"]
    assert read_file(tmp_path / "checkpoint-5.pth.tar")["epoch"] == 5
    # Accuracy ranks highest first.
    top1 = [{"epoch": e, "eval_top1": v} for e, v in enumerate([10.0, 30.0, 20.0])]
    folder = tmp_path / "top1"
    folder.mkdir()
    for end in range(1, 4):
        kept = update_checkpoint_history(fake_checkpoint(end - 1), top1[:end], folder, "top1", keep=2)
    assert kept == [1, 2] and epoch_files(folder) == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"]


def test_errors_are_one_line(assert_refused, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    written = [tmp_path / "a.safetensors", tmp_path / "a.onnx"]
    match = r"no checkpoint-EPOCH\.pth\.tar in .*--checkpoint-hist"
    assert_refused("average", empty, "-o", tmp_path / "a.safetensors", match=match, absent=written)

    torch.manual_seed(0)
    run = tmp_path / "run"
    for epoch, classes in enumerate((2, 5)):
        model = create_model("sequencer2d_tiny", num_classes=classes)
        save_weights(model, run / f"checkpoint-{epoch}.pth.tar")
    match = re.escape("-n 3, but only 2 checkpoint(s) found")
    assert_refused("average", run, "-n", "3", "-o", tmp_path / "a.safetensors", match=match, absent=written)
    match = r"head\.fc\.weight is \(5, 128\).*\(2, 128\)"
    assert_refused("average", run, "-o", tmp_path / "a.safetensors", match=match, absent=written)
    match = r"name a \.safetensors or \.pth file"
    assert_refused("average", run, "-o", tmp_path / "a.onnx", match=match, absent=written)
