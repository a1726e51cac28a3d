"""Sequencer: Deep LSTM for Image Classification (Tatsunami & Taki, NeurIPS 2022), in one file.

Read top to bottom: the token mixers (the linear layer they project with, the 2D recurrent mixer BiLSTM2D, the
vanilla 1D mixer), the channel MLP and the block, the stem, the downsampling and the stage, the head and the network
with its backbone wrapper (`features_only`), the switch that routes the recurrences and linears to their kernels
(`route`), then the table of official variants and the registry (`create_model`, `list_models`).

Tensors inside the network are channels-last, (B, H, W, C), as in the authors' code; the input and the
`features_only` outputs are NCHW. In the shape comments D is a recurrent layer's hidden size, as in the paper: a
bidirectional one outputs 2D channels, the vertical and horizontal ones together 4D.

Parameter names follow timm's layout (`stages.{i}.blocks.{j}...`) so that timm's checkpoints load as they are; the
authors' layout (`blocks.{stage}.{j}...`) is converted by `sequencer.checkpoint`.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from sequencer.errors import UsageError
from sequencer.kernels.onednn import linear as fast_linear
from sequencer.recurrence import (
    COMPILED,
    check_impl,
    compiled_rnn2d,
    directions_of,
    in_recurrence_precision,
    recurrent_weights,
    resolve_impl,
    scan,
    train_mode_for_backward,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
UNIONS = ("cat", "add", "vertical", "horizontal")


# ----------------------------------------------------------------------------------------------------------------
# Token mixers
# ----------------------------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU matmuls run on oneDNN (`sequencer.kernels.onednn`): same parameters and results."""

    # Whether this layer may take oneDNN's matmul where it applies (AMD processors); `route` switches it off and on.
    onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(x, self.weight, self.bias)
        return self._forward_fast(x)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        # torch's F.linear calls MKL's sgemm on the CPU, at about half oneDNN's speed on some processors.
        if self.onednn:
            return fast_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RNN2D(nn.Module):
    """BiLSTM2D: a recurrent net down every column and another along every row, united and projected back to C."""

    def __init__(
        self,
        dim: int,
        hidden_size: int,
        cell: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
        rnn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(CELLS)}")
        if union not in UNIONS:
            raise ValueError(f"unknown union {union!r}; expected one of {UNIONS}")
        self.union = union
        self.cell = cell
        self.hidden_size = hidden_size
        # How the recurrences run (see sequencer.recurrence): "reference" is the authors' two nn.LSTM calls (cuDNN
        # on CUDA); "fused" projects the tokens once for all four directions and advances them together, with a
        # hand-written backward; "auto" picks per device and shape. Under torch.compile all run one custom op.
        self.rnn_impl = check_impl(rnn_impl)
        axis_dim = hidden_size * (2 if bidirectional else 1)
        mixed_dim = 2 * axis_dim if union == "cat" else axis_dim

        def make_rnn() -> nn.RNNBase:
            return CELLS[cell](dim, hidden_size, batch_first=True, bidirectional=bidirectional)

        # Shared by all columns (rnn_v) and by all rows (rnn_h): the axis sequences are folded into the batch.
        self.rnn_v = None if union == "horizontal" else make_rnn()
        self.rnn_h = None if union == "vertical" else make_rnn()
        axes = tuple(axis for axis, rnn in (("v", self.rnn_v), ("h", self.rnn_h)) if rnn is not None)
        self.directions = directions_of(axes, bidirectional)
        self.axes = "".join(axes)
        self.bidirectional = bidirectional
        # The recurrent parameters as a plain list: torch.compile cannot trace through nn.LSTM modules at all.
        self._weights = self._recurrent_weights()
        if with_fc:
            self.fc = Linear(mixed_dim, dim)
        elif mixed_dim != dim:
            raise ValueError(f"without fc the mixer must output the block width: {mixed_dim} channels != dim {dim}")
        else:
            self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_reference(x)
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dispatch on `rnn_impl`, resolved for this input by `sequencer.recurrence.resolve_impl`."""
        if not torch.compiler.is_compiling():
            self._weights = self._recurrent_weights()  # follow replaced parameters (DataParallel replicas, ...)
        needs_backward = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in self._weights))
        impl = resolve_impl(self.rnn_impl, x, needs_backward)
        if impl == "reference":
            rnns = [rnn for rnn in (self.rnn_v, self.rnn_h) if rnn is not None]
            with train_mode_for_backward(rnns, needs_backward):
                return in_recurrence_precision(self._forward_reference, x)
        # (B, H, W, C) -> (B, H, W, 4D), channels [v fwd, v bwd, h fwd, h bwd] (those the variant has): "cat" already.
        if impl == COMPILED:
            x = compiled_rnn2d(x, self._weights, self.cell, self.axes, self.bidirectional)
        else:
            x = scan(x, self._weights, self.cell, self.directions)
        if self.union == "add":
            # (B, H, W, 4D) -> (B, H, W, 2D): the vertical half plus the horizontal half, the reference's v + h.
            half = x.shape[-1] // 2
            x = x[..., :half] + x[..., half:]
        return self.fc(x)  # (B, H, W, 4D or 2D) -> (B, H, W, C)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        v, h = self._reference(x)  # each (B, H, W, 2D), or None for an axis the variant leaves out
        if v is not None and h is not None:
            # "cat": (B, H, W, 4D), [vertical, horizontal] along the channels, the order the fc's trained weights
            # expect; "add": (B, H, W, 2D).
            x = torch.cat([v, h], dim=-1) if self.union == "cat" else v + h
        elif v is not None:
            x = v
        elif h is not None:
            x = h
        return self.fc(x)

    def _reference(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The authors' formulation: two library RNN calls on permuted copies of the map."""
        B, H, W, C = x.shape
        v: torch.Tensor | None = None
        h: torch.Tensor | None = None
        if self.rnn_v is not None:
            # (B, H, W, C) -> (B, W, H, C) -> (B*W, H, C): every column is a sequence of H tokens, top to bottom.
            v = self.rnn_v(x.transpose(1, 2).reshape(B * W, H, C))[0]
            # (B*W, H, 2D) -> (B, W, H, 2D) -> (B, H, W, 2D): each column's outputs back in place.
            v = v.reshape(B, W, H, -1).transpose(1, 2)
        if self.rnn_h is not None:
            # (B, H, W, C) -> (B*H, W, C): every row is a sequence of W tokens, left to right (a view, no copy);
            # (B*H, W, 2D) -> (B, H, W, 2D).
            h = self.rnn_h(x.reshape(B * H, W, C))[0].reshape(B, H, W, -1)
        return v, h

    @torch.jit.unused
    def _recurrent_weights(self) -> list[torch.Tensor]:
        return recurrent_weights([rnn for rnn in (self.rnn_v, self.rnn_h) if rnn is not None])


