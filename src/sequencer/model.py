"""Sequencer: Deep LSTM for Image Classification (Tatsunami & Taki, NeurIPS 2022), in one file.

Read top to bottom: the configuration (`SequencerConfig`), the token mixers (the 2D recurrent mixer BiLSTM2D and
the vanilla 1D mixer, on one base whose `forward` picks the kernel), the channel MLP and the block, the stem, the
downsampling and the stage, the head and the network with its backbone wrapper (`features_only`), then the table of
official variants as data.

This file is the paper's network; the kernels live below it. Each mixer's `mix` is the paper's formulation on
torch's RNN layers, and `RecurrentMixer.forward` shows beside it the two other ways its recurrences run: one op for
all of them under torch.compile, and the fused CPU path when asked for (`rnn_impl`, see `sequencer.recurrence`).
The block linears are `FastLinear`, an nn.Linear that runs oneDNN's matmul on AMD CPUs
(`sequencer.kernels.onednn`). `sequencer.builder` builds variants by name (`create_model`) and loads weights.

Tensors inside the network are channels-last, (B, H, W, C), as in the authors' code; the input and the
`features_only` outputs are NCHW. In the shape comments D is a recurrent layer's hidden size, as in the paper: a
bidirectional one outputs 2D channels, the vertical and horizontal ones together 4D.

Parameter names follow timm's layout (`stages.{i}.blocks.{j}...`) so that timm's checkpoints load as they are; the
authors' layout (`blocks.{stage}.{j}...`) is converted by `sequencer.checkpoint`.
"""

import copy
import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import FeatureInfo
from torch import nn
from torch.utils.checkpoint import checkpoint

