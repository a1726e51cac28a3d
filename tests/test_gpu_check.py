"""benchmarks/gpu_check.py (`make gpu-check`) on the CPU: its checks catch wrong results, and --tiny runs end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHAPE = (2, 5, 6, 16, 8)


@pytest.mark.parametrize("impl", ["reference", "fused", "compiled"])
def test_every_implementation_passes_the_check_in_float32(gpu_check, impl: str) -> None:
    row = gpu_check.check_implementation(impl, "lstm", "float32", torch.device("cpu"), SHAPE)
    assert row["ok"] and row["error"] is None and row["output_error"] < 1e-5 and row["gradient_error"] < 1e-5, row


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_wrong_implementation_fails_the_check(gpu_check, cell: str) -> None:
    def time_reversed(mixer, x):  # every direction scanned the wrong way round
        mixer.rnn_impl = "reference"
        return mixer(x.flip(1, 2))

    def slightly_off(mixer, x):  # right gradients, an output 1% too large
        mixer.rnn_impl = "fused"
        y = mixer(x)
        return y + 0.01 * y.detach()

    def cannot_launch(mixer, x):
        raise RuntimeError("out of resources")

    for wrong in (time_reversed, slightly_off, cannot_launch):
        row = gpu_check.check_implementation(wrong, cell, "float32", torch.device("cpu"), SHAPE)
        assert not row["ok"], (wrong.__name__, row)
    assert row["error"] == "RuntimeError: out of resources"


def test_relative_error_is_scaled_by_the_truth_and_infinite_for_nan(gpu_check) -> None:
    truth = [torch.tensor([2.0, -4.0], dtype=torch.float64)]
    assert gpu_check.relative_errors([torch.tensor([2.0, -3.0])], truth) == [0.25]
    assert gpu_check.relative_errors([torch.tensor([2.0, float("nan")])], truth) == [float("inf")]


@pytest.mark.slow
def test_tiny_run_writes_the_report_and_the_figure(gpu_check, tmp_path: Path) -> None:
    output = tmp_path / "gpu_check"
    argv = ["--tiny", "--device", "cpu", "--compile-backend", "aot_eager", "--output", str(output)]
    assert gpu_check.main(argv) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    assert output.with_suffix(".png").stat().st_size > 10_000
    assert report["ok"] and report["tiny"] and report["environment"]["device"] == "cpu" and report["errors"] == []
    assert {(r["cell"], r["impl"]) for r in report["implementations"]} == {
        (cell, impl) for cell in ("lstm", "gru", "rnn") for impl in ("reference", "fused", "compiled")
    }
    training = report["training"]
    assert len(training["losses"]) == training["steps"] and training["last_loss"] < training["first_loss"] / 3
    variants = {(r["model"], r["variant"], r["mode"]) for r in report["throughput"]}
    ours = {f"ours({impl})" for impl in ("auto", "reference", "fused", "compiled")}
    assert variants == {("sequencer2d_tiny", v, mode) for v in ours for mode in ("train", "infer")} | {
        (peer, "timm", mode) for peer in ("test_vit", "test_convnext") for mode in ("train", "infer")
    }
    for r in report["throughput"] + report["memory_vs_resolution"]:
        assert r["images_per_s"] > 0 and r["peak_memory_mib"] is None  # GPU memory only
    assert sorted({r["resolution"] for r in report["memory_vs_resolution"]}) == [32, 48]