class RNN1D(nn.Module):
    """The vanilla Sequencer mixer: one bidirectional LSTM over the flattened H*W raster, no projection."""

    def __init__(self, dim: int, hidden_size: int, cell: str = "lstm", bidirectional: bool = True) -> None:
        super().__init__()
        out_dim = hidden_size * (2 if bidirectional else 1)
        if out_dim != dim:
            raise ValueError(f"the 1D mixer has no fc: its {out_dim} output channels must equal dim {dim}")
        self.cell = cell
        self.bidirectional = bidirectional
        self.rnn = CELLS[cell](dim, hidden_size, batch_first=True, bidirectional=bidirectional)
        self._weights = recurrent_weights([self.rnn])  # torch.compile cannot read them off the nn.LSTM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_reference(x)
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """nn.LSTM (in train mode if a backward follows, for cuDNN), or the `rnn2d` op over the raster as one row."""
        if not torch.compiler.is_compiling():
            self._weights = recurrent_weights([self.rnn])
        needs_backward = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in self._weights))
        if resolve_impl("reference", x, needs_backward) == COMPILED:
            B, H, W, C = x.shape
            # (B, H, W, C) -> (B, 1, H*W, C): the raster as a map of one row, scanned horizontally by the 2D op;
            # (B, 1, H*W, 2D) -> (B, H, W, 2D).
            raster = compiled_rnn2d(x.reshape(B, 1, H * W, C), self._weights, self.cell, "h", self.bidirectional)
            return raster.reshape(B, H, W, -1)
        with train_mode_for_backward([self.rnn], needs_backward):
            return in_recurrence_precision(self._forward_reference, x)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # (B, H, W, C) -> (B, H*W, C): the tokens in raster order, row after row, as one sequence per image;
        # (B, H*W, 2D) -> (B, H, W, 2D), where 2D = C (no projection follows).
        return self.rnn(x.reshape(B, H * W, C))[0].reshape(B, H, W, -1)


# ----------------------------------------------------------------------------------------------------------------
# Block, stem, downsampling, stage
# ----------------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Channel MLP: Linear C -> rC, GELU, Linear rC -> C."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
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
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------