from sequencer.choices import IMPLEMENTATIONS
from sequencer.errors import UsageError
from sequencer.kernels.onednn import FastLinear
from sequencer.recurrence import (
    compiled_rnn2d,
    fused_rnn2d,
    in_recurrence_precision,
    records_graph,
    recurrent_weights,
    train_mode_for_backward,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
UNIONS = ("cat", "add", "vertical", "horizontal")


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequencerConfig:
    """Every field that shapes a Sequencer, checked once when built; the defaults are Sequencer2D-S's."""

    layers: tuple[int, ...] = (4, 3, 8, 3)  # blocks per stage
    patch_sizes: tuple[int, ...] = (7, 2, 1, 1)  # the stem's patch, then each stage's downsampling
    embed_dims: tuple[int, ...] = (192, 384, 384, 384)  # channels C per stage
    hidden_sizes: tuple[int, ...] = (48, 96, 96, 96)  # the recurrent layers' hidden size D per stage
    mlp_ratio: float = 3.0
    mixer: str = "2d"  # "2d": BiLSTM2D; "1d": the vanilla Sequencer's one LSTM over the raster
    cell: str = "lstm"  # "gru" and "rnn": the paper's ablations of the cell
    bidirectional: bool = True
    union: str = "cat"  # how the vertical and horizontal outputs meet: "cat", "add", or one axis alone
    with_fc: bool = True  # the 2D mixer's projection back to C
    pos_embed: bool = False  # a learned absolute position table after the stem
    img_size: int = 224  # the input side the position table and the default preprocessing are made for
    num_classes: int = 1000  # 0: no classifier, pooled features out
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("layers", "patch_sizes", "embed_dims", "hidden_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from YAML or JSON become tuples
        stages = {len(self.layers), len(self.patch_sizes), len(self.embed_dims), len(self.hidden_sizes)}
        if len(stages) != 1:
            raise UsageError("layers, patch_sizes, embed_dims and hidden_sizes need one entry per stage")
        if self.mixer not in ("1d", "2d"):
            raise UsageError(f"unknown mixer {self.mixer!r}; expected '1d' or '2d'")
        if self.cell not in CELLS:
            raise UsageError(f"unknown cell {self.cell!r}; expected one of {sorted(CELLS)}")
        if self.union not in UNIONS:
            raise UsageError(f"unknown union {self.union!r}; expected one of {UNIONS}")
        if self.num_classes < 0 or self.in_chans < 1:
            raise UsageError(
                f"num_classes must be >= 0 (0: no head) and in_chans >= 1, got {self.num_classes}, {self.in_chans}"
            )
        if not (0 <= self.drop_rate <= 1 and 0 <= self.drop_path_rate <= 1):
            raise UsageError(
                f"drop_rate and drop_path_rate are probabilities, got {self.drop_rate}, {self.drop_path_rate}"
            )
        for dim, hidden in zip(self.embed_dims, self.hidden_sizes, strict=True):
            # What the mixer outputs before any projection: 2D per axis (D one-way), both axes concatenated.
            axis = hidden * (2 if self.bidirectional else 1)
            mixed = 2 * axis if self.mixer == "2d" and self.union == "cat" else axis
            if mixed != dim and (self.mixer == "1d" or not self.with_fc):
                raise UsageError(
                    f"without an fc the {self.mixer} mixer must output the block width: {mixed} channels != dim {dim}"
                )


# ----------------------------------------------------------------------------------------------------------------
# Token mixers
# ----------------------------------------------------------------------------------------------------------------


class RecurrentMixer(nn.Module):
    """What the 2D and the 1D mixers share: their recurrent cell, built the same way, and the choice of the kernel
    their recurrences run on (`forward`)."""

    __jit_unused_properties__ = ["rnns"]  # TorchScript compiles properties, and this one it cannot
    __jit_ignored_attributes__ = ["flat_weights"]  # read by the kernel paths only, which TorchScript never takes

    def __init__(self, cell: str, bidirectional: bool) -> None:
        super().__init__()
        self.cell = cell
        self.bidirectional = bidirectional
        # "auto": torch's RNN layers (cuDNN, oneDNN), or one op under torch.compile; "reference": torch's RNN layers
        # everywhere (dynamo then breaks the graph at each); "fused": the fused CPU path (`sequencer.recurrence`).
        self.rnn_impl = "auto"
        self.register_load_state_dict_post_hook(RecurrentMixer.keep_flat_weights)

    def make_rnn(self, dim: int, hidden_size: int) -> nn.RNNBase:
        """One single-layer, batch-first recurrent layer of the mixer's cell (LSTM, or the ablations' GRU or RNN)."""
        return CELLS[self.cell](dim, hidden_size, batch_first=True, bidirectional=self.bidirectional)

    @property
    def rnns(self) -> list[nn.RNNBase]:
        """The mixer's recurrent layers, in output-channel order."""
        return [module for module in self.children() if isinstance(module, nn.RNNBase)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each mixer's `mix` (the paper's formulation, on torch's RNN layers) or, with the same result to float
        rounding, its `mix_all_at_once`, where one function runs every recurrence of the mixer."""
        if records_graph(x):  # TorchScript, fx, jit.trace, export: they record the paper's nn.LSTM calls as they are
            return self.mix(x)
        if self.rnn_impl != "reference" and torch.compiler.is_compiling():
            # dynamo breaks the graph at every nn.LSTM and cannot trace the fused path: all recurrences as one op
            return self.mix_all_at_once(x, compiled=True)
        if self.rnn_impl == "fused":
            return self.mix_all_at_once(x, compiled=False)
        return self.mix_in_torch_rnns(x)

    @torch.jit.unused
    def mix_in_torch_rnns(self, x: torch.Tensor) -> torch.Tensor:
        """`mix`, with the RNN layers in train mode when a backward follows (cuDNN has no eval-mode backward) and
        in the dtype their kernels can run under autocast (`sequencer.recurrence.recurrence_dtype`)."""
        needs_backward = torch.is_grad_enabled() and (
            x.requires_grad or any(w.requires_grad for w in self.flat_weights)
        )
        with train_mode_for_backward(self.rnns, needs_backward):
            return in_recurrence_precision(self.mix, x)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "RecurrentMixer":
        module = super()._apply(fn, recurse)
        self.keep_flat_weights()  # .to(), .cuda(), .to_empty() may have made new parameters
        return module

    def keep_flat_weights(self, *_: Any) -> None:
        """Hold the RNN layers' parameters as a flat list: what the kernel paths read, since dynamo cannot touch an
        nn.LSTM. Refreshed when the parameters are replaced by `.to()` and the like or by loading with assign=True
        (a hook); replaced any other way (torch.func.functional_call, DataParallel replicas), run "reference"."""
        self.flat_weights = recurrent_weights(self.rnns)


class BiLSTM2D(RecurrentMixer):
    """BiLSTM2D: a BiLSTM down every column and another along every row, concatenated and projected back to C.

    With cell "gru" or "rnn" the same mixer on the ablations' cells; union "add" sums the two axes, "vertical" and
    "horizontal" keep one.
    """

    def __init__(
        self,
        dim: int,
        hidden_size: int,
        cell: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
    ) -> None:
        super().__init__(cell, bidirectional)
        self.union = union
        self.hidden_size = hidden_size
        # Shared by all columns (rnn_v) and by all rows (rnn_h): the axis sequences are folded into the batch.
        self.rnn_v = None if union == "horizontal" else self.make_rnn(dim, hidden_size)
        self.rnn_h = None if union == "vertical" else self.make_rnn(dim, hidden_size)
        self.axes = {"vertical": "v", "horizontal": "h"}.get(union, "vh")
        axis_dim = hidden_size * (2 if bidirectional else 1)
        self.fc = FastLinear(2 * axis_dim if union == "cat" else axis_dim, dim) if with_fc else nn.Identity()
        self.keep_flat_weights()

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's BiLSTM2D: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        axes = []
        if self.rnn_v is not None:
            # (B, H, W, C) -> (B, W, H, C) -> (B*W, H, C): every column is a sequence of H tokens, top to bottom.
            v = self.rnn_v(x.transpose(1, 2).reshape(B * W, H, C))[0]
            # (B*W, H, 2D) -> (B, W, H, 2D) -> (B, H, W, 2D): each column's outputs back in place.
            axes.append(v.reshape(B, W, H, -1).transpose(1, 2))
        if self.rnn_h is not None:
            # (B, H, W, C) -> (B*H, W, C): every row is a sequence of W tokens, left to right (a view, no copy);
            # (B*H, W, 2D) -> (B, H, W, 2D).
            axes.append(self.rnn_h(x.reshape(B * H, W, C))[0].reshape(B, H, W, -1))
        if len(axes) == 2:
            # "cat": (B, H, W, 4D), [vertical, horizontal] along the channels, the order the fc's trained weights
            # expect; "add": (B, H, W, 2D).
            x = torch.cat(axes, dim=-1) if self.union == "cat" else axes[0] + axes[1]
        else:
            x = axes[0]
        return self.fc(x)  # (B, H, W, 4D or 2D) -> (B, H, W, C)

    @torch.jit.unused
    def mix_all_at_once(self, x: torch.Tensor, compiled: bool) -> torch.Tensor:
        """`mix` with every recurrence in one call, the `rnn2d` op (`compiled`) or the fused path: (B, H, W, C) ->
        (B, H, W, C)."""
        rnn2d = compiled_rnn2d if compiled else fused_rnn2d
        # (B, H, W, C) -> (B, H, W, 4D), channels [v fwd, v bwd, h fwd, h bwd] (those the variant has): "cat" already.
        x = rnn2d(x, self.flat_weights, self.cell, self.axes, self.bidirectional)
        if self.union == "add":
            # (B, H, W, 4D) -> (B, H, W, 2D): the vertical half plus the horizontal half, the paper's v + h.
            half = x.shape[-1] // 2
            x = x[..., :half] + x[..., half:]
        return self.fc(x)  # (B, H, W, 4D or 2D) -> (B, H, W, C)


class BiLSTM1D(RecurrentMixer):
    """The vanilla Sequencer mixer: one BiLSTM over the flattened H*W raster, no projection."""

    def __init__(self, dim: int, hidden_size: int, cell: str = "lstm", bidirectional: bool = True) -> None:
        super().__init__(cell, bidirectional)
        self.rnn = self.make_rnn(dim, hidden_size)
        self.keep_flat_weights()

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The vanilla Sequencer's mixing: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        # (B, H, W, C) -> (B, H*W, C): the tokens in raster order, row after row, as one sequence per image;
        # (B, H*W, 2D) -> (B, H, W, 2D), where 2D = C (no projection follows).
        return self.rnn(x.reshape(B, H * W, C))[0].reshape(B, H, W, -1)

    @torch.jit.unused
    def mix_all_at_once(self, x: torch.Tensor, compiled: bool) -> torch.Tensor:
        """`mix` through a 2D recurrence, the `rnn2d` op (`compiled`) or the fused path: (B, H, W, C) -> (B, H, W,
        C)."""
        rnn2d = compiled_rnn2d if compiled else fused_rnn2d
        B, H, W, C = x.shape
        # (B, H, W, C) -> (B, 1, H*W, C): the raster as a map of one row, scanned horizontally;
        # (B, 1, H*W, 2D) -> (B, H, W, 2D).
        raster = rnn2d(x.reshape(B, 1, H * W, C), self.flat_weights, self.cell, "h", self.bidirectional)
        return raster.reshape(B, H, W, -1)


# ----------------------------------------------------------------------------------------------------------------
# Block, stem, downsampling, stage
# ----------------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Channel MLP: Linear C -> rC, GELU, Linear rC -> C."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = FastLinear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = FastLinear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SequencerBlock(nn.Module):
    """Pre-norm block: x + DropPath(mixer(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.rnn_tokens = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.rnn_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Stem: non-overlapping patches (kernel = stride = patch) to channels-last tokens."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C, H/p, W/p) -> (B, H/p, W/p, C): one token per patch.
        return channels_last(self.proj(x))


class Downsample(nn.Module):
    """Between stages: a conv with kernel = stride = the next stage's patch size, on channels-last maps."""

    def __init__(self, dim: int, dim_out: int, patch_size: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(dim, dim_out, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, H, W, C) -> (B, C, H, W), the layout nn.Conv2d takes; -> (B, C', H/p, W/p) -> (B, H/p, W/p, C').
        # A copy, not the permuted view: inductor cannot order the strides of a saved view whose map side is symbolic,
        # which broke compiled training at a second resolution; eager speed is the same either way.
        return channels_last(self.down(x.permute(0, 3, 1, 2).contiguous()))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NCHW to a contiguous (B, H, W, C) tensor."""
    # (B, C, H, W) -> (B, H, W, C), copied: a permuted view would set the layout of the whole residual stream (adds
    # keep their input's strides), so every LayerNorm and linear of the stage would copy it, forward and backward,
    # instead of this one copy.
    return x.permute(0, 2, 3, 1).contiguous()


class SequencerStage(nn.Module):
    """An optional downsampling followed by a run of blocks of one width."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # torch.fx (x a Proxy) records the blocks themselves: a traced graph recomputes nothing.
        if self.grad_checkpointing and isinstance(x, torch.Tensor) and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------


class Head(nn.Module):
    """Mean over H and W (`global_pool` "avg"; "" keeps the tokens), dropout, linear classifier (`head.fc`, as in
    timm)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        self.global_pool = global_pool
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))  # (B, h, w, C) -> (B, C): global average pooling over the tokens
        x = self.drop(x)
        return x if pre_logits else self.fc(x)  # (..., C) -> (..., num_classes)


def token_mixer(config: SequencerConfig, stage: int) -> RecurrentMixer:
    """The token mixer of one block of `stage`: BiLSTM2D, or the vanilla model's BiLSTM1D."""
    dim, hidden = config.embed_dims[stage], config.hidden_sizes[stage]
    if config.mixer == "1d":
        return BiLSTM1D(dim, hidden, config.cell, config.bidirectional)
    return BiLSTM2D(dim, hidden, config.cell, config.bidirectional, config.union, config.with_fc)


class Sequencer(nn.Module):
    """Sequencer2D (mixer="2d") or vanilla Sequencer (mixer="1d"): stem, four stages, LayerNorm, pooled head."""

    def __init__(self, config: SequencerConfig | None = None, **fields: Any) -> None:
        """Build from `config`, with any of its fields given as keywords on top (`Sequencer(num_classes=10)`)."""
        super().__init__()
        config = dataclasses.replace(config or SequencerConfig(), **fields) if fields else config or SequencerConfig()
        self.config = config
        self.num_classes = config.num_classes
        self.in_chans = config.in_chans
        self.num_features = self.head_hidden_size = config.embed_dims[-1]  # no layer between the pool and the fc
        self.output_fmt, self.feature_dim = "NHWC", -1  # timm's names: forward_features is channels-last
        self.min_input_size = math.prod(config.patch_sizes)
        dims = config.embed_dims
        self.stem = PatchEmbed(config.in_chans, dims[0], config.patch_sizes[0])
        # A learned (1, h, w, C) position table for the default input size; other sizes interpolate it.
        grid = config.img_size // config.patch_sizes[0]
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dims[0])) if config.pos_embed else None

        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks, as in the authors' code.
        total = sum(config.layers)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, reduction, first, feature_info = [], 1, 0, []
        for i, depth in enumerate(config.layers):
            blocks = [
                SequencerBlock(dims[i], token_mixer(config, i), config.mlp_ratio, config.drop_rate, rates[first + j])
                for j in range(depth)
            ]
            downsample = Downsample(dims[i - 1], dims[i], config.patch_sizes[i]) if i > 0 else nn.Identity()
            stages.append(SequencerStage(downsample, blocks))
            first += depth
            reduction *= config.patch_sizes[i]
            feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.feature_info = FeatureInfo(feature_info, tuple(range(len(feature_info))))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = Head(dims[-1], config.num_classes, config.drop_rate)
        self.init_weights()

    def init_weights(self) -> None:
        """The authors' initialisation (xavier linears, lecun convs, zero head, uniform recurrent weights)."""
        for name, module in self.named_modules():
            _init_module(name, module)
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameters grouped by depth (stem, then each stage or block, then the final norm), as timm's models do:
        what timm's optimizer factory uses for layer-wise learning-rate decay (`--layer-decay`)."""
        blocks = (
            [(r"^stages\.(\d+)", None)]
            if coarse
            else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.downsample", (0,)),
            ]
        )
        return dict(stem=r"^stem|^absolute_pos_embed", blocks=[*blocks, (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh zero-initialised one for `num_classes` (0 removes it), on the model's
        device and dtype; `global_pool` "avg" or "" (no pooling: per-token outputs), None keeps the current one."""
        if global_pool is not None:
            if global_pool not in ("", "avg"):
                raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
            self.head.global_pool = global_pool
        self.num_classes = num_classes
        like = self.stem.proj.weight  # the new head goes where the model is, in its dtype and mode
        fc = nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype) if num_classes else None
        self.head.fc = (fc or nn.Identity()).train(self.training)
        _init_module("head.fc", self.head.fc)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming what was expected when `x` cannot go through the network."""
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D (batch, channels, height, width) tensor, got shape {x.shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {x.shape})")
        if x.shape[2] < self.min_input_size or x.shape[3] < self.min_input_size:
            raise ValueError(
                f"input {x.shape[2]}x{x.shape[3]} is smaller than the {self.min_input_size}x{self.min_input_size} "
                "that the stem and downsampling patches need"
            )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Patchify and add the (resized) position embedding: NCHW image to NHWC tokens."""
        if isinstance(x, torch.Tensor):  # under torch.fx x is a Proxy, whose shape Python cannot branch on
            self.check_input(x)
        x = self.stem(x)  # (B, C_in, H, W) -> (B, h, w, C)
        if self.absolute_pos_embed is not None:
            x = x + resize_pos_embed(self.absolute_pos_embed, x.shape[1], x.shape[2])  # broadcast over the batch
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's interface for necks: the output maps of the stages `indices` (all; the last n for an int), NCHW or
        NHWC, the last one through the final norm with `norm`; and the normalised tokens unless `intermediates_only`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take = stage_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        maps = []
        x = self.forward_stem(x)
        stages = self.stages[: take[-1] + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)  # (B, h, w, C) -> (B, h/p, w/p, C') with the stage's patch size p
            if i in take:
                out = self.norm(x) if norm and i == last else x
                # (B, h, w, C) -> (B, C, h, w), contiguous as timm's port returns it (so that .view works on it).
                maps.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out)
        if intermediates_only:
            return maps
        return (self.norm(x) if len(stages) == len(self.stages) else x), maps

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's interface: drop the stages after the last of `indices` (and the norm and head as asked or no longer
        fitting), in place; returns the stage indices kept."""
        take = stage_indices(len(self.stages), indices)
        truncated = take[-1] < len(self.stages) - 1
        self.stages = self.stages[: take[-1] + 1]
        if prune_norm or truncated:
            self.norm = nn.Identity()
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[take[-1]]["num_chs"]
        if prune_head or truncated:
            self.reset_classifier(0, "")  # as timm's port: the tokens (B, h, w, C), unpooled
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C_in, H, W) to normalised tokens (B, h, w, C)."""
        return self.norm(self.stages(self.forward_stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, h, w, C) to logits, or to pooled features with `pre_logits`."""
        return self.head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resize_pos_embed(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The position table (1, h0, w0, C), learned for the default input size, at (1, height, width, C): bicubic."""
    if pos.shape[1] == height and pos.shape[2] == width:
        return pos
    # (1, h0, w0, C) -> (1, C, h0, w0): F.interpolate resizes the last two dimensions; -> (1, C, h, w) -> (1, h, w, C).
    return F.interpolate(pos.permute(0, 3, 1, 2), size=(height, width), mode="bicubic").permute(0, 2, 3, 1)


# torch.fx records the call and runs it with the real map size: a traced model takes every input size.
torch.fx.wrap("resize_pos_embed")


def stage_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    """Stages named by timm's `indices` convention, sorted: all for None, the last n for an int n, else each index
    (negative ones from the end)."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"the last {indices} of {count} stages cannot be taken")
        return list(range(count - indices, count))
    if not indices or any(not -count <= i < count for i in indices):
        raise ValueError(f"out_indices / indices {tuple(indices)} must name stages among 0..{count - 1}")
    return sorted({i % count for i in indices})


class SequencerFeatures(nn.Module):
    """Backbone mode (`features_only=True`): returns the chosen stages' maps (NCHW) instead of logits."""

    def __init__(self, model: Sequencer, out_indices: int | Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.out_indices = stage_indices(len(model.stages), out_indices)
        # A trunk that shares the model's layers but has its own module table, so that dropping what no requested
        # map needs (later stages, the final norm, the classifier) leaves the model it was handed whole.
        trunk = copy.copy(model)
        trunk._modules = dict(model._modules)
        trunk._parameters = dict(model._parameters)
        trunk.stages = model.stages[: self.out_indices[-1] + 1]
        trunk.norm = nn.Identity()
        trunk.head = nn.Identity()
        trunk.num_classes = 0
        self.model = trunk
        # timm's FeatureInfo over the maps returned, so that iterating it gives one dict per map as before.
        self.feature_info = FeatureInfo(
            [dict(model.feature_info[i]) for i in self.out_indices], tuple(range(len(self.out_indices)))
        )
        # The builder's preprocessing config; a model made with Sequencer(config) directly has none.
        self.pretrained_cfg = self.default_cfg = getattr(model, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)


@dataclass(frozen=True)
class Routing:
    """What `route` changed, as (module, attribute, value before); put back when `with` exits."""

    previous: list[tuple[nn.Module, str, Any]]

    def __enter__(self) -> "Routing":
        return self

    def __exit__(self, *exc_info: object) -> None:
        for module, name, value in reversed(self.previous):
            setattr(module, name, value)


def route(model: nn.Module, rnn_impl: str | None = None, onednn_linear: bool | None = None) -> Routing:
    """Set which kernels the mixers and block linears of `model` (any module holding them) run on; `with` it to undo.

    The model's only two performance switches, attributes that `RecurrentMixer.forward` and `FastLinear.forward`
    read; neither touches a parameter, and every kernel computes the paper's function to float rounding.
    - `rnn_impl`: "auto" (the default: torch's RNN layers, one op under torch.compile), "reference" (torch's RNN
      layers everywhere: what module hooks see, what can backpropagate twice through one graph) or "fused" (the
      fused CPU path, `sequencer.recurrence`). TorchScript, torch.fx, tracing and export take torch's RNN layers.
    - `onednn_linear`: False keeps the block linears on F.linear where `sequencer.kernels.onednn` would take
      oneDNN's matmul (AMD CPUs, float32, eager).

    A switch left at None is not touched. Called as a statement, the change stays; as a context manager, every
    module comes back as it was on exit, even when the body raises:

        with route(model, rnn_impl="reference", onednn_linear=False):
            logits = model(images)
    """
    if rnn_impl is not None and rnn_impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown rnn_impl {rnn_impl!r}; expected one of {IMPLEMENTATIONS}")
    switches = [
        (module, name, value)
        for module in model.modules()
        for kind, name, value in ((RecurrentMixer, "rnn_impl", rnn_impl), (FastLinear, "onednn", onednn_linear))
        if isinstance(module, kind) and value is not None
    ]
    previous = [(module, name, getattr(module, name)) for module, name, _ in switches]
    for module, name, value in switches:
        setattr(module, name, value)
    return Routing(previous)


def _init_module(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        if name.startswith("head"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
            return
        nn.init.xavier_uniform_(module.weight)
        if "mlp" in name:
            nn.init.normal_(module.bias, std=1e-6)
        else:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.RNNBase):
        bound = 1.0 / math.sqrt(module.hidden_size)
        for weight in module.parameters():
            nn.init.uniform_(weight, -bound, bound)


# ----------------------------------------------------------------------------------------------------------------
# Official variants, as data: every architecture field of every variant, spelled out (no hidden defaults).
# ----------------------------------------------------------------------------------------------------------------

_S, _M, _L = (4, 3, 8, 3), (4, 3, 14, 3), (8, 8, 16, 4)  # blocks per stage
_P = (7, 2, 1, 1)  # patch sizes: stem 7, then a 2x2 downsampling, then two 1x1 "downsamplings" (channel mixes)
_V = (14, 1, 1, 1)  # the isotropic vanilla model: one 14x14 stem, no downsampling
_D, _D3X, _DV = (192, 384, 384, 384), (256, 512, 512, 512), (384,) * 4  # channels per stage
_H, _H2X, _H3X, _HV = (48, 96, 96, 96), (96, 192, 192, 192), (64, 128, 128, 128), (192,) * 4  # LSTM hidden size
_T, _PT, _DT, _HT = (1, 1, 2, 1), (4, 2, 1, 1), (64, 128, 128, 128), (16, 32, 32, 32)  # sequencer2d_tiny
RELEASES = "https://github.com/okojoalg/sequencer/releases/download/weights"

ARCHITECTURE_FIELDS = (
    "layers", "patch_sizes", "embed_dims", "hidden_sizes", "mixer", "cell", "bidirectional", "union", "with_fc",
    "pos_embed", "img_size",
)  # fmt: skip
# MLP ratio 3 everywhere. Columns as ARCHITECTURE_FIELDS.
# fmt: off
_TABLE = [
    # name                           layers patch dims  hidden mixer cell    bidir  union         fc     pos    size
    ("sequencer2d_s",                _S,    _P,   _D,   _H,    "2d", "lstm", True,  "cat",        True,  False, 224),
    ("sequencer2d_m",                _M,    _P,   _D,   _H,    "2d", "lstm", True,  "cat",        True,  False, 224),
    ("sequencer2d_l",                _L,    _P,   _D,   _H,    "2d", "lstm", True,  "cat",        True,  False, 224),
    ("sequencer2d_s_392",            _S,    _P,   _D,   _H,    "2d", "lstm", True,  "cat",        True,  False, 392),
    ("sequencer2d_m_392",            _M,    _P,   _D,   _H,    "2d", "lstm", True,  "cat",        True,  False, 392),
    ("sequencer2d_l_392",            _L,    _P,   _D,   _H,    "2d", "lstm", True,  "cat",        True,  False, 392),
    ("sequencer2d_s_unidirectional", _S,    _P,   _D,   _H,    "2d", "lstm", False, "cat",        True,  False, 224),
    ("sequencer2d_s_add",            _S,    _P,   _D,   _H,    "2d", "lstm", True,  "add",        True,  False, 224),
    ("sequencer2d_s_h2x",            _S,    _P,   _D,   _H2X,  "2d", "lstm", True,  "cat",        True,  False, 224),
    ("sequencer2d_s_without_fc",     _S,    _P,   _D,   _H,    "2d", "lstm", True,  "cat",        False, False, 224),
    ("sequencer2d_vertical",         _S,    _P,   _D,   _H2X,  "2d", "lstm", True,  "vertical",   False, False, 224),
    ("sequencer2d_s_horizontal",     _S,    _P,   _D,   _H2X,  "2d", "lstm", True,  "horizontal", False, False, 224),
    ("gru_sequencer2d_s",            _S,    _P,   _D,   _H,    "2d", "gru",  True,  "cat",        True,  False, 224),
    ("rnn_sequencer2d_s",            _S,    _P,   _D,   _H,    "2d", "rnn",  True,  "cat",        True,  False, 224),
    ("sequencer2d_l_d4_3x",          _L,    _P,   _D3X, _H3X,  "2d", "lstm", True,  "cat",        True,  False, 224),
    ("v_sequencer_s",                _S,    _V,   _DV,  _HV,   "1d", "lstm", True,  "cat",        False, False, 224),
    ("v_sequencer_s_h",              _S,    _P,   _D,   _H2X,  "1d", "lstm", True,  "cat",        False, False, 224),
    ("v_sequencer_s_pe",             _S,    _V,   _DV,  _HV,   "1d", "lstm", True,  "cat",        False, True,  224),
    # Not in the paper: a 1.04M-parameter model (1,043,688 at 1000 classes) for 32x32 inputs, CPU demos and tests.
    ("sequencer2d_tiny",             _T,    _PT,  _DT,  _HT,   "2d", "lstm", True,  "cat",        True,  False, 32),
]
# fmt: on
VARIANTS: dict[str, SequencerConfig] = {
    name: SequencerConfig(**dict(zip(ARCHITECTURE_FIELDS, row, strict=True))) for name, *row in _TABLE
}
# The authors named the vertical-only ablation without "_s"; the consistent name is an alias.
ALIASES = {"sequencer2d_s_vertical": "sequencer2d_vertical"}
WEIGHTS = {name: f"{RELEASES}/{name}.pth" for name in ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l")}
WEIGHTS.update({f"{name}_392": url for name, url in WEIGHTS.items()})


def default_cfg(name: str, config: SequencerConfig | None = None) -> dict[str, Any]:
    """The preprocessing a registered variant (or `config`, built under its name) expects, in timm's
    `pretrained_cfg` keys."""
    config = config or VARIANTS[ALIASES.get(name, name)]
    size, side = config.img_size, config.img_size // math.prod(config.patch_sizes)
    return dict(
        architecture=name,
        url=WEIGHTS.get(name, ""),
        num_classes=1000,
        input_size=(3, size, size),
        pool_size=(side, side),  # the token map forward_features returns at input_size
        crop_pct=1.0 if size == 32 else 0.875,
        crop_mode="center",
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        first_conv="stem.proj",
        classifier="head.fc",
    )


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names (aliases included) matching a shell-style pattern, sorted."""
    return sorted(n for n in [*VARIANTS, *ALIASES] if fnmatch.fnmatch(n, pattern))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ALIASES",
    "VARIANTS",
    "BiLSTM1D",
    "BiLSTM2D",
    "RecurrentMixer",
    "Sequencer",
    "SequencerBlock",
    "SequencerConfig",
    "SequencerFeatures",
    "count_parameters",
    "default_cfg",
    "list_models",
    "route",
]
