"""`sequencer export` / `sequencer.export`: every format written, reloaded by its own runtime, and matching PyTorch."""

from __future__ import annotations

import json
import re
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import sequencer
from sequencer import deploy
from sequencer.errors import MissingDependencyError, SequencerError, UsageError

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


def stored_config(path: Path, fmt: str) -> dict:
    """The preprocessing config the export wrote into the file, read with each format's own tools."""
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props[deploy.CONFIG_KEY])
    if fmt == "torchscript":
        extra = {deploy.CONFIG_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
            torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra[deploy.CONFIG_FILE])
    with zipfile.ZipFile(path) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(deploy.CONFIG_FILE)]
        return json.loads(archive.read(name))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_dynamic_batch_export_reloads_and_matches(
    run_cli,
    tiny_model,
    fmt: str,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    if fmt == "onnx":  # the session's one run of this command (test_inference.py reads its file too)
        path, out = request.getfixturevalue("onnx_export")
    else:
        path = tmp_path / f"tiny{SUFFIX[fmt]}"
        argv = ["--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint), "--format", fmt, "-o", str(path)]
        assert run_cli("export", *[*argv, "--dynamic-batch"]) == 0
        out = capsys.readouterr().out
    assert "passed" in out and "at batch 1" in out and "at batch 5" in out

    # Independently of the command's own check: a batch size it did not try, through the format's own runtime.
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_model()(x)
        actual = deploy.load_exported(path, fmt)(x)
    assert actual.shape == (3, 1000) and (actual - expected).abs().max().item() <= 1e-4
    config = stored_config(path, fmt)
    assert config["model_name"] == "sequencer2d_tiny" and config["input_size"] == [3, 32, 32]
    assert config["crop_pct"] == 1.0 and config["interpolation"] == "bicubic"


def test_static_export_is_fixed_to_its_batch_and_img_size(tiny_model, checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt2"
    result = sequencer.export(
        "sequencer2d_tiny", path, checkpoint=checkpoint, img_size=48, batch_size=2, dynamic_batch=False
    )
    assert result.passed and list(result.max_abs_diff) == [2] and result.input_size == (3, 48, 48)
    assert not result.trivial and result.quantization is None
    assert result.summary().splitlines()[1].startswith("check against PyTorch: max |logit diff| ")
    program = deploy.load_exported(path)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (program(x) - tiny_model()(x)).abs().max().item() <= 1e-4
    # torch 2.14 asserts in the program, torch 2.7 checks the input before running it
    with pytest.raises((AssertionError, RuntimeError), match=r"size\(\)\[0\] == 2|shape\[0\] to be equal to 2"):
        program(torch.randn(3, 3, 48, 48))


@pytest.mark.slow
def test_other_code_paths_export_to_onnx(tmp_path: Path) -> None:
    # The vanilla 1D mixer, a GRU cell and the learned position embedding, in a small module passed directly.
    model = sequencer.create_model(
        "v_sequencer_s_pe",
        num_classes=7,
        cell="gru",
        layers=(1, 1, 1, 1),
        patch_sizes=(4, 2, 1, 1),
        embed_dims=(32,) * 4,
        hidden_sizes=(16,) * 4,
        img_size=32,
    )
    torch.nn.init.normal_(model.head.fc.weight)
    model.train()
    result = sequencer.export(model, tmp_path / "v.onnx", dynamic_batch=True)
    assert result.passed and not result.trivial and sorted(result.max_abs_diff) == [1, 2, 5]
    assert model.training  # the caller's module is left as it was


def test_untrained_model_warns_and_says_the_check_is_trivial(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no checkpoint given"):
        result = sequencer.export("sequencer2d_tiny", tmp_path / "tiny.pt", batch_size=1, dynamic_batch=False)
    assert result.passed and result.trivial and "all reference logits are zero" in result.summary()


def test_bad_requests_give_clear_errors(assert_refused, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = ["export", "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint)]
    for flags, message in (
        (["-o", str(out / "model.bin")], "cannot tell the export format from"),
        (["-o", str(out / "model.pt"), "--img-size", "4"], "smaller than the 8x8"),
        (
            ["-o", str(out / "model.pt"), "--input-size", "1", "32", "32"],
            "the model takes 3 input channels but its input has 1",
        ),
        (["-o", str(out / "model.onnx"), "--dynamic-batch", "-b", "1"], "batch_size must be >= 2"),
        (["-o", str(out / "model.pt"), "--model", "sequencer2d_nope"], "unknown model 'sequencer2d_nope'"),
        (["-o", str(out / "model.pt"), "--checkpoint", str(out / "none.pth")], "checkpoint not found"),
        (["-o", str(out / "model.pt"), "--quantize", "int8"], "--quantize int8 needs the ONNX format"),
        (["-o", str(out / "m.onnx"), "--format", "torchscript", "--quantize", "int8"], "not torchscript"),
        (["-o", str(out / "m.pt"), "--format", "onnx"], "ONNX files must be named *.onnx"),
    ):
        assert_refused(*base, *flags, match=re.escape(message), absent=[out])
    with pytest.raises(UsageError, match=r"\*\.pt2"):
        sequencer.export("sequencer2d_tiny", out / "model.pt", "exported-program", checkpoint=checkpoint)
    assert not out.exists()  # nothing half-written, not even the folder


@pytest.mark.parametrize("package", deploy.ONNX_PACKAGES)
def test_onnx_export_without_its_packages_names_the_extra(
    assert_refused, package: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # what `import` sees for a package that is not installed
    out = tmp_path / "out" / "model.onnx"
    match = rf'error: ONNX export needs.*{package} not installed.*pip install "sequencer\[export\]"'
    argv = ["export", "--model", "sequencer2d_tiny", "--checkpoint", checkpoint, "-o", out]
    assert_refused(*argv, match=match, absent=[out.parent])  # refused before any work
    with pytest.raises(MissingDependencyError):
        deploy.load_exported(out)


def test_a_failed_check_keeps_the_file_beside_the_output_and_exits_1(
    run_cli,
    assert_refused,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A written file whose logits are off by 0.01: the check fails, which is the command's answer (exit 1 and the
    # whole report), not a refused request (exit 2). The good file already at -o is left as it was.
    path, failed = tmp_path / "tiny.pt", tmp_path / "tiny.failed.pt"
    path.write_bytes(b"a checked export")
    reload = deploy.load_exported
    monkeypatch.setattr(deploy, "load_exported", lambda path, fmt: lambda x: reload(path, fmt)(x) + 0.01)
    assert run_cli("export", "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint), "-o", str(path)) == 1
    err = capsys.readouterr().err
    assert "max |logit diff| 1.00e-02 at batch 2" in err and "FAILED" in err
    assert f"the file was kept at {failed}" in err and f"{path} was not replaced" in err
    assert path.read_bytes() == b"a checked export" and failed.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.failed.pt", "tiny.pt"]  # no temporary file left
    with pytest.raises(deploy.ExportCheckError) as raised:
        sequencer.export("sequencer2d_tiny", path, checkpoint=checkpoint)
    assert isinstance(raised.value, SequencerError)  # the API's callers catch every expected failure alike
    match = re.escape("argument --tolerance: -1 is out of range: it must be >= 0")
    assert_refused(
        "export", "--model", "sequencer2d_tiny", "-o", path, "--tolerance", "-1", match=match, unchanged=tmp_path
    )


def test_an_export_interrupted_during_its_check_leaves_the_output_as_it_was(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiny.pt"
    path.write_bytes(b"a checked export")

    def interrupted(path: Path, fmt: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "load_exported", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sequencer.export("sequencer2d_tiny", path, checkpoint=checkpoint, batch_size=1, dynamic_batch=False)
    assert path.read_bytes() == b"a checked export"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt"]  # no temporary file left


def test_a_bfloat16_module_is_exported_as_a_float32_copy(tiny_model, tmp_path: Path) -> None:
    model = tiny_model(num_classes=3).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="float32 copy of the bfloat16 model"):
        result = sequencer.export(model, tmp_path / "h.pt", batch_size=1, dynamic_batch=False, img_size=16)
    assert result.passed
    assert next(model.parameters()).dtype == torch.bfloat16  # the caller's module is left as it was


@pytest.mark.slow
def test_int8_export_is_quantized_checked_and_labelled(
    run_cli, tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    model = tiny_model(num_classes=3)
    model.pretrained_cfg["label_names"] = ["cat", "dog", "otter"]
    weights = tmp_path / "labelled.safetensors"
    sequencer.save_weights(model, weights)
    path = tmp_path / "tiny-int8.onnx"
    argv = ["--model", "sequencer2d_tiny", "--checkpoint", str(weights), "-o", str(path), "--dynamic-batch"]
    assert run_cli("export", *argv, "--quantize", "int8") == 0
    out = capsys.readouterr().out
    assert "wrote onnx with int8 weights" in out and "check of the float32 export against PyTorch" in out
    match = re.search(r"on the same 8 images: top-1 agreement (\d)/8 \(.*\), max \|logit diff\| (\S+)", out)
    assert match and int(match.group(1)) >= 6, out  # 2 + 1 + 5 check images; int8 keeps most top-1 classes
    # The weights really are int8 (integer MatMuls), the float file is gone, and the config says what was done.
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops and "MatMul" not in ops
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.safetensors", "tiny-int8.onnx"]
    config = stored_config(path, "onnx")
    assert config["quantization"] == "int8-dynamic" and config["class_names"] == ["cat", "dog", "otter"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (deploy.load_exported(path)(x) - model(x)).abs().max().item()
    assert diff > 1e-4  # the float32 export is within 1e-4 (the check above): this is the quantized file
    # predict labels the file's classes by the names stored in it, with no checkpoint or class map at hand.
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    [prediction] = sequencer.predict(tmp_path / "red.png", checkpoint=path, topk=3, threads=1)
    assert sorted(score.label for score in prediction.top) == ["cat", "dog", "otter"]
