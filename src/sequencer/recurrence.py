"""The recurrences of the mixers' kernels, below `sequencer.model`: a fused CPU path, a torch.compile op, and the
care torch's RNN layers need in eager mode. `BiLSTM2D.forward` (sequencer/model.py) shows which one runs.

The paper's formulation (`sequencer.model.BiLSTM2D`) makes two `nn.LSTM` calls on permuted copies of the map,
each with its own input projection and one direction after the other; on CUDA they run cuDNN's persistent RNN
kernels, on the CPU oneDNN's. The fused path (`scan`, `rnn_impl="fused"`) does this instead:

1. the input projections of every direction (vertical/horizontal, forward/backward) are one matmul of the
   normalised tokens, `P = x @ W_ih_all^T + b` of shape (B, H, W, K * G * D) for K directions and G gates;
2. `P` is laid out time-major per direction, (K, T, N, G * D), the backward directions stored time-reversed, so
   that step t of every direction is one slice: the recurrent matmuls of all directions are one batched matmul
   per step (on a square map the vertical and horizontal scans have the same length and run in the same loop);
3. the pointwise cell works in place on that slice, keeping what the backward pass needs (gate activations,
   cell states) in the same buffer, and a hand-written backward runs the recurrence in reverse with one batched
   matmul per step, then gets the recurrent weight gradient from a single matmul over all time steps.

It is chosen by name only, never by timing: on a 2-core AVX2 EPYC it trained Sequencer2D-S at 1.11x (batch 8)
and 1.60x (batch 32) the speed of `nn.LSTM` (BENCHMARKS.md, "Recurrence paths"), while rounding differently.

Under torch.compile the recurrence is one opaque op, `torch.ops.sequencer.rnn2d` (`rnn2d`): dynamo cannot trace
`nn.LSTM` (it breaks the graph at every one) nor the fused path's writes into strided views, so both would cut the
model into dozens of graphs. The op runs torch's own RNN functions (cuDNN on CUDA, oneDNN on the CPU), has a fake
implementation for shapes, and an autograd formula whose backward recomputes the forward in training mode and
differentiates it: in compiled training the recurrence's forward runs twice, as with activation checkpointing of
the recurrence alone, because cuDNN's backward needs the workspace of a training-mode forward that a functional
op cannot hand over. Everything around it (LayerNorms, linears, GELUs, residuals) compiles into one graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.fx
from torch import nn
from torch.autograd.function import once_differentiable

from sequencer.kernels.onednn import linear

Direction = tuple[str, bool]  # (axis "v" or "h", reverse)


def records_graph(x: torch.Tensor) -> bool:
    """Whether this call is being recorded rather than run: TorchScript, torch.fx, torch.jit.trace or an export."""
    if torch.jit.is_scripting():
        return True
    # The flag behind torch.compiler.is_exporting(): torch 2.7 and 2.8's dynamo folds that call to True under
    # torch.compile as well, which would take compiled models off the `rnn2d` op; the flag reads true in export only.
    exporting = torch.onnx.is_in_onnx_export() or torch.compiler._is_exporting_flag
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or exporting


@contextlib.contextmanager
def train_mode_for_backward(rnns: list[nn.RNNBase], needs_backward: bool) -> Iterator[None]:
    """Run eval-mode `rnns` in train mode while a backward pass will follow (cuDNN refuses it in eval mode).

    A single-layer RNN has no dropout, so both modes compute the same; doing it on every device keeps one code
    path. Input gradients of an eval-mode model (effective receptive fields, attacks) need nothing from the caller.
    """
    switched = [rnn for rnn in rnns if needs_backward and not rnn.training]
    for rnn in switched:
        if rnn.dropout and rnn.num_layers > 1:
            raise ValueError(f"{rnn} has dropout between layers: train mode would change its output")
        rnn.train()
    try:
        yield
    finally:
        for rnn in switched:
            rnn.eval()


def in_recurrence_precision(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`forward(x)` with its recurrences in `recurrence_dtype`: as autocast runs them, or in float32 with autocast off.

    In float32 the mixer returns the autocast dtype, as the fused path does for half-precision inputs.
    """
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):  # "meta" has none
        return forward(x)
    dtype = torch.get_autocast_dtype(device)
    if recurrence_dtype(device, dtype) == dtype:
        return forward(x)
    with torch.autocast(device, enabled=False):
        return forward(x.float()).to(dtype)


