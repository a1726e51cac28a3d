"""The fused recurrence and the torch.compile op against the nn.LSTM/GRU/RNN reference: outputs and gradients;
which of them a mixer runs."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import sequencer
from sequencer import recurrence
from sequencer.builder import create_model
from sequencer.kernels import onednn
from sequencer.kernels.onednn import FastLinear
from sequencer.model import BiLSTM1D, BiLSTM2D, SequencerBlock, route
from sequencer.recurrence import rnn2d

CELLS = ("lstm", "gru", "rnn")
UNIONS = ("cat", "add", "vertical", "horizontal")
CASES = list(itertools.product(CELLS, UNIONS, (True, False)))


def _mixer(cell: str, union: str, bidirectional: bool, dim: int = 16, hidden: int = 8, seed: int = 0) -> BiLSTM2D:
    """A routed mixer (its `rnn_impl` chooses the path) with seeded weights."""
    torch.manual_seed(seed)
    mixer = BiLSTM2D(dim, hidden, cell=cell, bidirectional=bidirectional, union=union, with_fc=True)
    route(mixer, rnn_impl="reference")
    return mixer


def _outputs_and_grads(mixer: BiLSTM2D, impl: str, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    mixer.rnn_impl = impl
    x = x.detach().requires_grad_()
    y = mixer(x)
    grads = torch.autograd.grad(y, [x, *mixer.parameters()], upstream)
    return [y, *grads]


def _assert_matches_reference(mixer: BiLSTM2D, impl: str, x: torch.Tensor, atol: float, rtol: float) -> None:
    with torch.no_grad():
        upstream = torch.randn_like(mixer(x))
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


@pytest.mark.parametrize("supported", [False, True])
def test_cpu_autocast_runs_the_recurrence_in_float32_where_onednn_has_no_bfloat16_rnn(
    supported: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if supported and not recurrence.cpu_has_low_precision_rnn():
        pytest.skip("this CPU has no AVX-512: oneDNN cannot build a bfloat16 LSTM here")
    monkeypatch.setattr(recurrence, "cpu_has_low_precision_rnn", lambda: supported)
    model = sequencer.create_model("sequencer2d_tiny", rnn_impl="reference").eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exact = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16 and (low.float() - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize(
    ("device", "autocast_dtype", "cpu_low_precision", "expected"),
    [
        ("cuda", torch.float16, None, torch.float16),  # cuDNN's half kernels; train adds a GradScaler
        ("cuda", torch.bfloat16, None, torch.float32),  # autocast would make it float16, unscaled: float32 instead
        ("cpu", torch.bfloat16, True, torch.bfloat16),  # oneDNN's bfloat16 LSTM (AVX-512)
        ("cpu", torch.float16, True, torch.float16),
        ("cpu", torch.bfloat16, False, torch.float32),  # no low-precision LSTM on AVX2
    ],
)
def test_recurrence_dtype_is_the_autocast_dtype_only_where_the_kernels_run_it_as_asked(
    device: str, autocast_dtype: torch.dtype, cpu_low_precision: bool | None, expected: torch.dtype
) -> None:
    assert recurrence.recurrence_dtype(device, autocast_dtype, cpu_low_precision) == expected


def test_a_float32_recurrence_dtype_runs_every_lstm_in_float32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The branch CUDA's bfloat16 autocast takes, driven on the CPU: the LSTMs see float32, the model still runs."""
    monkeypatch.setattr(recurrence, "recurrence_dtype", lambda *_: torch.float32)
    model = sequencer.create_model("sequencer2d_tiny", rnn_impl="reference").eval()
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, torch.nn.LSTM):
            module.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].dtype))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        weights = recurrence.recurrent_weights(next(m for m in model.modules() if isinstance(m, BiLSTM2D)).rnns)
        compiled = recurrence.compiled_rnn2d(torch.randn(1, 4, 4, weights[0].shape[1]), weights, "lstm", "vh", True)
    assert seen and set(seen) == {torch.float32} and logits.dtype == torch.bfloat16
    assert compiled.dtype == torch.float32  # the torch.compile op follows the same choice


def test_backward_twice_through_the_fused_graph_is_refused_clearly() -> None:
    mixer = _mixer("lstm", "cat", True)
    mixer.rnn_impl = "fused"
    y = mixer(torch.randn(1, 4, 4, 16, requires_grad=True)).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.backward()


