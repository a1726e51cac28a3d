"""The fused BiLSTM2D recurrence as Triton kernels: every direction of a block in one launch per pass.

One program owns a block of BLOCK_N sequences of one direction (grid: directions x sequence blocks). It loads that
direction's recurrent weights once, one (D x D) tile per gate, keeps them, h and c on chip for the whole scan, and
walks the sequence reading the projected inputs straight from the (B, H, W, K*G*D) projection and writing h
straight into the (B, H, W, K*D) output: the axis and the direction of time are index arithmetic, so nothing is
permuted or flipped in memory. The backward kernel walks the other way with the transposed tiles; the recurrent
weight gradient is then one matmul per direction in torch.

Cells (constexpr CELL): 0 LSTM with gates [i, f, o, g'] where g' carries doubled rows (g = 2 sigmoid(g') - 1 =
tanh(g'/2), see `sequencer.recurrence.pack_weights`), 1 GRU [r, z, n], 2 tanh RNN. State and arithmetic are
float32; the matmuls take the weights in the input's dtype (float16/bfloat16 under autocast) with float32
accumulation, and full-precision float32 ("ieee", no TF32) otherwise.

On a machine without a GPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set before this
module is imported; the tests check them that way against the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

LSTM, GRU, RNN = 0, 1, 2
CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
GATES = {LSTM: 4, GRU: 3, RNN: 1}
BLOCK_N = 16


# Triton decides at decoration time whether a kernel is compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _rows(dirs_ptr, k, pid_n, B, H, W, BLOCK_N: tl.constexpr):
    """Sequence length, reverse flag, token stride along time, first token and mask of this program's rows."""
    axis = tl.load(dirs_ptr + 2 * k)
    reverse = tl.load(dirs_ptr + 2 * k + 1)
    vertical = axis == 0
    T = tl.where(vertical, H, W)
    S = tl.where(vertical, W, H)
    stride_t = tl.where(vertical, W, 1)
    stride_s = tl.where(vertical, 1, W)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < B * S
    b = n // S
    s = n % S
    base = b * H * W + s * stride_s
    return T, reverse, stride_t, base, mask


@triton.jit
def _weight_tile(w_ptr, k, gate, D, GD, DP: tl.constexpr):
    """Gate `gate` of W_hh^T for direction k as a zero-padded (DP x DP) tile."""
    r = tl.arange(0, DP)
    m = (r[:, None] < D) & (r[None, :] < D)
    return tl.load(w_ptr + k * D * GD + r[:, None] * GD + gate * D + r[None, :], mask=m, other=0.0)