def recurrence_dtype(
    device_type: str, autocast_dtype: torch.dtype, cpu_low_precision: bool | None = None
) -> torch.dtype:
    """The dtype the recurrences compute in under autocast to `autocast_dtype`: that dtype, or float32 where the
    kernels cannot run it as asked. `cpu_low_precision` overrides what `cpu_has_low_precision_rnn` finds.

    - CUDA: float16 runs on cuDNN's half kernels, and `train` pairs float16 autocast with a GradScaler. bfloat16
      does not reach cuDNN as bfloat16: autocast's cuDNN-RNN wrapper (`_cudnn_rnn_cast_reflatten`) casts the LSTM to
      float16 whatever dtype was asked, and with no loss scaling the small recurrent gradients underflow in silence
      (at initialisation most of Sequencer2D-S's LSTM weight gradients lie below float16's smallest normal). cuDNN
      has bfloat16 RNNs only from 9.13, and torch's cuDNN RNN takes half, float and double tensors alone, so under
      bfloat16 autocast the recurrences run in float32 on cuDNN; the linears around them stay in bfloat16.
    - CPU: oneDNN builds its bfloat16 / float16 LSTM only on AVX-512 processors; elsewhere (AVX2: AMD EPYC before
      Zen 4, older Xeons) nn.LSTM under autocast fails with "could not create a primitive descriptor".
    """
    if device_type == "cuda":
        return autocast_dtype if autocast_dtype == torch.float16 else torch.float32
    if device_type == "cpu":
        low_precision = cpu_has_low_precision_rnn() if cpu_low_precision is None else cpu_low_precision
        return autocast_dtype if low_precision else torch.float32
    return autocast_dtype


# Read once at import: torch.compile traces the function below under autocast, and a cache wrapper there draws
# dynamo's warning about functools caches.
_CPU_LOW_PRECISION_RNN = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_has_low_precision_rnn() -> bool:
    """Whether oneDNN can build its bfloat16 / float16 RNN primitives on this CPU (AVX-512 and later)."""
    return _CPU_LOW_PRECISION_RNN


def directions_of(axes: tuple[str, ...], bidirectional: bool) -> tuple[Direction, ...]:
    """The scanned directions in output-channel order: per axis, forward then (if bidirectional) reverse."""
    return tuple((axis, reverse) for axis in axes for reverse in ((False, True) if bidirectional else (False,)))