# ----------------------------------------------------------------------------------------------------------------
# The recurrence as one custom op (what torch.compile runs)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "union", "bidirectional"), CASES)
def test_custom_op_matches_the_reference_outputs_and_gradients(cell: str, union: str, bidirectional: bool) -> None:
    mixer = _mixer(cell, union, bidirectional)
    x = torch.randn(2, 4, 5, 16, requires_grad=True)
    # The paper's forward without its projection and union: the axes' outputs side by side, as the op returns them.
    mixer.fc, mixer.union = torch.nn.Identity(), "cat" if union == "add" else union
    expected = BiLSTM2D.forward(mixer, x)
    axes = {"vertical": "v", "horizontal": "h"}.get(union, "vh")
    got = rnn2d(x, recurrence.recurrent_weights(mixer.rnns), cell, axes, bidirectional)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    upstream = torch.randn_like(got)
    inputs = [x, *mixer.parameters()]
    expected_grads = torch.autograd.grad(expected, inputs, upstream, allow_unused=True)
    got_grads = torch.autograd.grad(got, inputs, upstream, allow_unused=True)
    for e, g in zip(expected_grads, got_grads, strict=True):
        assert (e is None) == (g is None)
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_custom_op_passes_torch_library_opcheck() -> None:
    # Schema, fake (meta) implementation, autograd registration and dispatch, as torch.compile relies on them.
    mixer = _mixer("lstm", "cat", True)
    weights = [w.detach().requires_grad_() for w in recurrence.recurrent_weights(mixer.rnns)]
    torch.library.opcheck(rnn2d, (torch.randn(2, 3, 4, 16, requires_grad=True), weights, "lstm", "vh", True))


# ----------------------------------------------------------------------------------------------------------------
# The model: choosing implementations, checkpoints, torch.compile, TorchScript, gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


def test_auto_runs_torchs_rnn_layers_in_eager_mode_and_fused_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # No choice by timing: a training step under "auto" calls the nn.LSTMs, whatever the processor would measure.
    calls: list[str] = []
    fused = recurrence.fused_rnn2d
    monkeypatch.setattr(sequencer.model, "fused_rnn2d", lambda *args: calls.append("fused") or fused(*args))
    mixer = _mixer("lstm", "cat", True)
    mixer.rnn_impl = "auto"
    for rnn in mixer.rnns:
        rnn.register_forward_pre_hook(lambda *_: calls.append("nn.LSTM"))
    x = torch.randn(2, 6, 6, 16, requires_grad=True)
    mixer(x).sum().backward()
    assert calls == ["nn.LSTM", "nn.LSTM"]
    mixer.rnn_impl = "fused"
    mixer(x).sum().backward()
    assert calls == ["nn.LSTM", "nn.LSTM", "fused"]


def test_the_mixers_read_their_weights_from_a_list_kept_when_the_parameters_are_replaced() -> None:
    # The fused path and the compiled op read `flat_weights` (dynamo cannot touch an nn.LSTM): no list is rebuilt
    # per call, and .to() and loading with assign=True, which make new parameters, refresh it.
    model = create_model("sequencer2d_tiny", rnn_impl="fused")
    mixer = model.stages[0].blocks[0].rnn_tokens
    assert mixer.flat_weights == recurrence.recurrent_weights(mixer.rnns)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model.double()
    assert all(w is v for w, v in zip(mixer.flat_weights, recurrence.recurrent_weights(mixer.rnns), strict=True))
    assert {w.dtype for w in mixer.flat_weights} == {torch.float64}
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fused = model(x)
    with route(model, rnn_impl="reference"):
        torch.testing.assert_close(fused, model(x))


@pytest.mark.parametrize("cell", CELLS)
def test_fused_vanilla_mixer_matches_reference(cell: str) -> None:
    torch.manual_seed(0)
    mixer = BiLSTM1D(16, 8, cell=cell)
    _assert_matches_reference(mixer, "fused", torch.randn(2, 3, 5, 16), atol=1e-5, rtol=1e-5)


def test_rnn_impl_is_a_model_option_and_keeps_the_checkpoint_layout() -> None:
    model = create_model("sequencer2d_tiny", rnn_impl="fused")
    mixers = [m for m in model.modules() if isinstance(m, BiLSTM2D)]
    assert mixers and all(m.rnn_impl == "fused" for m in mixers)
    assert "stages.0.blocks.0.rnn_tokens.rnn_v.weight_ih_l0_reverse" in model.state_dict()
    reference = create_model("sequencer2d_tiny", rnn_impl="reference")
    reference.load_state_dict(model.state_dict())
    route(model, rnn_impl="reference")
    assert all(m.rnn_impl == "reference" for m in mixers)
    with pytest.raises(ValueError, match=r"unknown rnn_impl 'cudnn'; expected one of \('auto', 'reference', 'fused'\)"):
        route(model, rnn_impl="cudnn")
    with pytest.raises(ValueError, match="unknown rnn_impl"):
        create_model("sequencer2d_tiny", rnn_impl="fast")


def test_the_removed_triton_kernel_is_refused_with_the_supported_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown rnn_impl 'triton'; expected one of \('auto', 'reference', 'fused'\)"
    ):
        create_model("sequencer2d_tiny", rnn_impl="triton")
    with pytest.raises(ValueError, match="unknown rnn_impl 'triton'"):
        route(BiLSTM2D(16, 8), rnn_impl="triton")


