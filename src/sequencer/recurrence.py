"""Fast BiLSTM2D: the four directional recurrences of a block, projected once and advanced together.

The reference formulation (`RNN2D._reference`) makes two `nn.LSTM` calls on permuted copies of the map, each with
its own input projection and one direction after the other. Here:

1. the input projections of every direction (vertical/horizontal, forward/backward) are one matmul of the
   normalised tokens, `P = x @ W_ih_all^T + b` of shape (B, H, W, K * G * D) for K directions and G gates;
2. `P` is laid out time-major per direction, (K, T, N, G * D), the backward directions stored time-reversed, so
   that step t of every direction is one slice: the recurrent matmuls of all directions are one batched matmul
   per step (on a square map the vertical and horizontal scans have the same length and run in the same loop);
3. the pointwise cell works in place on that slice, keeping what the backward pass needs (gate activations,
   cell states) in the same buffer, and a hand-written backward runs the recurrence in reverse with one batched
   matmul per step, then gets the recurrent weight gradient from a single matmul over all time steps.

Implementations, chosen by name (`RNN2D.rnn_impl`): "reference" (nn.LSTM/GRU/RNN), "fused" (the above, in
torch ops, any device; under torch.compile an out-of-place version that inductor fuses and differentiates),
"triton" (the same algorithm as GPU kernels, `sequencer.kernels.triton_scan`), and "auto", which picks per call
(`resolve_impl`): Triton on CUDA, the fused path for CPU training steps on large enough maps and under
torch.compile, nn.LSTM otherwise (CPU inference, where oneDNN's LSTM is hard to beat; tracing and export).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from sequencer.kernels.onednn import linear

IMPLEMENTATIONS = ("auto", "reference", "fused", "triton")
# The Triton kernel keeps a (D x D) tile per gate on chip; beyond this width it would spill.
TRITON_MAX_HIDDEN = 128
# Tokens per map (B * H * W) from which the fused CPU path trains: from there it is about as fast as nn.LSTM or
# faster, and needs less memory; below, its fixed per-step overhead loses (benchmarks/recurrence.py, BENCHMARKS.md).
FUSED_MIN_TOKENS = 4096

Direction = tuple[str, bool]  # (axis "v" or "h", reverse)


def check_impl(name: str) -> str:
    """Return `name` if it names an implementation, else raise a ValueError listing them."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown rnn_impl {name!r}; expected one of {IMPLEMENTATIONS}")
    return name


def triton_available() -> bool:
    """Whether the triton package is importable."""
    return importlib.util.find_spec("triton") is not None


def resolve_impl(name: str, x: torch.Tensor, hidden_size: int, needs_backward: bool) -> str:
    """The implementation that `name` means for input x (B, H, W, C): "auto" picks per device, shape and pass."""
    if name != "auto":
        return name
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        return "reference"  # nn.LSTM exports as one ONNX/aten op
    if torch.compiler.is_compiling():
        return "fused"  # dynamo cannot trace nn.LSTM
    if x.is_cuda:
        return "triton" if hidden_size <= TRITON_MAX_HIDDEN and triton_available() else "reference"
    # CPU: nn.LSTM runs on oneDNN, whose fused inference kernels nothing built from torch ops beats; the fused path
    # pays when a backward pass follows on a large enough map.
    if x.device.type == "cpu" and needs_backward and x.shape[0] * x.shape[1] * x.shape[2] >= FUSED_MIN_TOKENS:
        return "fused"
    return "reference"


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


def scan(
    x: torch.Tensor, weights: list[torch.Tensor], cell: str, directions: tuple[Direction, ...], impl: str
) -> torch.Tensor:
    """Run every direction's recurrence over x (B, H, W, C) with `impl` ("fused" or "triton"): (B, H, W, K*D).

    `weights` holds torch's per-direction parameters (see `recurrent_weights`); the output channels follow
    `directions`, which for both axes is the reference's concat order [v fwd, v bwd, h fwd, h bwd].
    """
    w_ih, bias, w_hh_t, b_hn = pack_weights(weights, cell)
    projected = linear(x, w_ih, bias)
    save = torch.is_grad_enabled() and (projected.requires_grad or w_hh_t.requires_grad)
    if impl == "triton":
        if not triton_available():
            raise ValueError("rnn_impl='triton' needs the triton package (pip install triton)")
        from sequencer.kernels.triton_scan import TritonScan

        return TritonScan.apply(projected, w_hh_t, b_hn, cell, directions, save)
    if impl != "fused":
        raise ValueError(f"scan runs 'fused' or 'triton', not {impl!r}")
    if torch.compiler.is_compiling():
        return scan_out_of_place(projected, w_hh_t, b_hn, cell, directions)
    return FusedScan.apply(projected, w_hh_t, b_hn, cell, directions, save)


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