def recurrent_weights(rnns: list[nn.RNNBase]) -> list[torch.Tensor]:
    """[W_ih, W_hh, b_ih, b_hh] of every direction of `rnns`, flat, in `directions_of` order."""
    weights = []
    for rnn in rnns:
        if rnn.num_layers != 1 or not rnn.bias or not rnn.batch_first or getattr(rnn, "proj_size", 0):
            raise ValueError("the fused recurrence needs single-layer, batch-first recurrent nets with biases")
        for suffix in ("", "_reverse") if rnn.bidirectional else ("",):
            weights += [getattr(rnn, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return weights


def fused_rnn2d(
    x: torch.Tensor, weights: list[torch.Tensor], cell: str, axes: str, bidirectional: bool
) -> torch.Tensor:
    """Every directional recurrence over x (B, H, W, C) on the fused path: (B, H, W, K*D), in `rnn2d`'s order.

    `axes` is "vh", "v" or "h"; `weights` are `recurrent_weights` of the axes' nets in that order, and the output
    channels follow `directions_of`, for both axes the reference's concat order [v fwd, v bwd, h fwd, h bwd].
    """
    w_ih, bias, w_hh_t, b_hn = pack_weights(weights, cell)
    projected = linear(x, w_ih, bias)
    save = torch.is_grad_enabled() and (projected.requires_grad or w_hh_t.requires_grad)
    return FusedScan.apply(projected, w_hh_t, b_hn, cell, directions_of(tuple(axes), bidirectional), save)


def pack_weights(
    weights: list[torch.Tensor], cell: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stack every direction's weights: W_ih (K*G*D, C), bias (K*G*D), W_hh^T (K, D, G*D), GRU's b_hn (K, D)."""
    w_ih, biases, w_hh_t, b_hn = [], [], [], []
    for index in range(0, len(weights), 4):
        wi, wh, bi, bh = weights[index : index + 4]
        D = wh.shape[1]
        if cell == "lstm":
            # torch orders the gates i, f, g, o; i, f, o, g puts the three sigmoids side by side.
            wi, wh, b = (_lstm_gate_order(t, D) for t in (wi, wh, bi + bh))
        elif cell == "gru":
            # b_hn sits inside r * (W_hn h + b_hn), so it cannot join the projection bias.
            b = torch.cat([bi[: 2 * D] + bh[: 2 * D], bi[2 * D :]])
            b_hn.append(bh[2 * D :])
        else:
            b = bi + bh
        w_ih.append(wi)
        biases.append(b)
        w_hh_t.append(wh.t())
    packed_b_hn = torch.stack(b_hn) if b_hn else None
    return torch.cat(w_ih), torch.cat(biases), torch.stack(w_hh_t), packed_b_hn


def _lstm_gate_order(t: torch.Tensor, D: int) -> torch.Tensor:
    # The g rows are doubled: tanh(z) = 2 sigmoid(2z) - 1, so one sigmoid covers all four gates (ATen's tanh
    # runs several times slower than its sigmoid on the CPU) and g is read back as 2 s - 1.
    return torch.cat([t[: 2 * D], t[3 * D :], 2 * t[2 * D : 3 * D]])


# ----------------------------------------------------------------------------------------------------------------
# Layout: (B, H, W, K * E) channel blocks <-> time-major (K, T, N, E) per group of directions
# ----------------------------------------------------------------------------------------------------------------


def direction_groups(directions: tuple[Direction, ...], height: int, width: int) -> list[list[int]]:
    """Directions that share a sequence length and count advance in one loop: all of them on a square map."""
    if height == width:
        return [list(range(len(directions)))]
    groups = [[k for k, (axis, _) in enumerate(directions) if axis == a] for a in ("v", "h")]
    return [g for g in groups if g]


def _time_major(t: torch.Tensor, axis: str) -> torch.Tensor:
    """(B, H, W, E) view as (T, B, S, E): the scanned axis first."""
    return t.permute(1, 0, 2, 3) if axis == "v" else t.permute(2, 0, 1, 3)


def gather(
    src: torch.Tensor, directions: tuple[Direction, ...], group: list[int], width: int, dtype: torch.dtype
) -> torch.Tensor:
    """Copy the channel blocks (of `width`) of a group's directions from (B, H, W, K*width) to (Kg, T, N, width)."""
    B, H, W, _ = src.shape
    T, S = (H, W) if directions[group[0]][0] == "v" else (W, H)
    out = src.new_empty(len(group), T, B * S, width, dtype=dtype)
    reversed_time = torch.arange(T - 1, -1, -1, device=src.device)
    for slot, k in enumerate(group):
        axis, reverse = directions[k]
        source = _time_major(src[..., k * width : (k + 1) * width], axis)
        target = out[slot].view(T, B, S, width)
        if reverse and source.dtype == dtype:
            torch.index_select(source, 0, reversed_time, out=target)  # one pass, unlike flip + copy
        elif reverse:
            target.copy_(source.flip(0))
        else:
            target.copy_(source)
    return out


def scatter(
    src: torch.Tensor, out: torch.Tensor, directions: tuple[Direction, ...], group: list[int], width: int
) -> None:
    """The inverse of `gather`: write (Kg, T, N, width) back into the channel blocks of out (B, H, W, K*width)."""
    B = out.shape[0]
    T = src.shape[1]
    for slot, k in enumerate(group):
        axis, reverse = directions[k]
        target = _time_major(out[..., k * width : (k + 1) * width], axis)
        source = src[slot].view(T, B, -1, width)
        if reverse:
            # Per time step: as fast as one strided copy, where index_copy_ and flip are several times slower.
            for t in range(T):
                target[t].copy_(source[T - 1 - t])
        else:
            target.copy_(source)


# ----------------------------------------------------------------------------------------------------------------
# The fused recurrence in torch ops, with its hand-written backward
# ----------------------------------------------------------------------------------------------------------------


class FusedScan(torch.autograd.Function):
    """Projected inputs (B, H, W, K*G*D) -> hidden states (B, H, W, K*D) for K directions of one cell type."""

    @staticmethod
    def forward(ctx, projected, w_hh_t, b_hn, cell, directions, save):
        B, H, W, _ = projected.shape
        K, D, GD = w_hh_t.shape
        dtype = compute_dtype(projected.dtype)
        out = projected.new_empty(B, H, W, K * D)
        saved = []
        with torch.autocast(projected.device.type, enabled=False):
            for group in direction_groups(directions, H, W):
                x = gather(projected, directions, group, GD, dtype)
                w = w_hh_t[group].to(dtype)
                bias = b_hn[group].to(dtype).unsqueeze(1) if b_hn is not None else None
                h_all, kept = FORWARD[cell](x, w, bias, save)
                scatter(h_all, out, directions, group, D)
                saved.extend(kept)
        ctx.cell, ctx.directions, ctx.shape, ctx.used = cell, directions, (B, H, W), False
        if save:
            ctx.save_for_backward(w_hh_t, b_hn, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError(
                "the fused recurrence's backward reuses its saved buffers and runs once per forward; "
                "use rnn_impl='reference' to backpropagate through the same graph twice"
            )
        ctx.used = True
        w_hh_t, b_hn, *saved = ctx.saved_tensors
        B, H, W = ctx.shape
        K, D, GD = w_hh_t.shape
        directions, cell = ctx.directions, ctx.cell
        grad_projected = grad_out.new_empty(B, H, W, K * GD)
        grad_w = torch.empty_like(w_hh_t)
        grad_b_hn = torch.empty_like(b_hn) if b_hn is not None else None
        per_group = SAVED_PER_GROUP[cell]
        with torch.autocast(grad_out.device.type, enabled=False):
            for index, group in enumerate(direction_groups(directions, H, W)):
                tensors = saved[index * per_group : (index + 1) * per_group]
                dtype = tensors[0].dtype
                grad_y = gather(grad_out, directions, group, D, dtype)
                w = w_hh_t[group].to(dtype)
                grad_x, grad_wg, grad_bg = BACKWARD[cell](tensors, w, grad_y)
                scatter(grad_x, grad_projected, directions, group, GD)
                grad_w[group] = grad_wg.to(grad_w.dtype)
                if grad_b_hn is not None:
                    grad_b_hn[group] = grad_bg.to(grad_b_hn.dtype)
        return grad_projected, grad_w, grad_b_hn, None, None, None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrence runs in float32 for half-precision inputs: rounding compounds over the time steps."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sigmoid_backward(grad: torch.Tensor, output: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.sigmoid_backward.grad_input(grad, output, grad_input=out)


def _tanh_backward(grad: torch.Tensor, output: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.tanh_backward.grad_input(grad, output, grad_input=out)


def _tanh_(t: torch.Tensor) -> torch.Tensor:
    """In-place tanh as 2 sigmoid(2t) - 1: four cheap passes beat ATen's CPU tanh several times over."""
    return t.mul_(2).sigmoid_().mul_(2).sub_(1)


def _lstm_forward(x, w, _b_hn, save):
    """Gates [i, f, o, g'] computed in place in x, which keeps the sigmoids (g = 2 g' - 1); returns h and c."""
    Kg, T, N, GD = x.shape
    D = GD // 4
    h_all = x.new_empty(Kg, T, N, D)
    c_all = x.new_empty(Kg, T if save else 2, N, D)
    tanh_c = x.new_empty(Kg, N, D)
    for t in range(T):
        gates = x[:, t]
        if t > 0:
            gates.baddbmm_(h_all[:, t - 1], w)
        gates.sigmoid_()
        i, f, o, g = gates[..., :D], gates[..., D : 2 * D], gates[..., 2 * D : 3 * D], gates[..., 3 * D :]
        # c = f c_prev + i (2 g' - 1)
        c = c_all[:, t if save else t % 2]
        if t > 0:
            torch.mul(f, c_all[:, t - 1 if save else (t - 1) % 2], out=c)
            c.sub_(i)
        else:
            torch.neg(i, out=c)
        c.addcmul_(i, g, value=2)
        _tanh_(torch.mul(c, 1, out=tanh_c))
        torch.mul(o, tanh_c, out=h_all[:, t])
    return h_all, (x, c_all)


def _backward_steps(grad_h: torch.Tensor, grad_rec: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """The steps of a backward pass, last first, each with the gradient reaching h_t (a view of `grad_h`, added to
    in place): its output's, plus the recurrent gradient that the step after it left in `grad_rec`."""
    T = grad_h.shape[1]
    for t in range(T - 1, -1, -1):
        grad = grad_h[:, t]
        if t < T - 1:
            grad.add_(grad_rec)
        yield t, grad


def _lstm_backward(saved, w, grad_h):
    """Reverse the LSTM loop; the gradient of the gate pre-activations overwrites the saved activations."""
    x, c_all = saved
    Kg, _, N, GD = x.shape
    D = GD // 4
    w_t = w.transpose(1, 2).contiguous()
    # h_t for every step, recomputed rather than kept: it is only needed for the weight gradient.
    h_all = _tanh_(c_all.clone()).mul_(x[..., 2 * D : 3 * D])
    grad_c = x.new_zeros(Kg, N, D)
    grad_rec = x.new_empty(Kg, N, D)
    tanh_c = x.new_empty(Kg, N, D)
    cell_in = x.new_empty(Kg, N, D)
    tmp = x.new_empty(Kg, N, D)
    grad_gates = x.new_empty(Kg, N, GD)
    for t, grad in _backward_steps(grad_h, grad_rec):
        gates = x[:, t]
        i, f, o, g = gates[..., :D], gates[..., D : 2 * D], gates[..., 2 * D : 3 * D], gates[..., 3 * D :]
        _tanh_(torch.mul(c_all[:, t], 1, out=tanh_c))
        torch.mul(grad, tanh_c, out=grad_gates[..., 2 * D : 3 * D])
        torch.mul(grad, o, out=tmp)
        grad_c.add_(_tanh_backward(tmp, tanh_c, tmp))
        torch.mul(g, 2, out=cell_in).sub_(1)
        torch.mul(grad_c, cell_in, out=grad_gates[..., :D])
        if t > 0:
            torch.mul(grad_c, c_all[:, t - 1], out=grad_gates[..., D : 2 * D])
        else:
            grad_gates[..., D : 2 * D].zero_()
        # d/dg' of i (2 g' - 1) is 2 i.
        torch.mul(grad_c, i, out=grad_gates[..., 3 * D :]).mul_(2)
        grad_c.mul_(f)
        _sigmoid_backward(grad_gates, gates, gates)
        if t > 0:
            torch.bmm(gates, w_t, out=grad_rec)
    grad_w = _weight_grad(x, h_all)
    return x, grad_w, None


def _gru_forward(x, w, b_hn, save):
    """Gates [r, z, n] in place in x; W_hn h + b_hn kept per step for the backward pass."""
    Kg, T, N, GD = x.shape
    D = GD // 3
    h_all = x.new_empty(Kg, T, N, D)
    hn_all = x.new_empty(Kg, T, N, D) if save else x.new_empty(Kg, 1, N, D)
    rec = x.new_zeros(Kg, N, GD)
    tmp = x.new_empty(Kg, N, D)
    for t in range(T):
        gates = x[:, t]
        if t > 0:
            torch.bmm(h_all[:, t - 1], w, out=rec)
        hn = hn_all[:, t if save else 0]
        torch.add(rec[..., 2 * D :], b_hn, out=hn)
        gates[..., : 2 * D].add_(rec[..., : 2 * D]).sigmoid_()
        r, z, n = gates[..., :D], gates[..., D : 2 * D], gates[..., 2 * D :]
        n.addcmul_(r, hn).tanh_()
        # h' = (1 - z) n + z h = n + z (h - n)
        if t > 0:
            torch.sub(h_all[:, t - 1], n, out=tmp)
        else:
            torch.neg(n, out=tmp)
        torch.addcmul(n, z, tmp, out=h_all[:, t])
    return h_all, (x, h_all, hn_all)


def _gru_backward(saved, w, grad_h):
    x, h_all, hn_all = saved
    Kg, _, N, GD = x.shape
    D = GD // 3
    w_t = w.transpose(1, 2)
    grad_rec = x.new_empty(Kg, N, D)
    grad_z = x.new_empty(Kg, N, D)
    grad_n = x.new_empty(Kg, N, D)
    grad_r = x.new_empty(Kg, N, D)
    for t, grad in _backward_steps(grad_h, grad_rec):
        gates = x[:, t]
        r, z, n = gates[..., :D], gates[..., D : 2 * D], gates[..., 2 * D :]
        hn = hn_all[:, t]
        if t > 0:
            torch.sub(h_all[:, t - 1], n, out=grad_z)
        else:
            torch.neg(n, out=grad_z)
        grad_z.mul_(grad)
        torch.mul(grad, z, out=grad_rec)  # the direct path h -> h'
        torch.sub(grad, grad_rec, out=grad_n)
        _tanh_backward(grad_n, n, n)
        torch.mul(n, hn, out=grad_r)
        torch.mul(n, r, out=hn)
        _sigmoid_backward(grad_r, r, r)
        _sigmoid_backward(grad_z, z, z)
        if t > 0:
            grad_rec.baddbmm_(gates[..., : 2 * D], w_t[:, : 2 * D])
            grad_rec.baddbmm_(hn, w_t[:, 2 * D :])
    # Recurrent pre-activation gradients: [r, z] as for the inputs, n through r * (W_hn h + b_hn).
    grad_w = torch.cat([_weight_grad(x[..., : 2 * D], h_all), _weight_grad(hn_all, h_all)], dim=2)
    return x, grad_w, hn_all.sum(dim=(1, 2))


def _rnn_forward(x, w, _b_hn, _save):
    """h_t = tanh(x_t + W_hh h_{t-1}), in place in x."""
    for t in range(x.shape[1]):
        step = x[:, t]
        if t > 0:
            step.baddbmm_(x[:, t - 1], w)
        step.tanh_()
    return x, (x,)


def _rnn_backward(saved, w, grad_h):
    (h_all,) = saved
    w_t = w.transpose(1, 2)
    grad_rec = torch.empty_like(grad_h[:, 0])
    for t, grad in _backward_steps(grad_h, grad_rec):
        _tanh_backward(grad, h_all[:, t], grad)
        if t > 0:
            torch.bmm(grad, w_t, out=grad_rec)
    return grad_h, _weight_grad(grad_h, h_all), None


def _weight_grad(grad_pre: torch.Tensor, h_all: torch.Tensor) -> torch.Tensor:
    """sum_t h_{t-1}^T grad_t over steps 1..T-1 as one batched matmul: (Kg, D, E) for W_hh^T."""
    Kg, T, N, E = grad_pre.shape
    if T == 1:
        return grad_pre.new_zeros(Kg, h_all.shape[-1], E)
    h_prev = h_all[:, : T - 1].reshape(Kg, (T - 1) * N, -1)
    return torch.bmm(h_prev.transpose(1, 2), grad_pre[:, 1:].reshape(Kg, (T - 1) * N, E))


FORWARD = {"lstm": _lstm_forward, "gru": _gru_forward, "rnn": _rnn_forward}
SAVED_PER_GROUP = {"lstm": 2, "gru": 3, "rnn": 1}
BACKWARD = {"lstm": _lstm_backward, "gru": _gru_backward, "rnn": _rnn_backward}

# ----------------------------------------------------------------------------------------------------------------
# The recurrence as one custom op, for torch.compile
# ----------------------------------------------------------------------------------------------------------------

_LIBRARY_RNNS = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn": torch._VF.rnn_tanh}
_KEY = torch._C.DispatchKey


def library_rnn2d(
    x: torch.Tensor, weights: list[torch.Tensor], cell: str, axes: str, bidirectional: bool, train: bool
) -> torch.Tensor:
    """The reference recurrences through torch's RNN functions: x (B, H, W, C) -> (B, H, W, K*D), [v, h] order.

    `axes` is "vh", "v" or "h"; `weights` are `recurrent_weights` of the axes' nets in that order. `train` picks
    cuDNN's training kernels (the ones with a backward) over its inference kernels; the results are the same.
    """
    B, H, W, C = x.shape
    per_axis = len(weights) // len(axes)
    outputs = []
    for index, axis in enumerate(axes):
        sequences = x.transpose(1, 2).reshape(B * W, H, C) if axis == "v" else x.reshape(B * H, W, C)
        axis_weights = weights[index * per_axis : (index + 1) * per_axis]
        state = sequences.new_zeros(2 if bidirectional else 1, sequences.shape[0], axis_weights[1].shape[1])
        initial = (state, state) if cell == "lstm" else state
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        hidden = _LIBRARY_RNNS[cell](sequences, initial, axis_weights, True, 1, 0.0, train, bidirectional, True)[0]
        outputs.append(hidden.reshape(B, W, H, -1).transpose(1, 2) if axis == "v" else hidden.reshape(B, H, W, -1))
    return torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0].contiguous()


# Schemas spelled out: torch < 2.6 cannot infer one from `list[torch.Tensor]` annotations.
@torch.library.custom_op(
    "sequencer::rnn2d",
    mutates_args=(),
    schema="(Tensor x, Tensor[] weights, str cell, str axes, bool bidirectional) -> Tensor",
)
def rnn2d(x: torch.Tensor, weights: list[torch.Tensor], cell: str, axes: str, bidirectional: bool) -> torch.Tensor:
    """Every directional recurrence of a 2D mixer as one op (see the module docstring); dtypes as given."""
    with torch.autocast(x.device.type, enabled=False):
        return library_rnn2d(x, [w.to(x.dtype) for w in weights], cell, axes, bidirectional, train=False)


@rnn2d.register_fake
def _rnn2d_fake(x, weights, cell, axes, bidirectional):
    directions = len(axes) * (2 if bidirectional else 1)
    return x.new_empty(*x.shape[:3], directions * weights[1].shape[1])


@torch.library.custom_op(
    "sequencer::rnn2d_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor[] weights, str cell, str axes, bool bidirectional) -> Tensor[]",
)
def rnn2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], cell: str, axes: str, bidirectional: bool
) -> list[torch.Tensor]:
    """Gradients of `rnn2d` for x and every weight: its forward recomputed in train mode and differentiated."""
    with _autograd_inside_op(), torch.autocast(x.device.type, enabled=False):
        x = x.detach().requires_grad_()
        weights = [w.detach().requires_grad_() for w in weights]
        out = library_rnn2d(x, [w.to(x.dtype) for w in weights], cell, axes, bidirectional, train=True)
        # Contiguous, as the fake implementation promises: autograd may hand back x's strides.
        return [g.contiguous() for g in torch.autograd.grad(out, [x, *weights], grad)]


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Grad mode with autograd dispatch back on: an op's implementation runs with the autograd keys excluded."""
    # torch.func.vjp would do this for its own level, but oneDNN's LSTM backward fails on its wrapped tensors.
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (_KEY.AutogradFunctionality, _KEY.AutogradOther, _KEY.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@rnn2d_backward.register_fake
def _rnn2d_backward_fake(grad, x, weights, cell, axes, bidirectional):
    return [x.new_empty(x.shape), *(w.new_empty(w.shape) for w in weights)]


def _rnn2d_setup_context(ctx, inputs, output) -> None:
    x, weights, cell, axes, bidirectional = inputs
    ctx.save_for_backward(x, *weights)
    ctx.config = (cell, axes, bidirectional)


def _rnn2d_grad(ctx, grad):
    x, *weights = ctx.saved_tensors
    grad_x, *grad_weights = rnn2d_backward(grad.contiguous(), x, weights, *ctx.config)
    return grad_x, grad_weights, None, None, None


rnn2d.register_autograd(_rnn2d_grad, setup_context=_rnn2d_setup_context)


def compiled_rnn2d(
    x: torch.Tensor, weights: list[torch.Tensor], cell: str, axes: str, bidirectional: bool
) -> torch.Tensor:
    """`rnn2d` in `recurrence_dtype` when autocast is on, as the reference path runs it, else in x's dtype.

    The map's height and width are specialised (each resolution compiles its own graph): with them symbolic,
    inductor (torch 2.14) fails to order the strides of the blocks' saved activations, "cannot determine truth value
    of Relational: 1 < 192*((s53//4))". The batch size stays dynamic.
    """
    B, H, W, C = x.shape
    x = x.reshape(B, int(H), int(W), C)
    if torch.is_autocast_enabled(x.device.type):
        dtype = recurrence_dtype(x.device.type, torch.get_autocast_dtype(x.device.type))
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
    return rnn2d(x, weights, cell, axes, bidirectional)


# ----------------------------------------------------------------------------------------------------------------
