"""`sequencer.tracking`: summary rows sent to W&B (offline, read back from its run file) and TensorBoard (read back
with its EventAccumulator), a resumed run continuing the same tracked run, and the refusals made before any work."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sequencer import tracking
from sequencer.errors import MissingDependencyError, UsageError
from sequencer.tracking import TENSORBOARD_FOLDER, WANDB_ID_FILE, RunTracker, check_tracking

CONFIG = {"model": "sequencer2d_tiny", "lr": 0.002, "epochs": 3}


def summary_row(epoch: int, top1: float = 50.0, ema: bool = False) -> dict[str, Any]:
    """A summary.csv row as the trainer records it."""
    row = dict(epoch=epoch, train_loss=1.5 - epoch / 10, eval_loss=1.2, eval_top1=top1, eval_top5=100.0, lr=2e-3)
    if ema:
        row.update(ema_eval_loss=1.1, ema_eval_top1=top1 + 1, ema_eval_top5=100.0)
    return row


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """wandb writing offline, silently, with no settings, cache or error reports outside `tmp_path`."""
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_TAGS", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports sent anywhere
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home))
    return wandb


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run's .wandb file, a LevelDB-style log (wandb has no public reader)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert b":W&B".startswith(data[:4]), data[:7]  # or shorter, while wandb has not written the header yet
    position, parts = 7, []  # after the file header: ":W&B", 2 bytes of magic, a version byte
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 or position + 7 + length > len(data):  # the end, or a chunk still being written
            break
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def offline_runs(folder: Path) -> list[dict[str, Any]]:
    """Each offline W&B run written under `folder` (oldest first): id, project, name, tags, config, steps, exit code."""
    runs = []
    for path in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        # wandb 0.19 writes the file out just after `finish` returns: wait for its last record, the exit.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(record.HasField("exit") for record in wandb_records(path)):
            time.sleep(0.05)
        run: dict[str, Any] = {"steps": []}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(
                    id=record.run.run_id,
                    project=record.run.project,
                    name=record.run.display_name,
                    tags=list(record.run.tags),
                    config={item.key: json.loads(item.value_json) for item in record.run.config.update},
                )
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
            elif kind == "history":
                run["steps"].append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
        runs.append(run)
    return runs


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under RUN/tensorboard as (step, value) pairs, as TensorBoard reads them (purges applied)."""
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = accumulator_module.EventAccumulator(str(folder / TENSORBOARD_FOLDER))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def test_wandb_logs_each_row_at_its_epoch_with_the_run_config(offline_wandb: Any, tmp_path: Path) -> None:
    folder = tmp_path / "20260101-sequencer2d_tiny-224"
    folder.mkdir()
    rows = [summary_row(0, ema=True), summary_row(1, top1=75.0, ema=True)]
    with RunTracker.open(folder, CONFIG, log_wandb=True, wandb_project="seq", wandb_tags=["digits", "tiny"]) as tracker:
        for row in rows:
            tracker.log_epoch(row)
    (run,) = offline_runs(folder)
    assert (run["project"], run["name"], run["tags"]) == ("seq", folder.name, ["digits", "tiny"])
    assert {key: run["config"][key] for key in CONFIG} == CONFIG
    assert (folder / WANDB_ID_FILE).read_text().strip() == run["id"]
    assert [step["_step"] for step in run["steps"]] == [0, 1]
    for step, row in zip(run["steps"], rows, strict=True):
        assert {key: step[key] for key in row} == row  # every column, EMA ones too, at the row's own epoch


def test_tensorboard_scalars_are_the_rows_columns_at_their_epochs(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    rows = [summary_row(3), summary_row(4, top1=80.0)]  # --start-epoch 3: steps are epochs, not a count from 0
    with RunTracker.open(tmp_path, CONFIG, start_epoch=3, log_tensorboard=True) as tracker:
        for row in rows:
            tracker.log_epoch(row)
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == set(rows[0]) - {"epoch"}
    for tag, events in scalars.items():
        assert [step for step, _ in events] == [3, 4]
        assert [value for _, value in events] == pytest.approx([row[tag] for row in rows], rel=1e-6)


def test_a_resumed_run_continues_the_same_wandb_run_and_tensorboard_steps(offline_wandb: Any, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    # The first process logs epochs 0-2 but dies before epoch 2's checkpoint: the resumed one replays epoch 2.
    with (
        pytest.raises(KeyboardInterrupt),
        RunTracker.open(tmp_path, CONFIG, log_wandb=True, log_tensorboard=True) as tracker,
    ):
        for epoch in range(3):
            tracker.log_epoch(summary_row(epoch, top1=10.0 * epoch))
        raise KeyboardInterrupt
    # W&B names an offline run's folder by its start, to the second: the same second would overwrite the first run.
    time.sleep(1.01 - time.time() % 1)
    with RunTracker.open(tmp_path, CONFIG, start_epoch=2, log_wandb=True, log_tensorboard=True) as tracker:
        tracker.log_epoch(summary_row(2, top1=99.0))
    first, resumed = offline_runs(tmp_path)
    assert first["id"] == resumed["id"] == (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert (first["exit_code"], resumed["exit_code"]) == (1, 0)  # the interrupted process shows as failed
    assert [(step["_step"], step["eval_top1"]) for step in resumed["steps"]] == [(2, 99.0)]
    assert tensorboard_scalars(tmp_path)["eval_top1"] == [(0, 0.0), (1, 10.0), (2, 99.0)]


def test_wandb_resume_id_names_the_run_to_continue(offline_wandb: Any, tmp_path: Path) -> None:
    (tmp_path / WANDB_ID_FILE).write_text("folderrun\n")
    with RunTracker.open(tmp_path, CONFIG, start_epoch=5, log_wandb=True, wandb_resume_id="named123") as tracker:
        tracker.log_epoch(summary_row(5))
    (run,) = offline_runs(tmp_path)
    assert run["id"] == "named123"
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == "named123"  # the next --resume continues it too


@pytest.mark.parametrize(
    ("flags", "extra"), [({"log_wandb": True}, "wandb"), ({"log_tensorboard": True}, "tensorboard")]
)
def test_tracking_without_its_package_is_refused_naming_the_extra(
    flags: dict[str, bool], extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *rest: None if name == extra else find_spec(name, *rest)
    )
    with pytest.raises(MissingDependencyError, match=rf"needs the {extra} package.*sequencer\[{extra}\]"):
        check_tracking(**flags)


def test_wandb_flags_without_log_wandb_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    check_tracking()
    with pytest.raises(UsageError, match="need --log-wandb"):
        check_tracking(wandb_project="seq")
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *rest: object())  # wandb installed or not
    check_tracking(log_wandb=True, wandb_project="seq", wandb_tags=["a"], wandb_resume_id="abc")


def test_importing_the_module_imports_neither_tracker() -> None:
    code = "import sys, sequencer.tracking; print(sorted({'wandb', 'tensorboard', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
