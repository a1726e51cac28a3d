"""Weights in the Hugging Face Hub layout: `sequencer average --hf-folder DIR` writes timm's config.json and
model.safetensors, which timm's own port and every reader here take back (local-dir:DIR, --checkpoint DIR), with the
weights' classes and trained input; `--push-to-hub` uploads that folder."""

from __future__ import annotations

import json
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

import sequencer
from sequencer.builder import TIMM_NAMES, hub_config, load_model
from sequencer.checkpoint import WeightsRecord, read_file, record_of, write_weights
from sequencer.errors import CheckpointError, UsageError
from sequencer.model import VARIANTS
from sequencer.validate import validate

CLASSES = ("cat", "dog", "emu")
SIZE = 16  # not sequencer2d_tiny's default 32: a reader that forgets the trained input reads at 32
LOCAL_DIR_TIMM = Version("1.0.16")  # the first timm whose create_model reads local-dir:DIR
TIMM_READS_LOCAL_DIR = pytest.mark.skipif(
    Version(timm.__version__) < LOCAL_DIR_TIMM,
    reason=f"timm.create_model reads local-dir: from timm {LOCAL_DIR_TIMM}; this is timm {timm.__version__}",
)


@pytest.fixture(scope="module")
def source(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """sequencer2d_tiny with a random head, 3 named classes, trained at 16 px (its record), and its weights file."""
    model = tiny_model(num_classes=len(CLASSES))
    record = replace(record_of(model), class_names=CLASSES, input_size=(3, SIZE, SIZE), crop_pct=1.0)
    path = tmp_path_factory.mktemp("source") / "weights.safetensors"
    write_weights({k: v.contiguous() for k, v in model.state_dict().items()}, record, path)
    return model, path


@pytest.fixture(scope="module")
def folder(run_cli, source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sequencer average FILE --hf-folder DIR` of the source weights."""
    out = tmp_path_factory.mktemp("hub") / "tiny"
    assert run_cli("average", source[1], "--hf-folder", out) == 0
    return out


@pytest.fixture(scope="module")
def data(make_image_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("data"), classes=list(CLASSES), per_class=3, size=24)


def test_the_folder_holds_timm_s_config_and_the_weights_under_timm_s_keys(folder: Path, source) -> None:
    model, _ = source
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    args = config["model_args"]
    assert config["architecture"] == "sequencer2d_s" and config["num_classes"] == 3 and config["num_features"] == 128
    assert args == {"layers": [1, 1, 2, 1], "patch_sizes": [4, 2, 1, 1], "embed_dims": [64, 128, 128, 128],
                    "hidden_sizes": [16, 32, 32, 32]}  # fmt: skip
    assert config["label_names"] == list(CLASSES)
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, SIZE, SIZE] and cfg["crop_pct"] == 1.0 and cfg["num_classes"] == 3
    assert cfg["mean"] == list(model.pretrained_cfg["mean"]) and cfg["interpolation"] == "bicubic"
    # timm's own port, built from the config as timm builds it, has exactly these keys and shapes.
    with torch.device("meta"):
        port = timm.create_model(config["architecture"], num_classes=3, **args)
    stored = load_file(folder / "model.safetensors")
    assert {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in port.state_dict().items()}
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_timm_can_build_maps_to_timm_s_port_with_the_same_keys(name: str) -> None:
    config = VARIANTS[name]
    record = WeightsRecord(model_name=name, num_classes=10)
    if config.mixer != "2d" or config.cell != "lstm" or config.pos_embed:
        with pytest.raises(UsageError, match=f"{name} would not load in timm"):
            hub_config(record)
        return
    written = hub_config(record)
    assert written["architecture"] in TIMM_NAMES
    if name.removesuffix("_392") in TIMM_NAMES:  # timm's registered networks need no model_args
        assert written["architecture"] == name.removesuffix("_392") and "model_args" not in written
    with torch.device("meta"):
        ours = sequencer.create_model(name, num_classes=10)
        port = timm.create_model(written["architecture"], num_classes=10, **written.get("model_args", {}))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in port.state_dict().items()}


def test_architecture_changes_travel_with_the_weights(run_cli, tmp_path: Path) -> None:
    """Weights of a variant built with other fields (train --model-kwargs) record them: our readers and the Hub
    layout's config.json build that architecture, not the registered one."""
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny", num_classes=3, mlp_ratio=2.0, union="add").eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    assert record_of(model).model_args == {"mlp_ratio": 2.0, "union": "add"}
    path = tmp_path / "changed.safetensors"
    sequencer.save_weights(model, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(None, path)(x), model(x), rtol=0, atol=0)
    assert run_cli("average", path, "--hf-folder", tmp_path / "hub") == 0
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["model_args"]["mlp_ratios"] == [2.0] * 4 and config["model_args"]["union"] == "add"
    with torch.device("meta"):
        port = timm.create_model(config["architecture"], num_classes=3, **config["model_args"])
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in port.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(sequencer.create_model(f"local-dir:{tmp_path / 'hub'}")(x), model(x))
    # A model of the registered architecture is told what the file holds, not only which shapes differ.
    with pytest.raises(CheckpointError, match=r"architecture changes mlp_ratio=2\.0 union=add; this model has none"):
        sequencer.create_model("sequencer2d_tiny", num_classes=3, pretrained=path)
    gru = sequencer.create_model("sequencer2d_tiny", num_classes=3, cell="gru")
    with pytest.raises(UsageError, match="would not load in timm"):
        hub_config(record_of(gru))


@TIMM_READS_LOCAL_DIR
def test_timm_builds_its_own_port_from_the_folder_with_our_logits(folder: Path, source) -> None:
    model, _ = source
    port = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(port).__module__ == "timm.models.sequencer"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(port(x), model(x), rtol=1e-4, atol=1e-5)
        assert model(x).abs().max() > 0.1  # the random head: equal logits are not both zero
    assert tuple(timm.data.resolve_data_config({}, model=port)["input_size"]) == (3, SIZE, SIZE)
    assert port.pretrained_cfg["label_names"] == list(CLASSES)


def test_our_readers_take_the_folder_with_its_record(folder: Path, source, data: Path, run_cli, tmp_path) -> None:
    model, path = source
    x = torch.randn(2, 3, SIZE, SIZE)
    for loaded in (sequencer.create_model(f"local-dir:{folder}"), load_model(None, folder)):
        assert record_of(loaded).class_names == CLASSES and loaded.pretrained_cfg["input_size"] == (3, SIZE, SIZE)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    # validate of the folder (plain or local-dir:) scores as validate of the file: read at 16 px, classes by name.
    reference = validate(data=data, checkpoint=path, workers=0)
    for checkpoint in (folder, f"local-dir:{folder}"):
        scores = validate(data=data, checkpoint=checkpoint, workers=0)
        assert (scores["top1"], scores["loss"], scores["input_size"]) == (
            reference["top1"],
            reference["loss"],
            [3, SIZE, SIZE],
        )
    images = sorted(data.rglob("*.png"))
    got = [p.top[0].label for p in sequencer.predict(images, checkpoint=folder, runtime="torch", topk=1)]
    assert got == [p.top[0].label for p in sequencer.predict(images, checkpoint=path, runtime="torch", topk=1)]
    assert set(got) <= set(CLASSES)
    assert run_cli("export", "--checkpoint", folder, "-o", tmp_path / "tiny.pt2") == 0
    # Another class count through local-dir: re-initialises the head, as timm does.
    assert sequencer.create_model(f"local-dir:{folder}", num_classes=5).num_classes == 5


@pytest.mark.parametrize("legacy", [False, True], ids=["config", "legacy-config"])
def test_a_folder_timm_wrote_reads_its_config(tiny_model, tmp_path: Path, legacy: bool) -> None:
    """No record in the weights (timm's save_for_hf, a Hub download): the variant, classes and input from config.json,
    in its current form or timm's older one (a pretrained_cfg alone, its class names as `labels`)."""
    model = tiny_model(num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    cfg = {"input_size": [3, SIZE, SIZE], "crop_pct": 0.9, "interpolation": "bilinear", "num_classes": 3}
    config = {"architecture": "sequencer2d_tiny", "num_classes": 3, "label_names": list(CLASSES), "pretrained_cfg": cfg}
    if legacy:
        config = {"architecture": "sequencer2d_tiny", "labels": list(CLASSES), **cfg}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(None, tmp_path)
    record = record_of(loaded)
    assert (record.model_name, record.class_names, record.input_size) == ("sequencer2d_tiny", CLASSES, (3, SIZE, SIZE))
    assert (record.crop_pct, record.interpolation) == (0.9, "bilinear")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_folder_timm_wrote_with_model_args_builds_that_architecture(tmp_path: Path) -> None:
    """timm's save_for_hf of its sequencer2d_s built smaller (model_args, one input channel): read as that model."""
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny", num_classes=3, in_chans=1, mlp_ratio=2.0).eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    args = {
        "layers": [1, 1, 2, 1],
        "patch_sizes": [4, 2, 1, 1],
        "embed_dims": [64, 128, 128, 128],
        "hidden_sizes": [16, 32, 32, 32],
        "mlp_ratios": [2.0] * 4,
        "in_chans": 1,
        "with_fc": True,
        "num_classes": 3,
        "global_pool": "avg",
        "img_size": [224, 224],
    }  # fmt: skip (newer timm writes the last)
    cfg = {"input_size": [3, 224, 224], "num_classes": 3}  # timm's pretrained_cfg keeps the 3-channel default
    config = {"architecture": "sequencer2d_s", "num_classes": 3, "model_args": args, "pretrained_cfg": cfg}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(None, tmp_path)
    assert record_of(loaded).input_size == (1, 224, 224)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # Without model_args in_chans (older timm, or saved without them): the stem's weight tells the channels.
    config["model_args"].pop("in_chans")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert record_of(load_model(None, tmp_path)).input_size == (1, 224, 224)


def test_a_folder_without_the_layout_is_one_line(tmp_path: Path, data: Path, assert_refused, source) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused("validate", data, "--checkpoint", empty, match=r"empty is a folder without the Hub layout \(config")
    assert_refused("export", "--checkpoint", f"local-dir:{empty}", "-o", tmp_path / "x.onnx", match="Hub layout")
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    save_file({"x": torch.zeros(1)}, weights_only / "model.safetensors")
    with pytest.raises(CheckpointError, match="without the Hub layout"):
        read_file(weights_only)
    (weights_only / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not readable JSON"):
        read_file(weights_only)


def test_average_s_hub_flags_are_checked_before_any_work(assert_refused, source, folder: Path, tmp_path: Path) -> None:
    _, path = source
    out, file = tmp_path / "hub", tmp_path / "w.safetensors"
    assert_refused("average", path, match="-o FILE, --hf-folder DIR or both")
    assert_refused("average", path, "-o", file, "--push-to-hub", "me/x", match="uploads the --hf-folder", absent=[file])
    assert_refused("average", path, "--hf-folder", out, "--hub-private", match="--hub-private applies", absent=[out])
    assert_refused("average", path, "--hf-folder", out, "--push-to-hub", "a/b/c", match="'a/b/c'", absent=[out])
    inside = folder / "model.safetensors"
    assert_refused("average", inside, "--hf-folder", folder, match="model.safetensors is one of the inputs")
    # A variant timm's port cannot build: refused before either output is written.
    gru = tmp_path / "gru.safetensors"
    sequencer.save_weights(sequencer.create_model("gru_sequencer2d_s", layers=(1,) * 4), gru)
    assert_refused(
        "average",
        gru,
        "-o",
        file,
        "--hf-folder",
        out,
        match="gru_sequencer2d_s would not load in timm",
        absent=[out, file],
    )


def test_push_to_hub_makes_the_repository_then_uploads_the_two_files_it_wrote(
    run_cli, source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def create_repo(self, repo_id: str, **kwargs) -> huggingface_hub.RepoUrl:
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs) -> None:
        patterns = kwargs.get("allow_patterns") or ["*"]
        sent = [p.name for p in Path(kwargs["folder_path"]).iterdir() if any(fnmatch(p.name, x) for x in patterns)]
        calls.append(("upload_folder", sorted(sent), kwargs))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "hub"
    out.mkdir()
    (out / "last.pth.tar").write_bytes(b"a run's checkpoint, optimizer state and all: not for the Hub")
    assert run_cli("average", source[1], "--hf-folder", out, "--push-to-hub", "me/tiny", "--hub-private") == 0
    (create, repo_id, made), (upload, files, uploaded) = calls
    assert (create, repo_id, made) == ("create_repo", "me/tiny", {"private": True, "exist_ok": True})
    assert upload == "upload_folder" and files == ["config.json", "model.safetensors"]
    assert (uploaded["repo_id"], Path(uploaded["folder_path"])) == ("me/tiny", out)


def test_an_unreachable_hub_is_one_line(source, tmp_path: Path, assert_refused, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    assert_refused(
        "average", source[1], "--hf-folder", tmp_path / "hub", "--push-to-hub", "me/tiny", match="could not upload"
    )
