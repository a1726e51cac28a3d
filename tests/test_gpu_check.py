"""benchmarks/gpu_check.py (`make gpu-check`) on the CPU: its checks catch wrong results; --mode tiny runs through."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sequencer.model import BiLSTM2D
from sequencer.recurrence import library_rnn2d, recurrent_weights

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


def test_the_block_diagonal_lstm_is_the_two_axis_lstms_exactly(gpu_check) -> None:
    """The candidate of part 4: one LSTM with block-diagonal weights gives the reference's outputs and gradients."""
    torch.manual_seed(0)
    mixer = BiLSTM2D(6, 4).double()
    x = torch.randn(2, 5, 5, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 5, 16, dtype=torch.float64)
    params = [x, *recurrent_weights(mixer.rnns)]
    reference = library_rnn2d(x, params[1:], "lstm", "vh", True, train=True)
    weights = gpu_check.block_diagonal_weights(mixer.rnn_v, mixer.rnn_h)
    candidate = gpu_check.block_diagonal_rnn2d(x, gpu_check.block_diagonal_lstm(weights, train=True))
    assert (candidate - reference).abs().max() < 1e-12
    for got, want in zip(
        torch.autograd.grad(candidate, params, upstream), torch.autograd.grad(reference, params, upstream), strict=True
    ):
        assert (got - want).abs().max() < 1e-12
    module = gpu_check.block_diagonal_module(mixer.float())
    with torch.no_grad():
        as_module = gpu_check.block_diagonal_rnn2d(x.float(), lambda z: module(z)[0])
    assert (as_module.double() - reference).abs().max() < 1e-5


def test_a_block_diagonal_lstm_with_the_axes_swapped_is_caught(gpu_check) -> None:
    """The exactness test above can fail: the horizontal net's blocks where the vertical's belong differ."""
    torch.manual_seed(0)
    mixer = BiLSTM2D(6, 4).double()
    x = torch.randn(2, 5, 5, 6, dtype=torch.float64)
    reference = library_rnn2d(x, recurrent_weights(mixer.rnns), "lstm", "vh", True, train=False)
    weights = gpu_check.block_diagonal_weights(mixer.rnn_h, mixer.rnn_v)
    swapped = gpu_check.block_diagonal_rnn2d(x, gpu_check.block_diagonal_lstm(weights, train=False))
    assert (swapped - reference).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_gpu_modes_refuse_in_one_line_without_cuda(gpu_check, mode: str, tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--mode", mode, "--output", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "CUDA" in out and "--mode tiny" in out
    assert not list(tmp_path.iterdir())


def test_a_run_cut_off_keeps_the_parts_it_finished(gpu_check, tmp_path: Path, monkeypatch) -> None:
    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt  # as a time limit would end the run

    monkeypatch.setattr(gpu_check, "MODES", {"tiny": dict(gpu_check.TINY, cells=("lstm",), train_steps=4)})
    monkeypatch.setattr(gpu_check, "measure_throughput", cut_off)
    output = tmp_path / "gpu_check"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--mode", "tiny", "--device", "cpu", "--output", str(output)])
    report = json.loads(output.with_suffix(".json").read_text())
    assert len(report["implementations"]) == 3 and report["training"][0]["steps"] == 4
    assert report["ok"] is None and report["environment"]["device"] == "cpu"


@pytest.mark.slow
def test_tiny_run_writes_the_report_and_the_figure(gpu_check, tmp_path: Path) -> None:
    output = tmp_path / "gpu_check"
    argv = ["--mode", "tiny", "--device", "cpu", "--compile-backend", "aot_eager", "--output", str(output)]
    assert gpu_check.main(argv) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    assert output.with_suffix(".png").stat().st_size > 10_000
    assert report["ok"] and report["mode"] == "tiny" and report["environment"]["device"] == "cpu"
    assert report["errors"] == []
    assert {(r["cell"], r["impl"]) for r in report["implementations"]} == {
        (cell, impl) for cell in ("lstm", "gru", "rnn") for impl in ("reference", "fused", "compiled")
    }
    (training,) = report["training"]
    assert len(training["losses"]) == training["steps"] and training["last_loss"] < training["first_loss"] / 3
    implementations = {(r["model"], r["implementation"], r["mode"]) for r in report["throughput"]}
    ours = {f"ours({impl})" for impl in ("auto", "reference", "fused", "compiled")}
    assert implementations == {("sequencer2d_tiny", v, mode) for v in ours for mode in ("train", "infer")} | {
        (peer, "timm", mode) for peer in ("test_vit", "test_convnext") for mode in ("train", "infer")
    }
    for r in report["throughput"] + report["memory_vs_resolution"]:
        assert r["images_per_s"] > 0 and r["peak_memory_mib"] is None  # GPU memory only
    assert sorted({r["resolution"] for r in report["memory_vs_resolution"]}) == [32, 48]
    assert {(r["implementation"], r["passes"]) for r in report["candidate"]} == {
        (v, p) for v in ("two calls (reference)", "one block-diagonal call") for p in ("forward", "forward+backward")
    }
    profile = report["profile"]
    assert profile["host_ms"] > 0 and profile["top_host_ops"] and profile["top_kernels"] == []  # no device here
