"""float32 linears on the CPU: torch's F.linear (MKL sgemm) against oneDNN's matmul (sequencer.kernels.onednn).

    .venv/bin/python benchmarks/linear_backends.py --threads 2
    .venv/bin/python benchmarks/linear_backends.py --threads 2 --whole-model

The shapes are Sequencer2D-S's at 224 px, batch 8: the mixer's input projection (all four directions), its fc and
the channel MLP, per stage width. Each is timed forward and forward+backward, round-robin in one process with
`sequencer.bench.time_round_robin`; the ratio is F.linear's median time over oneDNN's.

--whole-model also times a training step and an inference pass of our sequencer2d_s as it is (every linear of the
blocks on oneDNN, `sequencer.model.Linear`; a contiguous residual stream), of the same model with those linears back
on F.linear (the recurrence's own input projection stays on oneDNN), of the same model with the stem and the
downsampling returning permuted NCHW views as timm's do (the residual stream then strided, so that every LayerNorm
and linear copies it), and of timm's sequencer2d_s.
"""

from __future__ import annotations

import argparse
import statistics
import types
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

import sequencer.model as model_module
from sequencer.bench import time_round_robin
from sequencer.kernels import onednn

SHAPES = {  # name: (tokens, in, out) at 224 px, batch 8
    "projection 32x32": (8192, 192, 768),
    "projection 16x16": (2048, 384, 1536),
    "fc 32x32": (8192, 192, 192),
    "fc 16x16": (2048, 384, 384),
    "mlp fc1 32x32": (8192, 192, 576),
    "mlp fc1 16x16": (2048, 384, 1152),
    "mlp fc2 32x32": (8192, 576, 192),
    "mlp fc2 16x16": (2048, 1152, 384),
}


def main() -> None:
    """Time each shape with both backends (and optionally the whole model) and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--whole-model", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    if not onednn.applies(torch.empty(1)):
        raise SystemExit("this torch has no oneDNN matmul on the CPU")
    print(f"{'shape':<18} {'pass':<9} {'F.linear ms':>12} {'oneDNN ms':>10}  speed-up")
    for name, (tokens, fan_in, fan_out) in SHAPES.items():
        x = torch.randn(tokens, fan_in, requires_grad=True)
        weight = torch.randn(fan_out, fan_in, requires_grad=True)
        bias = torch.randn(fan_out, requires_grad=True)
        for label, backward in (("forward", False), ("fwd+bwd", True)):
            steps = {fn: _step(fn, x, weight, bias, backward) for fn in (F.linear, onednn.linear)}
            times = time_round_robin(steps, cpu, 1, args.repeats)
            mkl, dnnl = (1000 * statistics.median(times[fn]) for fn in (F.linear, onednn.linear))
            print(f"{name:<18} {label:<9} {mkl:>12.2f} {dnnl:>10.2f}  {mkl / dnnl:.2f}x")
    if args.whole_model:
        whole_model(args.repeats)


def _step(fn: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backward: bool):
    def forward() -> None:
        with torch.no_grad():
            fn(x, weight, bias)

    def forward_backward() -> None:
        fn(x, weight, bias).sum().backward()

    return forward_backward if backward else forward


def whole_model(repeats: int) -> None:
    """Sequencer2D-S at 224 px, batch 8, inference and training: ours, two variants of ours undone, and timm's."""
    torch.manual_seed(0)
    ours = model_module.create_model("sequencer2d_s")
    on_mkl = model_module.create_model("sequencer2d_s")
    for layer in (m for m in on_mkl.modules() if isinstance(m, model_module.Linear)):
        layer.forward = types.MethodType(nn.Linear.forward, layer)
    strided = model_module.create_model("sequencer2d_s")
    for layer in (m for m in strided.modules() if isinstance(m, model_module.PatchEmbed | model_module.Downsample)):
        layer.forward = _permuted_view_forward(layer)
    twin = timm.create_model("sequencer2d_s")
    models = {"timm": twin, "ours": ours, "ours, F.linear in the blocks": on_mkl, "ours, strided stream": strided}
    x = torch.randn(8, 3, 224, 224)
    target = torch.randint(0, 1000, (8,))
    for mode in ("infer", "train"):
        steps = {}
        for label, net in models.items():
            net.train(mode == "train")
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
            steps[label] = _model_step(net, optimizer, x, target, mode)
        times = time_round_robin(steps, torch.device("cpu"), 1, repeats)
        base = statistics.median(times["timm"])
        for label, t in times.items():
            print(f"{mode:<6} {label:<30} {8 / statistics.median(t):6.2f} img/s  {base / statistics.median(t):.2f}x")


def _permuted_view_forward(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The stem's or a downsampling's forward returning the permuted view itself, as timm's port does."""
    if isinstance(layer, model_module.PatchEmbed):
        return lambda x: layer.proj(x).permute(0, 2, 3, 1)
    return lambda x: layer.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _model_step(net, optimizer, x, target, mode):
    def infer() -> None:
        with torch.no_grad():
            net(x)

    def train() -> None:
        F.cross_entropy(net(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return infer if mode == "infer" else train


if __name__ == "__main__":
    main()