@pytest.mark.parametrize("mixer", ["2d", "1d"])
def test_eval_mode_input_gradients_run_the_recurrent_layers_in_train_mode(mixer: str) -> None:
    # cuDNN refuses an RNN backward in eval mode: the model switches its nn.LSTMs while a backward will follow.
    torch.manual_seed(0)
    overrides = dict(mixer="1d", hidden_sizes=(32, 64, 64, 64)) if mixer == "1d" else {}
    # The reference path, whose nn.LSTMs must switch (auto might train on the fused path, or measure both).
    model = create_model("sequencer2d_tiny", rnn_impl="reference", **overrides).eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.1)
    rnns = [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    modes: list[bool] = []
    for rnn in rnns:
        rnn.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert modes == [False] * len(rnns)
    modes.clear()
    x.requires_grad_()
    got = model(x)
    assert modes == [True] * len(rnns)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tracing_an_eval_model_leaves_the_recurrent_layers_in_eval_mode() -> None:
    # A trace records the modules as they are: switching them to train mode inside it fails the trace's own check.
    model = create_model("sequencer2d_tiny").eval()
    modes: list[bool] = []
    for rnn in (m for m in model.modules() if isinstance(m, torch.nn.LSTM)):
        rnn.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    x = torch.randn(1, 3, 32, 32)
    traced = torch.jit.trace(model, x)
    assert modes and not any(modes)
    torch.testing.assert_close(traced(x), model(x))


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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "backend"),
    [
        # aot_eager traces the graphs and their backward as inductor would, without its code generation (minutes
        # cold); inductor itself is covered by test_torch_compile_with_default_settings_trains_at_several_resolutions.
        ({}, "aot_eager"),
        ({"cell": "gru"}, "aot_eager"),
        ({"cell": "rnn"}, "aot_eager"),
        ({"mixer": "1d", "hidden_sizes": (32, 64, 64, 64)}, "aot_eager"),
    ],
    ids=["lstm", "gru", "rnn", "vanilla-1d"],
)
def test_torch_compile_is_one_graph_and_trains_like_eager(overrides: dict, backend: str) -> None:
    torch.manual_seed(0)
    model = create_model("sequencer2d_tiny", **overrides)
    torch.nn.init.normal_(model.head.fc.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 2])
    expected = model(x)
    F.cross_entropy(expected, target).backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    counter = CompileCounterWithBackend(backend)
    logits = torch.compile(model, backend=counter, fullgraph=True)(x)
    F.cross_entropy(logits, target).backward()
    assert counter.frame_count == 1  # no graph break at the recurrences: one graph for the whole model
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    for (name, p), e in zip(model.named_parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, e, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_torchscript_runs_the_reference_path() -> None:
    model, reference = _tiny_pair()
    route(model, rnn_impl="fused")
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), reference(x), atol=1e-6, rtol=1e-6)


def test_fused_path_under_gradient_checkpointing_gives_the_reference_gradients() -> None:
    model, reference = _tiny_pair()
    route(model, rnn_impl="fused")
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 2])
    for net in (model, reference):
        F.cross_entropy(net(x), target).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_onednn_linear_matches_f_linear_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn, "sgemm_trails_onednn", lambda: True)  # whatever this session's CPU vendor
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
    monkeypatch.setattr(onednn, "sgemm_trails_onednn", lambda: True)  # whatever this session's CPU vendor
    if not onednn.applies(torch.empty(1)):
        pytest.skip("torch was built without oneDNN")
    calls = []
    original = onednn.OneDnnLinear.apply
    monkeypatch.setattr(onednn.OneDnnLinear, "apply", lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(0)
    block = SequencerBlock(24, torch.nn.Identity(), 3.0, 0.0, 0.0)
    route(block, onednn_linear=True)
    mlp = block.mlp_channels
    plain = torch.nn.Sequential(torch.nn.Linear(24, 72), torch.nn.GELU(), torch.nn.Linear(72, 24))
    plain.load_state_dict(
        {"0.weight": mlp.fc1.weight, "0.bias": mlp.fc1.bias, "2.weight": mlp.fc2.weight, "2.bias": mlp.fc2.bias}
    )
    assert type(mlp.fc1) is FastLinear and type(mlp.fc2) is FastLinear
    x = torch.randn(2, 5, 5, 24)
    torch.testing.assert_close(mlp(x), plain(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x)
    mlp.double()(x.double())
    assert len(calls) == 2  # autocast and float64 take F.linear
    monkeypatch.setattr(onednn, "sgemm_trails_onednn", lambda: False)  # an Intel CPU: MKL's sgemm is as fast
    mlp.float()(x)
    assert len(calls) == 2
    mlp.double()
    torch.testing.assert_close(torch.jit.script(mlp)(x.double()), plain.double()(x.double()))


def test_compiling_under_autocast_draws_no_warning() -> None:
    """The compiled op asks which dtype the recurrences take: nothing dynamo traces there may warn (a cache did)."""
    torch._dynamo.reset()
    model = torch.compile(sequencer.create_model("sequencer2d_tiny").eval(), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        model(torch.randn(1, 3, 32, 32))
    assert [str(w.message) for w in caught] == []
