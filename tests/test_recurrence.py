"""The fused and Triton BiLSTM2D recurrences against the nn.LSTM/GRU/RNN reference: outputs and gradients."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from sequencer.kernels import onednn
from sequencer.model import RNN2D, Linear, Mlp, create_model
from sequencer.recurrence import (
    FUSED_MIN_TOKENS,
    FusedScan,
    pack_weights,
    resolve_impl,
    scan_out_of_place,
)

CELLS = ("lstm", "gru", "rnn")
UNIONS = ("cat", "add", "vertical", "horizontal")
CASES = list(itertools.product(CELLS, UNIONS, (True, False)))


def _mixer(cell: str, union: str, bidirectional: bool, dim: int = 16, hidden: int = 8, seed: int = 0) -> RNN2D:
    torch.manual_seed(seed)
    return RNN2D(dim, hidden, cell=cell, bidirectional=bidirectional, union=union, with_fc=True)


def _outputs_and_grads(mixer: RNN2D, impl: str, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    mixer.rnn_impl = impl
    x = x.detach().requires_grad_()
    y = mixer(x)
    grads = torch.autograd.grad(y, [x, *mixer.parameters()], upstream)
    return [y, *grads]


def _assert_matches_reference(mixer: RNN2D, impl: str, x: torch.Tensor, atol: float, rtol: float) -> None:
    upstream = torch.randn(*x.shape[:3], mixer.fc.out_features, dtype=x.dtype)
    expected = _outputs_and_grads(mixer, "reference", x, upstream)
    got = _outputs_and_grads(mixer, impl, x, upstream)
    names = ["output", "input grad", *(f"grad {n}" for n, _ in mixer.named_parameters())]
    for name, a, b in zip(names, got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("cell", "union", "bidirectional"), CASES)
def test_fused_matches_reference_in_float32(cell: str, union: str, bidirectional: bool) -> None:
    mixer = _mixer(cell, union, bidirectional)
    for shape in [(2, 6, 6, 16), (2, 4, 7, 16)]:  # square: all directions in one loop; oblong: one loop per axis
        _assert_matches_reference(mixer, "fused", torch.randn(shape), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_fused_under_bfloat16_autocast_is_as_close_as_the_reference(cell: str) -> None:
    mixer = _mixer(cell, "cat", True)
    x = torch.randn(2, 6, 6, 16)
    upstream = torch.randn(2, 6, 6, 16)
    exact = _outputs_and_grads(mixer, "reference", x, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _outputs_and_grads(mixer, "reference", x, upstream)
        fused = _outputs_and_grads(mixer, "fused", x, upstream)
    assert fused[0].dtype == reference[0].dtype == torch.bfloat16
    for e, r, f in zip(exact, reference, fused, strict=True):
        scale = e.abs().max().item()
        reference_error = (r.float() - e).abs().max().item()
        fused_error = (f.float() - e).abs().max().item()
        # bfloat16 keeps ~3 significant digits; the fused path must not be (much) worse than nn.LSTM under autocast.
        assert fused_error <= max(2 * reference_error, 2e-2 * scale), (fused_error, reference_error, scale)


def test_out_of_place_scan_for_torch_compile_matches_fused() -> None:
    for cell in CELLS:
        mixer = _mixer(cell, "cat", True).double()
        projected = torch.randn(
            2, 5, 5, len(mixer.directions) * {"lstm": 4, "gru": 3, "rnn": 1}[cell] * 8, dtype=torch.float64
        )
        _, _, w_hh_t, b_hn = pack_weights(mixer._recurrent_weights(), cell)
        expected = FusedScan.apply(projected, w_hh_t, b_hn, cell, mixer.directions, False)
        got = scan_out_of_place(projected, w_hh_t, b_hn, cell, mixer.directions)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_backward_twice_through_the_fused_graph_is_refused_clearly() -> None:
    mixer = _mixer("lstm", "cat", True)
    mixer.rnn_impl = "fused"
    y = mixer(torch.randn(1, 4, 4, 16, requires_grad=True)).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.backward()


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels, in Triton's interpreter on the CPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def interpreted_triton(monkeypatch: pytest.MonkeyPatch):
    """sequencer.kernels.triton_scan re-imported with TRITON_INTERPRET=1, restored afterwards."""
    pytest.importorskip("triton")
    module = importlib.import_module("sequencer.kernels.triton_scan")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield importlib.reload(module)
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(module)


@pytest.mark.parametrize(("cell", "union", "bidirectional"), CASES)
def test_triton_kernel_matches_reference_in_float32(interpreted_triton, cell: str, union: str, bidirectional: bool):
    mixer = _mixer(cell, union, bidirectional)
    for shape in [(2, 6, 6, 16), (2, 4, 7, 16)]:
        _assert_matches_reference(mixer, "triton", torch.randn(shape), atol=1e-5, rtol=1e-5)


def test_triton_kernel_with_padded_tiles_and_several_programs(interpreted_triton) -> None:
    # hidden 20 pads to 32-wide tiles; 3 x 9 = 27 sequences per axis span two 16-row programs.
    mixer = _mixer("lstm", "cat", True, dim=24, hidden=20)
    _assert_matches_reference(mixer, "triton", torch.randn(3, 9, 9, 24), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_triton_kernel_in_float16_stays_within_half_precision(interpreted_triton, cell: str) -> None:
    mixer = _mixer(cell, "cat", True)
    x = torch.randn(2, 5, 5, 16)
    mixer.rnn_impl = "reference"
    expected = mixer(x)
    half = _mixer(cell, "cat", True).half()
    half.rnn_impl = "triton"
    x_half = x.half().requires_grad_()
    got = half(x_half)
    got.float().sum().backward()
    torch.testing.assert_close(got.float(), expected, atol=3e-3, rtol=1e-2)
    assert x_half.grad is not None and torch.isfinite(x_half.grad).all()


def test_triton_without_gpu_or_interpreter_says_why() -> None:
    pytest.importorskip("triton")
    module = importlib.import_module("sequencer.kernels.triton_scan")
    if module.INTERPRETED:
        pytest.skip("the kernels were imported in interpreter mode")
    mixer = _mixer("lstm", "cat", True)
    mixer.rnn_impl = "triton"
    with pytest.raises(RuntimeError, match=r"CUDA tensors.*TRITON_INTERPRET=1"):
        mixer(torch.randn(1, 4, 4, 16))


# ----------------------------------------------------------------------------------------------------------------
# The model: choosing implementations, checkpoints, torch.compile, TorchScript, gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


def test_auto_picks_fused_for_cpu_training_on_large_maps_only() -> None:
    def maps(batch: int, height: int, width: int) -> torch.Tensor:
        return torch.zeros(1, 1, 1, 8).expand(batch, height, width, 8)

    side = 32
    batch = FUSED_MIN_TOKENS // side**2
    assert resolve_impl("auto", maps(batch, side, side), 48, needs_backward=True) == "fused"
    assert resolve_impl("auto", maps(batch, side, side), 48, needs_backward=False) == "reference"
    assert resolve_impl("auto", maps(batch, side, side - 1), 48, needs_backward=True) == "reference"
    assert resolve_impl("triton", maps(1, 4, 4), 48, needs_backward=False) == "triton"


def test_rnn_impl_is_a_model_option_and_keeps_the_checkpoint_layout() -> None:
    model = create_model("sequencer2d_tiny", rnn_impl="fused")
    mixers = [m for m in model.modules() if isinstance(m, RNN2D)]
    assert mixers and all(m.rnn_impl == "fused" for m in mixers)
    assert "stages.0.blocks.0.rnn_tokens.rnn_v.weight_ih_l0_reverse" in model.state_dict()
    reference = create_model("sequencer2d_tiny", rnn_impl="reference")
    reference.load_state_dict(model.state_dict())
    model.set_rnn_impl("reference")
    assert all(m.rnn_impl == "reference" for m in mixers)
    with pytest.raises(ValueError, match=r"unknown rnn_impl 'cudnn'.*'auto', 'reference', 'fused', 'triton'"):
        model.set_rnn_impl("cudnn")
    with pytest.raises(ValueError, match="unknown rnn_impl"):
        create_model("sequencer2d_tiny", rnn_impl="fast")


def _tiny_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_model("sequencer2d_tiny")
    torch.nn.init.normal_(model.head.fc.weight, std=0.1)  # the zero-initialised head would hide differences
    reference = create_model("sequencer2d_tiny", rnn_impl="reference")
    reference.load_state_dict(model.state_dict())
    return model, reference


@pytest.mark.slow
def test_torch_compile_with_default_settings_trains_at_several_resolutions() -> None:
    model, reference = _tiny_pair()
    compiled = torch.compile(model)
    target = torch.tensor([1, 2])
    for size in (16, 24):  # the second size recompiles with dynamic spatial sizes
        x = torch.randn(2, 3, size, size)
        logits = compiled(x)
        expected = reference(x)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        F.cross_entropy(logits, target).backward()
        F.cross_entropy(expected, target).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
        model.zero_grad()
        reference.zero_grad()


def test_torchscript_runs_the_reference_path() -> None:
    model, reference = _tiny_pair()
    model.set_rnn_impl("fused")
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), reference(x), atol=1e-6, rtol=1e-6)


def test_fused_path_under_gradient_checkpointing_gives_the_reference_gradients() -> None:
    model, reference = _tiny_pair()
    model.set_rnn_impl("fused")
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 2])
    for net in (model, reference):
        F.cross_entropy(net(x), target).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_onednn_linear_matches_f_linear_forward_and_backward() -> None:
    x = torch.randn(3, 5, 7, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    if not onednn.applies(x):
        pytest.skip("torch was built without oneDNN")
    upstream = torch.randn(3, 5, 7, 40)
    got = onednn.OneDnnLinear.apply(x, weight, bias)
    grads = torch.autograd.grad(got, [x, weight, bias], upstream)
    expected = F.linear(x, weight, bias)
    expected_grads = torch.autograd.grad(expected, [x, weight, bias], upstream)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)


def test_block_linears_run_on_onednn_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    if not onednn.applies(torch.empty(1)):
        pytest.skip("torch was built without oneDNN")
    calls = []
    original = onednn.OneDnnLinear.apply
    monkeypatch.setattr(onednn.OneDnnLinear, "apply", lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(0)
    mlp = Mlp(24, 72)
    plain = torch.nn.Sequential(torch.nn.Linear(24, 72), torch.nn.GELU(), torch.nn.Linear(72, 24))
    plain.load_state_dict(
        {"0.weight": mlp.fc1.weight, "0.bias": mlp.fc1.bias, "2.weight": mlp.fc2.weight, "2.bias": mlp.fc2.bias}
    )
    assert isinstance(mlp.fc1, Linear) and isinstance(mlp.fc2, Linear)
    x = torch.randn(2, 5, 5, 24)
    torch.testing.assert_close(mlp(x), plain(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x)
    mlp.double()(x.double())
    assert len(calls) == 2  # autocast and float64 take F.linear
    torch.testing.assert_close(torch.jit.script(mlp)(x.double()), plain.double()(x.double()))
