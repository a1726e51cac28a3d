"""Checkpoints: the authors' format, timm's format, wrappers, our own format, and clear errors."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from torch import nn

import sequencer
from sequencer.checkpoint import CheckpointError, atomic_save, extract_state_dict, read_file
from sequencer.plotting import plot_training_curves


def _randomised(name: str, **kwargs) -> nn.Module:
    """A model whose every parameter is random (the zero head would hide a wrongly loaded head)."""
    torch.manual_seed(0)
    model = sequencer.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _logits(model: nn.Module, size: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))


def test_authors_layout_is_what_the_spec_describes(to_authors_format) -> None:
    keys = to_authors_format(sequencer.create_model("sequencer2d_s").state_dict())
    assert "stem.proj.weight" in keys and "head.weight" in keys and "norm.weight" in keys
    assert "blocks.0.0.rnn_tokens.rnn_v.weight_ih_l0_reverse" in keys
    assert "blocks.2.7.mlp_channels.fc2.bias" in keys and "blocks.1.0.rnn_tokens.fc.weight" in keys
    for down in ("blocks.0.4.down.weight", "blocks.1.3.down.weight", "blocks.2.8.down.weight"):
        assert down in keys
    assert not any(k.startswith(("stages.", "head.fc")) for k in keys)


@pytest.mark.parametrize("name", ["sequencer2d_s", "v_sequencer_s_pe", "gru_sequencer2d_s"])
def test_authors_and_timm_formats_load_to_the_same_logits(to_authors_format, tmp_path: Path, name: str) -> None:
    source = _randomised(name)
    ours = source.state_dict()
    torch.save({"model": to_authors_format(ours)}, tmp_path / "authors.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in ours.items()}}, tmp_path / "timm.pth.tar")
    a = sequencer.create_model(name, pretrained=tmp_path / "authors.pth").eval()
    b = sequencer.create_model(name, pretrained=str(tmp_path / "timm.pth.tar")).eval()
    expected = _logits(source)
    torch.testing.assert_close(_logits(a), expected, atol=0, rtol=0)
    torch.testing.assert_close(_logits(b), expected, atol=0, rtol=0)


def test_timm_own_model_and_ours_agree_on_the_same_weights() -> None:
    torch.manual_seed(0)
    reference = timm.create_model("sequencer2d_s").eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.05)
    ours = sequencer.create_model("sequencer2d_s")
    sequencer.checkpoint.load_state_dict(ours, reference.state_dict())
    torch.testing.assert_close(_logits(ours.eval()), _logits(reference), atol=1e-5, rtol=1e-5)


def test_ema_wrapper_and_safetensors(tmp_path: Path) -> None:
    source = _randomised("sequencer2d_tiny")
    other = _randomised("sequencer2d_tiny")
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": source.state_dict()}, tmp_path / "ckpt.pth.tar")
    only_ema = tmp_path / "ema_only.pth"
    torch.save({"state_dict_ema": source.state_dict()}, only_ema)
    sequencer.save_weights(source, tmp_path / "w.safetensors")

    ema = sequencer.create_model("sequencer2d_tiny")
    sequencer.load_pretrained(ema, tmp_path / "ckpt.pth.tar", use_ema=True)
    torch.testing.assert_close(_logits(ema.eval()), _logits(source))
    plain = sequencer.create_model("sequencer2d_tiny")
    sequencer.load_pretrained(plain, tmp_path / "ckpt.pth.tar")
    torch.testing.assert_close(_logits(plain.eval()), _logits(other))
    for path in (only_ema, tmp_path / "w.safetensors"):
        loaded = sequencer.create_model("sequencer2d_tiny", pretrained=path).eval()
        torch.testing.assert_close(_logits(loaded), _logits(source))


def test_our_pth_format_round_trips_with_metadata(tmp_path: Path) -> None:
    source = _randomised("sequencer2d_tiny", num_classes=10)
    sequencer.save_weights(source, tmp_path / "w.pth")
    saved = torch.load(tmp_path / "w.pth", weights_only=True)
    assert saved["sequencer_record"]["model_name"] == "sequencer2d_tiny"
    loaded = sequencer.create_model("sequencer2d_tiny", num_classes=10, pretrained=tmp_path / "w.pth").eval()
    torch.testing.assert_close(_logits(loaded), _logits(source))


def test_another_class_count_reinitialises_only_the_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _randomised("sequencer2d_tiny")
    sequencer.save_weights(source, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        model = sequencer.create_model("sequencer2d_tiny", num_classes=10, pretrained=tmp_path / "w.safetensors")
    assert "re-initialised" in caplog.text and "1000" in caplog.text
    assert model.head.fc.out_features == 10 and torch.count_nonzero(model.head.fc.weight) == 0
    for key, value in model.state_dict().items():
        if not key.startswith("head.fc"):
            assert torch.equal(value, source.state_dict()[key]), key


def test_keys_that_do_not_fit_are_named(tmp_path: Path) -> None:
    state = sequencer.create_model("sequencer2d_tiny").state_dict()
    del state["norm.weight"]
    state["blocks.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing keys") as info:
        sequencer.create_model("sequencer2d_tiny", pretrained=tmp_path / "bad.pth")
    assert "norm.weight" in str(info.value) and "unexpected keys" in str(info.value)
    assert "blocks.extra.weight" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"shape mismatch for stem\.proj\.weight") as info:
        sequencer.create_model("sequencer2d_s", pretrained=tmp_path / "bad.pth")
    assert str(info.value).startswith(f"{tmp_path / 'bad.pth'} does not fit sequencer2d_s (") and "\n" not in str(
        info.value
    )


def test_a_checkpoint_of_another_model_is_named_in_one_line(assert_refused, tmp_path: Path) -> None:
    tiny = sequencer.create_model("sequencer2d_tiny")
    sequencer.save_weights(tiny, tmp_path / "tiny.safetensors")  # records the model name in its metadata
    torch.save({"epoch": 3, "model_name": "sequencer2d_tiny", "state_dict": tiny.state_dict()}, tmp_path / "run.pth")
    Image.new("RGB", (40, 40)).save(tmp_path / "black.png")
    for name in ("tiny.safetensors", "run.pth"):
        error = assert_refused(
            "predict", tmp_path / "black.png", "--model sequencer2d_s --checkpoint", tmp_path / name, match="holds"
        )
        expected = f"error: {tmp_path / name} holds sequencer2d_tiny weights; this model is sequencer2d_s"
        assert error == f"sequencer predict: {expected}"
    with torch.device("meta"):  # shapes only: the comparison of keys needs no weights
        small = sequencer.create_model("sequencer2d_s")
    with pytest.raises(CheckpointError, match="holds sequencer2d_tiny weights; this model is sequencer2d_s"):
        sequencer.load_pretrained(small, tmp_path / "tiny.safetensors")


def test_missing_file_and_non_checkpoint_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.pth"):
        sequencer.create_model("sequencer2d_tiny", pretrained=tmp_path / "nope.pth")
    torch.save({"epoch": 3}, tmp_path / "not_weights.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        sequencer.create_model("sequencer2d_tiny", pretrained=tmp_path / "not_weights.pth")
    with pytest.raises(ValueError, match="no released weights"):
        sequencer.create_model("sequencer2d_tiny", pretrained=True)


def test_atomic_save_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pth.tar"
    atomic_save({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]


def test_a_full_disk_is_one_clear_error_and_the_previous_file_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.pth.tar"
    atomic_save({"a": torch.ones(2)}, target)

    def disk_full(obj: object, f: BinaryIO) -> None:
        f.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # torch's zip writer reports the failed write as a RuntimeError of its own
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", disk_full)
    message = f"cannot write {target}: no space left on the disk; the previous last.pth.tar survives intact"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        atomic_save({"a": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=re.escape("no space left on the disk; no best.pth.tar was written")):
        atomic_save({"a": torch.zeros(2)}, tmp_path / "best.pth.tar")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoints_and_figures_get_the_mode_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    """Written through a temporary file, yet readable by a team sharing the folder as a plain open() would be."""
    history = [dict(epoch=0, train_loss=1.0, eval_loss=1.0, eval_top1=50.0, eval_top5=90.0, lr=0.1)]
    previous = os.umask(umask)
    try:
        atomic_save({"a": torch.ones(2)}, tmp_path / "last.pth.tar")
        sequencer.save_weights(sequencer.create_model("sequencer2d_tiny"), tmp_path / "w.safetensors")
        plot_training_curves(history, tmp_path / "curves.png")
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "last.pth.tar": mode,
        "w.safetensors": mode,
        "curves.png": mode,
    }


class Payload:
    """What a hostile checkpoint hides: unpickling it creates the file MARKER, harmlessly, if code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint with real weights and a payload beside them, and the marker its code would create."""
    marker, path = tmp_path / "payload_ran", tmp_path / "hostile.pth"
    weights = sequencer.create_model("sequencer2d_tiny").state_dict()
    torch.save({"state_dict": weights, "extra": Payload(marker)}, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_unless_asked_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, marker = _hostile(tmp_path)
    with pytest.raises(CheckpointError, match=r"hostile\.pth holds Python objects \(.*mkdir\).*--unsafe-load"):
        read_file(path)
    with pytest.raises(CheckpointError, match="refused"):
        sequencer.create_model("sequencer2d_tiny", pretrained=path)
    assert not marker.exists()
    with caplog.at_level(logging.WARNING):
        sequencer.create_model("sequencer2d_tiny", pretrained=path, unsafe_load=True)
    assert marker.exists() and "it can run code from the file" in caplog.text  # the flag really is full pickle


def test_timm_training_checkpoints_with_their_namespace_load_without_the_flag(tmp_path: Path) -> None:
    model = _randomised("sequencer2d_tiny")
    path = tmp_path / "timm_train.pth.tar"
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    loaded = sequencer.create_model("sequencer2d_tiny", pretrained=path).eval()
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("damage", ["truncated", "text", "csv", "random", "empty", "safetensors"])
def test_unreadable_files_raise_checkpoint_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.pth"
    torch.save(sequencer.create_model("sequencer2d_tiny").state_dict(), good)
    data = good.read_bytes()
    path = tmp_path / ("bad.safetensors" if damage == "safetensors" else "bad.pth")
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "text": b"hello, I am not a checkpoint\n",
            "csv": b"epoch,loss\n1,2.5\n",
            "random": np.random.default_rng(0).bytes(4096),
            "empty": b"",
            "safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        }[damage]
    )
    with pytest.raises(CheckpointError, match=str(path)) as info:
        read_file(path)
    if damage in ("text", "csv", "empty"):  # not what an unpickler makes of the bytes ("KeyError: 101")
        assert "not a torch checkpoint" in str(info.value) and "Error" not in str(info.value)


def test_a_safetensors_file_named_pth_says_so(tmp_path: Path) -> None:
    sequencer.save_weights(sequencer.create_model("sequencer2d_tiny"), tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").rename(tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"w\.pth is not a torch checkpoint .*a safetensors file: name it"):
        read_file(tmp_path / "w.pth")


@pytest.mark.parametrize(
    "command",
    [
        "predict {images} --model sequencer2d_tiny --checkpoint {ckpt} -j 0",
        "validate --model sequencer2d_tiny --checkpoint {ckpt} -j 0",
        "export --model sequencer2d_tiny --checkpoint {ckpt} -o {out}/m.pt",
        "train --model sequencer2d_tiny --img-size 16 -b 8 -j 0 --epochs 2 --resume {ckpt} --output {out}/run",
        "train --model sequencer2d_tiny --img-size 16 -b 8 -j 0 --initial-checkpoint {ckpt} --output {out}/run",
    ],
)
def test_every_command_refuses_a_hostile_checkpoint_in_one_line(assert_refused, tmp_path: Path, command: str) -> None:
    path, marker = _hostile(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "red.png")
    argv = command.format(images=images, ckpt=path, out=tmp_path / "out").split()
    assert_refused(*argv, match="refused", absent=[marker, tmp_path / "out"])


def test_a_safetensors_file_whose_header_length_starts_like_onnx_is_read_as_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path, weights = tmp_path / "w.safetensors", {"w": torch.ones(2)}
    save_file(weights, path, metadata={"pad": ""})
    length = int.from_bytes(path.read_bytes()[:8], "little")
    # Pad the header so that its length's first byte is 0x08, the first byte of every ONNX file.
    save_file(weights, path, metadata={"pad": "x" * ((8 - length) % 256)})
    assert path.read_bytes()[0] == 8
    assert torch.equal(extract_state_dict(read_file(path))["w"], weights["w"])


@pytest.mark.parametrize("remote", [False, True], ids=["file", "hf-hub"])
@pytest.mark.parametrize(
    "command",
    [
        "validate {data} -b 4 -j 0",
        "resolution {data} --sizes 32,24 -b 4 -j 0 --out {out}",
        "erf --num-images 2 -b 2 --out {out}",
    ],
)
def test_a_command_reads_its_checkpoint_once(
    run_cli,
    make_image_tree,
    tiny_model,
    fill_hub_cache,
    offline_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    remote: bool,
) -> None:
    # The model's name, classes, trained input and weights all come from one read of the file, passed on; an
    # hf-hub: checkpoint is fetched by the builder and read the same way, from the cache.
    data = make_image_tree(tmp_path / "data", classes=3, per_class=2, size=32, splits=("val",))
    weights = tmp_path / "tiny.safetensors"
    sequencer.save_weights(tiny_model(3), weights)
    flags = ["--checkpoint", weights]
    if remote:  # weights without a record: --model names them
        fill_hub_cache(offline_cache, "someone/tiny", "model.safetensors", tiny_model(3).state_dict())
        flags = ["--model", "sequencer2d_tiny", "--checkpoint", "hf-hub:someone/tiny"]
        weights = next(offline_cache.rglob("model.safetensors"))
    reads: list[Path] = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, **kw: reads.append(Path(path)) or real(path, **kw))
    assert run_cli(command.format(data=data, out=tmp_path / "out"), *flags) == 0
    assert reads == [weights]
