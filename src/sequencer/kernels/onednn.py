"""F.linear through oneDNN's matmul on the CPU, forward and backward.

torch's float32 F.linear on the CPU calls MKL's sgemm, which on some processors runs well below oneDNN's AVX-512
matmul (about half its speed on the AMD EPYC of BENCHMARKS.md), while nn.LSTM itself runs on oneDNN there. The op
used, `torch.ops.mkldnn._linear_pointwise`, is the one inductor emits for frozen linears; results match F.linear
to float32 rounding. Anywhere it does not apply (other devices or dtypes, autocast, torch.compile, tracing and
export, torch.fx), `linear` is plain F.linear.

It is used on AMD processors only: there it measured 1.46x inference and 1.35x training of the whole model against
F.linear-based timm (BENCHMARKS.md), while on an Intel Xeon (Sapphire Rapids), where MKL's sgemm is at its best,
the same command measured 0.99x / 0.97x. The model builds its block linears as `FastLinear`;
`sequencer.route(model, onednn_linear=False)` turns it off for one model, `torch.backends.mkldnn.flags(enabled=False)`
for the whole process.
"""

from __future__ import annotations

import functools

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias: oneDNN's matmul for eager float32 CPU tensors, F.linear otherwise."""
    if applies(x):
        return OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def applies(x: torch.Tensor) -> bool:
    """Whether `linear` takes the oneDNN path for `x` (inductor only accepts that op with constant weights)."""
    return (
        not isinstance(x, torch.fx.Proxy)  # torch.fx records F.linear: nothing can branch on a symbolic tensor
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled  # torch.backends.mkldnn.flags(enabled=False) turns it off
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and sgemm_trails_onednn()
    )


@functools.cache
def sgemm_trails_onednn() -> bool:
    """Whether this CPU is one where MKL's sgemm was measured slower than oneDNN's matmul: AMD's."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:  # not Linux: no measurement there, keep torch's own GEMM
        return False


def matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T through oneDNN; either may be a strided view (a transposed one included)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [None], "")


class OneDnnLinear(torch.autograd.Function):
    """x @ W^T + b with oneDNN's matmul in both passes."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # oneDNN falls back to a reference kernel, thousands of times slower, on zero-stride (expanded) operands,
        # which is what the gradient of a sum or mean looks like.
        grad = grad.contiguous()
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_t(grad, weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            # dW^T = x^T dy: oneDNN reads the two transposed operands in place this way round, faster than dy^T x.
            grad_w = matmul_t(x.reshape(-1, x.shape[-1]).t(), grad_2d.t()).t().contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


class FastLinear(nn.Linear):
    """nn.Linear whose eager float32 CPU matmuls take `linear` (oneDNN where it applies): same parameters, results.
    `onednn = False` keeps it on F.linear."""

    onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(x, self.weight, self.bias)
        return self._forward_fast(x)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias) if self.onednn else F.linear(x, self.weight, self.bias)