def scan_out_of_place(
    projected: torch.Tensor,
    w_hh_t: torch.Tensor,
    b_hn: torch.Tensor | None,
    cell: str,
    directions: tuple[Direction, ...],
) -> torch.Tensor:
    """`FusedScan` without in-place writes, for torch.compile: inductor fuses the cell and derives the backward."""
    B, H, W, _ = projected.shape
    K, D, GD = w_hh_t.shape
    outputs: list[torch.Tensor] = []
    for group in direction_groups(directions, H, W):
        x = torch.stack([_sequences(projected[..., k * GD : (k + 1) * GD], *directions[k]) for k in group])
        w = w_hh_t[group]
        Kg, T, N, _ = x.shape
        h = x.new_zeros(Kg, N, D)
        c = x.new_zeros(Kg, N, D)
        steps = []
        for t in range(T):
            rec = torch.bmm(h, w)
            if cell == "lstm":
                i, f, o, g = torch.sigmoid(x[:, t] + rec).split(D, dim=-1)
                c = f * c + i * (2 * g - 1)
                h = o * torch.tanh(c)
            elif cell == "gru":
                r, z = torch.sigmoid(x[:, t, :, : 2 * D] + rec[..., : 2 * D]).split(D, dim=-1)
                n = torch.tanh(x[:, t, :, 2 * D :] + r * (rec[..., 2 * D :] + b_hn[group].unsqueeze(1)))
                h = n + z * (h - n)
            else:
                h = torch.tanh(x[:, t] + rec)
            steps.append(h)
        hidden = torch.stack(steps, dim=1)
        outputs += [_maps(hidden[slot], *directions[k], B) for slot, k in enumerate(group)]
    order = [k for group in direction_groups(directions, H, W) for k in group]
    return torch.cat([outputs[order.index(k)] for k in range(K)], dim=-1)


def _sequences(t: torch.Tensor, axis: str, reverse: bool) -> torch.Tensor:
    """(B, H, W, E) to (T, N, E) sequences along `axis`, time reversed for a backward direction."""
    tm = _time_major(t, axis)
    tm = tm.reshape(tm.shape[0], -1, tm.shape[-1])
    return tm.flip(0) if reverse else tm


def _maps(t: torch.Tensor, axis: str, reverse: bool, batch: int) -> torch.Tensor:
    """The inverse of `_sequences`: (T, N, E) back to (B, H, W, E)."""
    if reverse:
        t = t.flip(0)
    t = t.reshape(t.shape[0], batch, -1, t.shape[-1])
    return t.permute(1, 0, 2, 3) if axis == "v" else t.permute(1, 2, 0, 3)


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


def _lstm_backward(saved, w, grad_h):
    """Reverse the LSTM loop; the gradient of the gate pre-activations overwrites the saved activations."""
    x, c_all = saved
    Kg, T, N, GD = x.shape
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
    for t in range(T - 1, -1, -1):
        gates = x[:, t]
        i, f, o, g = gates[..., :D], gates[..., D : 2 * D], gates[..., 2 * D : 3 * D], gates[..., 3 * D :]
        grad = grad_h[:, t]
        if t < T - 1:
            grad.add_(grad_rec)
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
    Kg, T, N, GD = x.shape
    D = GD // 3
    w_t = w.transpose(1, 2)
    grad_rec = x.new_empty(Kg, N, D)
    grad_z = x.new_empty(Kg, N, D)
    grad_n = x.new_empty(Kg, N, D)
    grad_r = x.new_empty(Kg, N, D)
    for t in range(T - 1, -1, -1):
        gates = x[:, t]
        r, z, n = gates[..., :D], gates[..., D : 2 * D], gates[..., 2 * D :]
        hn = hn_all[:, t]
        grad = grad_h[:, t]
        if t < T - 1:
            grad.add_(grad_rec)
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
    T = h_all.shape[1]
    for t in range(T - 1, -1, -1):
        grad = grad_h[:, t]
        if t < T - 1:
            grad.add_(grad_rec)
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

__all__ = [
    "IMPLEMENTATIONS",
    "FusedScan",
    "check_impl",
    "directions_of",
    "pack_weights",
    "recurrent_weights",
    "resolve_impl",
    "scan",
]
