"""Parameter and multiply-accumulate (MAC) counts that include the recurrent layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sequencer.model import route

# Per time step and direction, a cell does its gate matmuls (gates x hidden x (input + hidden)) plus the
# element-wise products that update its state: LSTM c = f*c + i*g and h = o*tanh(c); GRU n = tanh(x + r*h),
# h = (1-z)*n + z*h; the tanh RNN none.
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_STATE_PRODUCTS = {"LSTM": 3, "GRU": 3, "RNN_TANH": 0, "RNN_RELU": 0}


def rnn_macs(module: nn.RNNBase, batch: int, steps: int) -> int:
    """MACs of one call of a single-layer nn.LSTM / nn.GRU / nn.RNN on `batch` sequences of `steps` steps."""
    gates, hidden = _GATES[module.mode], module.hidden_size
    directions = 2 if module.bidirectional else 1
    per_step = gates * hidden * (module.input_size + hidden) + _STATE_PRODUCTS[module.mode] * hidden
    return directions * batch * steps * per_step * module.num_layers


def _counted_rnn_forward(module: nn.RNNBase, add: Callable[[int], None]) -> Callable[..., tuple]:
    """A stand-in for a batched `module.forward`: adds the call's MACs, returns zeros of the outputs' shapes."""
    layers = module.num_layers * (2 if module.bidirectional else 1)
    out_size = module.proj_size or module.hidden_size

    def forward(x: torch.Tensor, hx: object = None) -> tuple:
        batch, steps = (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])
        add(rnn_macs(module, batch, steps))
        h_n = x.new_zeros(layers, batch, out_size)
        state = (h_n, x.new_zeros(layers, batch, module.hidden_size)) if module.mode == "LSTM" else h_n
        return x.new_zeros(*x.shape[:-1], layers // module.num_layers * out_size), state

    return forward


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """MACs of one forward pass on one image: convolutions, linear layers and recurrent layers."""
    macs: list[int] = []  # one entry per counted layer call

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        macs.append(output.numel() * kernel)

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        macs.append(output.numel() * module.in_features)

    # The recurrent layers are counted from their input's shape and not run: step by step, even on the meta device,
    # they were nearly all of the counting time.
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    for rnn in rnns:
        rnn.forward = _counted_rnn_forward(rnn, macs.append)
    hooks = [
        module.register_forward_hook(conv_hook if isinstance(module, nn.Conv2d) else linear_hook)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        # The hooks see only module calls: run the 2D mixers on their nn.LSTM / nn.Linear path while counting.
        with route(model, rnn_impl="reference"):
            model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for rnn in rnns:
            del rnn.forward
        for hook in hooks:
            hook.remove()
    return sum(macs)
