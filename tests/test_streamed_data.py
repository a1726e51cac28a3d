"""`--dataset wds/...`, `hfds/...` and `hfids/...` (timm's readers) for train and validate, on data the tests write."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sequencer import data as data_module
from sequencer.checkpoint import read_file, save_weights

TINY = (
    "--model sequencer2d_tiny --img-size 16 -b 2 -j 0 --threads 1 --no-progress --opt adamw --lr 2e-3 "
    "--cooldown-epochs 0"
)
TRAIN_SHARDS = "train-{000000..000001}.tar|16"  # 2 shards of 8 images; the count timm needs to plan an epoch
VAL_SHARDS = "val-{000000..000002}.tar"  # 3 shards of 5 images


def tinted_images(count: int, seed: int) -> list[tuple[Image.Image, int]]:
    """(image, label) pairs of 16 px noise tinted by class, two classes in turn."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
        pixels[..., index % 2] += 150
        samples.append((Image.fromarray(pixels), index % 2))
    return samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WebDataset shards: train-00000{0,1}.tar (8 images each), val-00000{0,1,2}.tar (5 each); PNG + .cls label."""
    webdataset = pytest.importorskip("webdataset")
    root = tmp_path_factory.mktemp("shards")
    for split, count, per_shard in (("train", 16, 8), ("val", 15, 5)):
        samples = tinted_images(count, seed=len(split))
        for shard in range(count // per_shard):
            with webdataset.TarWriter(str(root / f"{split}-{shard:06d}.tar")) as sink:
                for index in range(shard * per_shard, (shard + 1) * per_shard):
                    image, label = samples[index]
                    png = io.BytesIO()
                    image.save(png, format="PNG")
                    sink.write({"__key__": f"{split}{index:05d}", "png": png.getvalue(), "cls": str(label).encode()})
    return root


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Hugging Face dataset (parquet files, as on the Hub): train 16 and validation 15 images, cat and dog."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["cat", "dog"]))
    for split, count in (("train", 16), ("validation", 15)):
        images, labels = zip(*tinted_images(count, seed=len(split)), strict=True)
        table = datasets.Dataset.from_dict(dict(image=list(images), label=list(labels)), features=features)
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def validated(run_cli, flags: str, checkpoint: Path, results: Path) -> dict:
    """`sequencer validate FLAGS` of a sequencer2d_tiny checkpoint, its JSON results."""
    command = (
        f"{flags} --model sequencer2d_tiny --checkpoint {checkpoint} -b 2 -j 0 --threads 1 --results-file {results}"
    )
    assert run_cli("validate", command) == 0
    return json.loads(results.read_text())


def test_webdataset_shards_train_and_validate(run_cli, shards: Path, tmp_path: Path) -> None:
    data = f"--dataset wds/toy --data-dir {shards}"
    splits = f"--train-split '{TRAIN_SHARDS}' --val-split {VAL_SHARDS} --num-classes 2"
    assert run_cli("train", f"{data} {splits} {TINY} --epochs 1 --output {tmp_path / 'run'}") == 0
    assert read_file(tmp_path / "run" / "last.pth.tar")["num_updates"] == 8  # 16 images, batch 2
    results = validated(run_cli, f"{data} --split {VAL_SHARDS}", tmp_path / "run" / "last.pth.tar", tmp_path / "r.json")
    assert results["count"] == 15


def test_hugging_face_datasets_train_and_validate_by_name_and_streamed(
    run_cli, hf_dataset: Path, tmp_path: Path
) -> None:
    for prefix in ("hfds", "hfids"):
        data = f"--dataset {prefix}/{hf_dataset} --data-dir {tmp_path / 'cache'}"
        output = tmp_path / prefix
        assert run_cli("train", f"{data} {TINY} --epochs 1 --output {output}") == 0
        ckpt = read_file(output / "last.pth.tar")
        assert ckpt["num_updates"] == 8 and ckpt["class_names"] == ["cat", "dog"]  # the ClassLabel names
        results = validated(run_cli, data, output / "last.pth.tar", tmp_path / f"{prefix}.json")
        assert results["count"] == 15 and results["split"] == "validation"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--train-split 'nope-{000000..000001}.tar|16'", "split 'nope-{000000..000001}.tar|16': no shard file"),
        (f"--train-split '{TRAIN_SHARDS.partition('|')[0]}'", "a training split needs its image count"),
        ("--num-classes 2 -j 3", "2 training shard(s) for 3 readers (processes x -j workers, at least 1 each)"),
        ("--num-classes 0", "argument --num-classes: 0 is out of range"),
        ("", "its labels name no classes; pass --num-classes"),
    ],
)
def test_bad_webdataset_flags_fail_in_one_line_before_any_work(
    assert_refused, shards: Path, tmp_path: Path, flags: str, message: str
) -> None:
    splits = f"--train-split '{TRAIN_SHARDS}' --val-split {VAL_SHARDS}"
    command = f"--dataset wds/toy --data-dir {shards} {splits} {TINY} --epochs 1 {flags} --output {tmp_path / 'out'}"
    assert_refused("train", command, match=re.escape(message), absent=[tmp_path / "out"])


def test_an_unknown_split_or_a_missing_package_fails_in_one_line(
    run_cli,
    assert_refused,
    hf_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = f"--dataset hfds/{hf_dataset} --data-dir {tmp_path / 'cache'}"
    assert run_cli("train", f"{data} --val-split test {TINY} --output {tmp_path / 'out'}") == 2
    # (stderr also holds the progress of datasets preparing its cache, on first reading)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("sequencer train: error: --dataset hfds/")
    assert "split 'test': Unknown split \"test\". Should be one of ['train', 'validation']" in errors[0]
    real_find_spec = data_module.importlib.util.find_spec
    monkeypatch.setattr(
        data_module.importlib.util, "find_spec", lambda name: None if name == "datasets" else real_find_spec(name)
    )
    match = re.escape('needs the datasets package, not installed: pip install "sequencer[streaming]"')
    assert_refused(
        "validate", f"{data} --model sequencer2d_tiny --num-classes 2", match=match, absent=[tmp_path / "out"]
    )


@pytest.mark.slow
def test_two_processes_read_their_own_shards_and_validate_each_image_once(
    run_cli, torchrun, shards: Path, tmp_path: Path
) -> None:
    data = ["--dataset", "wds/toy", "--data-dir", str(shards)]
    launch = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint"]
    splits = ["--train-split", TRAIN_SHARDS, "--val-split", VAL_SHARDS, "--num-classes", "2", "--device", "cpu"]
    train = ["-m", "sequencer", "train", *data, *splits, *shlex.split(TINY), "--epochs", "1", "--output"]
    result = torchrun.run([*launch, torchrun.endpoint()], [*train, str(tmp_path / "run")], tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "run" / "last.pth.tar"
    assert read_file(checkpoint)["num_updates"] == 4  # one shard of 8 images per process, batch 2
    flags = [*data, "--split", VAL_SHARDS, "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint)]
    flags += ["-b", "2", "-j", "0", "--threads", "1", "--device", "cpu"]
    validate = ["-m", "sequencer", "validate", *flags, "--results-file", str(tmp_path / "two.json")]
    result = torchrun.run([*launch, torchrun.endpoint()], validate, tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one = validated(
        run_cli, f"--dataset wds/toy --data-dir {shards} --split {VAL_SHARDS}", checkpoint, tmp_path / "one.json"
    )
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["count"] == two["count"] == 15  # shards 2 + 1 per process, no image repeated to even them out
    assert two["top1"] == one["top1"] and two["loss"] == pytest.approx(one["loss"], abs=2e-4)


@pytest.mark.slow
def test_hugging_face_datasets_in_two_processes_validate_each_image_once(
    run_cli, torchrun, tiny_model, hf_dataset: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "tiny.safetensors"
    save_weights(tiny_model(2), checkpoint)
    launch = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint"]
    for prefix in ("hfds", "hfids"):
        data = f"--dataset {prefix}/{hf_dataset} --data-dir {tmp_path / 'cache'}"
        one = validated(run_cli, data, checkpoint, tmp_path / f"{prefix}-one.json")
        flags = [*shlex.split(data), "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint), "-j", "0"]
        flags += ["-b", "2", "--threads", "1", "--device", "cpu", "--results-file", str(tmp_path / f"{prefix}.json")]
        result = torchrun.run([*launch, torchrun.endpoint()], ["-m", "sequencer", "validate", *flags], tmp_path, 240)
        assert result.returncode == 0, result.stderr[-3000:]
        two = json.loads((tmp_path / f"{prefix}.json").read_text())
        assert one["count"] == two["count"] == 15 and two["top1"] == one["top1"], prefix
        assert two["loss"] == pytest.approx(one["loss"], abs=2e-4)