class Head(nn.Module):
    """Mean over H and W, dropout, linear classifier (`head.fc`, as in timm)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))  # (B, h, w, C) -> (B, C): global average pooling over the tokens
        return x if pre_logits else self.fc(x)  # (B, C) -> (B, num_classes)


class Sequencer(nn.Module):
    """Sequencer2D (mixer="2d") or vanilla Sequencer (mixer="1d"): stem, four stages, LayerNorm, pooled head."""

    def __init__(
        self,
        layers: tuple[int, ...] = (4, 3, 8, 3),
        patch_sizes: tuple[int, ...] = (7, 2, 1, 1),
        embed_dims: tuple[int, ...] = (192, 384, 384, 384),
        hidden_sizes: tuple[int, ...] = (48, 96, 96, 96),
        mlp_ratio: float = 3.0,
        mixer: str = "2d",
        cell: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
        pos_embed: bool = False,
        img_size: int = 224,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        rnn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if not len(layers) == len(patch_sizes) == len(embed_dims) == len(hidden_sizes):
            raise ValueError("layers, patch_sizes, embed_dims and hidden_sizes need one entry per stage")
        if mixer not in ("1d", "2d"):
            raise ValueError(f"unknown mixer {mixer!r}; expected '1d' or '2d'")
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"num_classes must be >= 0 (0: no head) and in_chans >= 1, got {num_classes}, {in_chans}")
        if not (0 <= drop_rate <= 1 and 0 <= drop_path_rate <= 1):
            raise ValueError(f"drop_rate and drop_path_rate are probabilities, got {drop_rate}, {drop_path_rate}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = embed_dims[-1]
        self.min_input_size = math.prod(patch_sizes)
        self.stem = PatchEmbed(in_chans, embed_dims[0], patch_sizes[0])
        # A learned (1, h, w, C) position table for the default input size; other sizes interpolate it.
        grid = img_size // patch_sizes[0]
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dims[0])) if pos_embed else None

        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks, as in the authors' code.
        total = sum(layers)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, reduction, first = [], 1, 0
        self.feature_info = []
        for i, depth in enumerate(layers):
            dim = embed_dims[i]
            blocks = []
            for j in range(depth):
                if mixer == "2d":
                    token_mixer: nn.Module = RNN2D(dim, hidden_sizes[i], cell, bidirectional, union, with_fc, rnn_impl)
                else:
                    token_mixer = RNN1D(dim, hidden_sizes[i], cell, bidirectional)
                blocks.append(SequencerBlock(dim, token_mixer, mlp_ratio, drop_rate, rates[first + j]))
            downsample = Downsample(embed_dims[i - 1], dim, patch_sizes[i]) if i > 0 else nn.Identity()
            stages.append(SequencerStage(downsample, blocks))
            first += depth
            reduction *= patch_sizes[i]
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = Head(embed_dims[-1], num_classes, drop_rate)
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

    def set_rnn_impl(self, name: str) -> None:
        """Run every 2D mixer's recurrences with implementation `name` ("auto", "reference" or "fused"), for good."""
        route(self, rnn_impl=name)

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh zero-initialised one for `num_classes` (0 removes it)."""
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
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
        self.check_input(x)
        x = self.stem(x)  # (B, C_in, H, W) -> (B, h, w, C)
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed  # (1, h0, w0, C), learned for the default input size
            if pos.shape[1] != x.shape[1] or pos.shape[2] != x.shape[2]:
                # (1, h0, w0, C) -> (1, C, h0, w0): F.interpolate resizes the last two dimensions; -> (1, C, h, w).
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(x.shape[1], x.shape[2]), mode="bicubic")
                pos = pos.permute(0, 2, 3, 1)  # (1, C, h, w) -> (1, h, w, C)
            x = x + pos  # broadcast over the batch
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
                # (B, h, w, C) -> (B, C, h, w) as a view: necks take NCHW, and the next stage reads x, not this.
                maps.append(out.permute(0, 3, 1, 2) if output_fmt == "NCHW" else out)
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
            self.num_features = self.feature_info[take[-1]]["num_chs"]
        if prune_head or truncated:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C_in, H, W) to normalised tokens (B, h, w, C)."""
        return self.norm(self.stages(self.forward_stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, h, w, C) to logits, or to pooled features with `pre_logits`."""
        return self.head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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

    def __init__(self, model: Sequencer, out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> None:
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
        self.feature_info = [model.feature_info[i] for i in self.out_indices]
        self.pretrained_cfg = self.default_cfg = model.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)


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
# Performance routing: which kernels the recurrences and the linears run on
# ----------------------------------------------------------------------------------------------------------------


def route(model: nn.Module, rnn_impl: str | None = None, onednn_linear: bool | None = None) -> Routing:
    """Route every 2D mixer and block linear of `model` (any module holding them) to kernels; `with` it to undo.

    The model's only two performance switches. Neither touches the parameters; every path computes the same
    function, to float32 rounding.

    - `rnn_impl`, per 2D mixer (`RNN2D.rnn_impl`), how the recurrences run (`sequencer.recurrence`). "auto", the
      default, picks per call: cuDNN's nn.LSTM on CUDA; on the CPU the fused path for training steps on large maps,
      nn.LSTM (oneDNN) otherwise. "reference" always runs the authors' two nn.LSTM calls: what module hooks see,
      what can backpropagate twice through one graph. "fused" always runs the fused path. torch.compile (one custom
      op), tracing and export (nn.LSTM) override it; the vanilla 1D mixer always runs nn.LSTM.
    - `onednn_linear`, per block linear (`Linear.onednn`). True, the default, sends float32 CPU matmuls outside
      autocast, compile and export to oneDNN's matmul on AMD processors, where MKL's sgemm trails it
      (`sequencer.kernels.onednn.applies`); False keeps them on F.linear everywhere. The fused recurrence's input
      projection follows only `torch.backends.mkldnn.flags(enabled=False)`, which takes the whole process off
      oneDNN (nn.LSTM and convolutions too).

    A switch left at None is not touched. Called as a statement, the change stays (`Sequencer.set_rnn_impl` is
    `route(model, rnn_impl=name)`); as a context manager, every value comes back on exit, even when the body raises:

        with route(model, rnn_impl="reference", onednn_linear=False):
            logits = model(images)
    """
    if rnn_impl is not None:
        check_impl(rnn_impl)
    previous = []
    for module in model.modules():
        if rnn_impl is not None and isinstance(module, RNN2D):
            previous.append((module, "rnn_impl", module.rnn_impl))
            module.rnn_impl = rnn_impl
        elif onednn_linear is not None and isinstance(module, Linear):
            previous.append((module, "onednn", module.onednn))
            module.onednn = onednn_linear
    return Routing(previous)


class Routing:
    """What `route` changed, as (module, attribute, previous value); restored when a `with` block exits."""

    def __init__(self, previous: list[tuple[nn.Module, str, Any]]) -> None:
        self.previous = previous

    def __enter__(self) -> Routing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for module, name, value in reversed(self.previous):
            setattr(module, name, value)


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
VARIANTS: dict[str, dict[str, Any]] = {name: dict(zip(ARCHITECTURE_FIELDS, row, strict=True)) for name, *row in _TABLE}
# The authors named the vertical-only ablation without "_s"; the consistent name is an alias.
ALIASES = {"sequencer2d_s_vertical": "sequencer2d_vertical"}
WEIGHTS = {name: f"{RELEASES}/{name}.pth" for name in ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l")}
WEIGHTS.update({f"{name}_392": url for name, url in WEIGHTS.items()})


def default_cfg(name: str) -> dict[str, Any]:
    """The preprocessing a variant expects, in timm's `pretrained_cfg` keys."""
    size = VARIANTS[ALIASES.get(name, name)]["img_size"]
    return dict(
        architecture=name,
        url=WEIGHTS.get(name, ""),
        num_classes=1000,
        input_size=(3, size, size),
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


def check_model_name(name: str) -> str:
    """The registered variant that `name` (an alias or a timm-style "name.tag" too) means; UsageError if none."""
    base = name.split(".")[0]
    canonical = ALIASES.get(base, base)
    if canonical not in VARIANTS:
        close = difflib.get_close_matches(base, list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(list_models())}"
        raise UsageError(f"unknown model {name!r}{hint}")
    return canonical


def create_model(
    name: str,
    pretrained: str | bool | None = None,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    unsafe_load: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered variant, optionally with weights (a file, an hf-hub:ORG/REPO, or True for the released).

    A pickled checkpoint that needs more than tensors and plain containers is refused unless `unsafe_load`.
    """
    canonical = check_model_name(name)
    base = name.split(".")[0]  # timm-style tags such as "sequencer2d_s.in1k" name the same network
    args = {**VARIANTS[canonical], **overrides}
    model = Sequencer(num_classes=num_classes, drop_path_rate=drop_path_rate, in_chans=in_chans, **args)
    cfg = default_cfg(base)
    if "img_size" in overrides:
        cfg["input_size"] = (in_chans, overrides["img_size"], overrides["img_size"])
    cfg.update(num_classes=num_classes, input_size=(in_chans, *cfg["input_size"][1:]))
    model.pretrained_cfg = model.default_cfg = cfg
    model.model_name = base
    if pretrained:
        from sequencer.checkpoint import load_pretrained

        if pretrained is True:
            from sequencer.hub import released_weights

            pretrained = released_weights(base, cfg["url"])
        load_pretrained(model, pretrained, unsafe_load=unsafe_load)
    if features_only:
        return SequencerFeatures(model, tuple(out_indices))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ALIASES",
    "RNN1D",
    "RNN2D",
    "VARIANTS",
    "Sequencer",
    "SequencerBlock",
    "SequencerFeatures",
    "check_model_name",
    "count_parameters",
    "create_model",
    "default_cfg",
    "list_models",
    "route",
]