@triton.jit
def _scan_forward(
    p_ptr,
    w_ptr,
    bhn_ptr,
    out_ptr,
    act_ptr,
    state_ptr,
    dirs_ptr,
    B,
    H,
    W,
    K,
    D,
    CELL: tl.constexpr,
    SAVE: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k = tl.program_id(0)
    T, reverse, stride_t, base, row_mask = _rows(dirs_ptr, k, tl.program_id(1), B, H, W, BLOCK_N)
    G: tl.constexpr = 4 if CELL == 0 else (3 if CELL == 1 else 1)
    GD = G * D
    col = tl.arange(0, DP)
    mask = row_mask[:, None] & (col[None, :] < D)
    h = tl.full((BLOCK_N, DP), 0.0, tl.float32)
    c = tl.full((BLOCK_N, DP), 0.0, tl.float32)
    w0 = _weight_tile(w_ptr, k, 0, D, GD, DP)
    if CELL != 2:
        w1 = _weight_tile(w_ptr, k, 1, D, GD, DP)
        w2 = _weight_tile(w_ptr, k, 2, D, GD, DP)
    if CELL == 0:
        w3 = _weight_tile(w_ptr, k, 3, D, GD, DP)
    if CELL == 1:
        b_hn = tl.load(bhn_ptr + k * D + col, mask=col < D, other=0.0).to(tl.float32)
    for step in range(0, T):
        t = tl.where(reverse == 1, T - 1 - step, step)
        token = base + t * stride_t
        gate_off = token[:, None] * (K * GD) + k * GD + col[None, :]
        state_off = token[:, None] * (K * D) + k * D + col[None, :]
        hw = h.to(w_ptr.dtype.element_ty)
        if CELL == 0:
            i = _sigmoid(
                tl.load(p_ptr + gate_off, mask=mask, other=0.0).to(tl.float32)
                + tl.dot(hw, w0, input_precision=PRECISION)
            )
            f = _sigmoid(
                tl.load(p_ptr + gate_off + D, mask=mask, other=0.0).to(tl.float32)
                + tl.dot(hw, w1, input_precision=PRECISION)
            )
            o = _sigmoid(
                tl.load(p_ptr + gate_off + 2 * D, mask=mask, other=0.0).to(tl.float32)
                + tl.dot(hw, w2, input_precision=PRECISION)
            )
            g = _sigmoid(
                tl.load(p_ptr + gate_off + 3 * D, mask=mask, other=0.0).to(tl.float32)
                + tl.dot(hw, w3, input_precision=PRECISION)
            )
            c = f * c + i * (2.0 * g - 1.0)
            h = o * _tanh(c)
            if SAVE:
                tl.store(act_ptr + gate_off, i, mask=mask)
                tl.store(act_ptr + gate_off + D, f, mask=mask)
                tl.store(act_ptr + gate_off + 2 * D, o, mask=mask)
                tl.store(act_ptr + gate_off + 3 * D, g, mask=mask)
                tl.store(state_ptr + state_off, c, mask=mask)
        elif CELL == 1:
            r = _sigmoid(
                tl.load(p_ptr + gate_off, mask=mask, other=0.0).to(tl.float32)
                + tl.dot(hw, w0, input_precision=PRECISION)
            )
            z = _sigmoid(
                tl.load(p_ptr + gate_off + D, mask=mask, other=0.0).to(tl.float32)
                + tl.dot(hw, w1, input_precision=PRECISION)
            )
            hn = tl.dot(hw, w2, input_precision=PRECISION) + b_hn[None, :]
            n = _tanh(tl.load(p_ptr + gate_off + 2 * D, mask=mask, other=0.0).to(tl.float32) + r * hn)
            h = n + z * (h - n)
            if SAVE:
                tl.store(act_ptr + gate_off, r, mask=mask)
                tl.store(act_ptr + gate_off + D, z, mask=mask)
                tl.store(act_ptr + gate_off + 2 * D, n, mask=mask)
                tl.store(state_ptr + state_off, hn, mask=mask)
        else:
            h = _tanh(
                tl.load(p_ptr + gate_off, mask=mask, other=0.0).to(tl.float32)
                + tl.dot(hw, w0, input_precision=PRECISION)
            )
        tl.store(out_ptr + state_off, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_backward(
    grad_out_ptr,
    w_ptr,
    out_ptr,
    act_ptr,
    state_ptr,
    grad_p_ptr,
    grad_hn_ptr,
    dirs_ptr,
    B,
    H,
    W,
    K,
    D,
    CELL: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k = tl.program_id(0)
    T, reverse, stride_t, base, row_mask = _rows(dirs_ptr, k, tl.program_id(1), B, H, W, BLOCK_N)
    G: tl.constexpr = 4 if CELL == 0 else (3 if CELL == 1 else 1)
    GD = G * D
    col = tl.arange(0, DP)
    mask = row_mask[:, None] & (col[None, :] < D)
    grad_h = tl.full((BLOCK_N, DP), 0.0, tl.float32)
    grad_c = tl.full((BLOCK_N, DP), 0.0, tl.float32)
    # Transposed tiles: the gradient flows from the gates back to h through W_hh.
    w0 = tl.trans(_weight_tile(w_ptr, k, 0, D, GD, DP))
    if CELL != 2:
        w1 = tl.trans(_weight_tile(w_ptr, k, 1, D, GD, DP))
        w2 = tl.trans(_weight_tile(w_ptr, k, 2, D, GD, DP))
    if CELL == 0:
        w3 = tl.trans(_weight_tile(w_ptr, k, 3, D, GD, DP))
    for back in range(0, T):
        step = T - 1 - back
        t = tl.where(reverse == 1, T - 1 - step, step)
        t_prev = tl.where(reverse == 1, t + 1, t - 1)
        has_prev = step > 0
        token = base + t * stride_t
        prev_token = base + t_prev * stride_t
        gate_off = token[:, None] * (K * GD) + k * GD + col[None, :]
        state_off = token[:, None] * (K * D) + k * D + col[None, :]
        prev_off = prev_token[:, None] * (K * D) + k * D + col[None, :]
        grad = grad_h + tl.load(grad_out_ptr + state_off, mask=mask, other=0.0).to(tl.float32)
        if CELL == 0:
            i = tl.load(act_ptr + gate_off, mask=mask, other=0.0)
            f = tl.load(act_ptr + gate_off + D, mask=mask, other=0.0)
            o = tl.load(act_ptr + gate_off + 2 * D, mask=mask, other=0.0)
            g = tl.load(act_ptr + gate_off + 3 * D, mask=mask, other=0.0)
            c = tl.load(state_ptr + state_off, mask=mask, other=0.0)
            c_prev = tl.load(state_ptr + prev_off, mask=mask & has_prev, other=0.0)
            tanh_c = _tanh(c)
            grad_o = grad * tanh_c
            grad_c = grad_c + grad * o * (1.0 - tanh_c * tanh_c)
            grad_i = grad_c * (2.0 * g - 1.0)
            grad_f = grad_c * c_prev
            grad_g = 2.0 * grad_c * i
            grad_c = grad_c * f
            grad_i = grad_i * i * (1.0 - i)
            grad_f = grad_f * f * (1.0 - f)
            grad_o = grad_o * o * (1.0 - o)
            grad_g = grad_g * g * (1.0 - g)
            tl.store(grad_p_ptr + gate_off, grad_i, mask=mask)
            tl.store(grad_p_ptr + gate_off + D, grad_f, mask=mask)
            tl.store(grad_p_ptr + gate_off + 2 * D, grad_o, mask=mask)
            tl.store(grad_p_ptr + gate_off + 3 * D, grad_g, mask=mask)
            wt = w0.dtype
            grad_h = (
                tl.dot(grad_i.to(wt), w0, input_precision=PRECISION)
                + tl.dot(grad_f.to(wt), w1, input_precision=PRECISION)
                + tl.dot(grad_o.to(wt), w2, input_precision=PRECISION)
                + tl.dot(grad_g.to(wt), w3, input_precision=PRECISION)
            )
        elif CELL == 1:
            r = tl.load(act_ptr + gate_off, mask=mask, other=0.0)
            z = tl.load(act_ptr + gate_off + D, mask=mask, other=0.0)
            n = tl.load(act_ptr + gate_off + 2 * D, mask=mask, other=0.0)
            hn = tl.load(state_ptr + state_off, mask=mask, other=0.0)
            h_prev = tl.load(out_ptr + prev_off, mask=mask & has_prev, other=0.0).to(tl.float32)
            grad_z = grad * (h_prev - n) * z * (1.0 - z)
            grad_n = grad * (1.0 - z) * (1.0 - n * n)
            grad_r = grad_n * hn * r * (1.0 - r)
            grad_hn = grad_n * r
            tl.store(grad_p_ptr + gate_off, grad_r, mask=mask)
            tl.store(grad_p_ptr + gate_off + D, grad_z, mask=mask)
            tl.store(grad_p_ptr + gate_off + 2 * D, grad_n, mask=mask)
            tl.store(grad_hn_ptr + state_off, grad_hn, mask=mask)
            wt = w0.dtype
            grad_h = (
                grad * z
                + tl.dot(grad_r.to(wt), w0, input_precision=PRECISION)
                + tl.dot(grad_z.to(wt), w1, input_precision=PRECISION)
                + tl.dot(grad_hn.to(wt), w2, input_precision=PRECISION)
            )
        else:
            h = tl.load(out_ptr + state_off, mask=mask, other=0.0).to(tl.float32)
            grad_pre = grad * (1.0 - h * h)
            tl.store(grad_p_ptr + gate_off, grad_pre, mask=mask)
            grad_h = tl.dot(grad_pre.to(w0.dtype), w0, input_precision=PRECISION)


def _launch_config(
    projected: torch.Tensor, directions: tuple[tuple[str, bool], ...], D: int
) -> tuple[torch.Tensor, tuple[int, int], int, str | None]:
    """Direction codes, grid (directions x sequence blocks), padded tile width and matmul precision."""
    B, H, W, _ = projected.shape
    codes = [[0 if axis == "v" else 1, int(reverse)] for axis, reverse in directions]
    dirs = torch.tensor(codes, dtype=torch.int32, device=projected.device)
    longest = max(B * (W if axis == "v" else H) for axis, _ in directions)
    grid = (len(directions), triton.cdiv(longest, BLOCK_N))
    precision = "ieee" if projected.dtype == torch.float32 else None  # no TF32 for float32 inputs
    return dirs, grid, max(16, triton.next_power_of_2(D)), precision


def _warps(tile: int) -> int:
    # Spread the four weight tiles over more threads' registers when they are 128 wide (hidden 65..128).
    return 8 if tile >= 128 else 4


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "rnn_impl='triton' runs on CUDA tensors; on the CPU only in Triton's interpreter "
            "(set TRITON_INTERPRET=1 before importing sequencer.kernels.triton_scan)"
        )
    if INTERPRETED and tensor.dtype == torch.bfloat16:
        # Triton 3.8's interpreter computes tl.dot on bfloat16 tiles wrongly (float16 and float32 are right).
        raise RuntimeError("Triton's interpreter cannot run the scan in bfloat16; use float16 or float32")


class TritonScan(torch.autograd.Function):
    """Projected inputs (B, H, W, K*G*D) -> hidden states (B, H, W, K*D): `recurrence.FusedScan` as kernels."""

    @staticmethod
    def forward(ctx, projected, w_hh_t, b_hn, cell, directions, save):
        _check_device(projected)
        code = CELLS[cell]
        projected = projected.contiguous()
        B, H, W, _ = projected.shape
        K, D, GD = w_hh_t.shape
        weights = w_hh_t.to(projected.dtype).contiguous()
        b_hn_c = b_hn.float().contiguous() if b_hn is not None else weights
        out = projected.new_empty(B, H, W, K * D)
        act = projected.new_empty(B, H, W, K * GD, dtype=torch.float32) if save and code != RNN else out
        state = projected.new_empty(B, H, W, K * D, dtype=torch.float32) if save and code != RNN else out
        dirs, grid, DP, precision = _launch_config(projected, directions, D)
        _scan_forward[grid](
            projected,
            weights,
            b_hn_c,
            out,
            act,
            state,
            dirs,
            B,
            H,
            W,
            K,
            D,
            CELL=code,
            SAVE=save,
            DP=DP,
            BLOCK_N=BLOCK_N,
            PRECISION=precision,
            num_warps=_warps(DP),
        )
        ctx.cell, ctx.directions, ctx.has_b_hn = code, directions, b_hn is not None
        if save:
            ctx.save_for_backward(weights, out, act, state)
            ctx.w_dtype = w_hh_t.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weights, out, act, state = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, H, W, _ = out.shape
        K, D, GD = weights.shape
        grad_p = torch.empty(B, H, W, K * GD, dtype=out.dtype, device=out.device)
        grad_hn = torch.empty(B, H, W, K * D, dtype=torch.float32, device=out.device) if ctx.has_b_hn else grad_p
        dirs, grid, DP, precision = _launch_config(grad_p, ctx.directions, D)
        _scan_backward[grid](
            grad_out,
            weights,
            out,
            act,
            state,
            grad_p,
            grad_hn,
            dirs,
            B,
            H,
            W,
            K,
            D,
            CELL=ctx.cell,
            DP=DP,
            BLOCK_N=BLOCK_N,
            PRECISION=precision,
            num_warps=_warps(DP),
        )
        grad_w = torch.stack(
            [
                _recurrent_weight_grad(out, grad_p, grad_hn if ctx.has_b_hn else None, k, axis, reverse, D, GD)
                for k, (axis, reverse) in enumerate(ctx.directions)
            ]
        ).to(ctx.w_dtype)
        grad_b_hn = grad_hn.view(-1, K, D).sum(0).to(ctx.w_dtype) if ctx.has_b_hn else None
        return grad_p, grad_w, grad_b_hn, None, None, None


def _recurrent_weight_grad(out, grad_p, grad_hn, k, axis, reverse, D, GD) -> torch.Tensor:
    """sum over steps of h_{t-1}^T dgates_t for direction k, as (D, G*D), from the maps shifted by one step."""
    h = out[..., k * D : (k + 1) * D].float()
    grad = grad_p[..., k * GD : (k + 1) * GD].float()
    if grad_hn is not None:
        # The GRU's n rows see W_hn h through r * (W_hn h + b_hn): their gradient is dhn, not dn.
        grad = torch.cat([grad[..., : 2 * D], grad_hn[..., k * D : (k + 1) * D]], dim=-1)
    dim = 1 if axis == "v" else 2
    length = h.shape[dim]
    earlier, later = h.narrow(dim, 0, length - 1), grad.narrow(dim, 1, length - 1)
    if reverse:
        earlier, later = h.narrow(dim, 1, length - 1), grad.narrow(dim, 0, length - 1)
    return torch.einsum("bhwd,bhwe->de", earlier, later)
