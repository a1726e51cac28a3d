"""Sequencer as the backbone of torchvision's detectors (Faster R-CNN, Mask R-CNN, ...): an FPN over its stage maps.

    from torchvision.models.detection import FasterRCNN
    from sequencer.detection import anchor_generator, roi_pool, sequencer_fpn_backbone

    backbone = sequencer_fpn_backbone("sequencer2d_s", pretrained=True)
    detector = FasterRCNN(backbone, num_classes=91, rpn_anchor_generator=anchor_generator(backbone),
                          box_roi_pool=roi_pool(backbone))

Sequencer2D's stages reduce the input by 7, 14, 14 and 14 (patches 7, 2, 1, 1). torchvision's detectors assume
power-of-two strides: MultiScaleRoIAlign rounds each map's scale to a power of two, and the anchor generator steps by
image size // map size. So each map is resampled to the nearest power-of-two stride (7 -> 8, 14 -> 16; nothing to
do for strides that already are one), which keeps anchors and pooled regions on the objects. By default the FPN
takes the deepest stage of each stride (stages 0 and 3: strides 8 and 16 for S/M/L) and adds a max-pooled level
(stride 32); anchors are 8x each level's stride (64, 128, 256 px for S/M/L), as in torchvision's ResNet-FPN.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from sequencer.builder import create_model
from sequencer.errors import UsageError
from sequencer.model import SequencerFeatures


class SequencerFPN(nn.Module):
    """Stage maps of a Sequencer, resampled to power-of-two strides, through a feature pyramid network.

    Returns an OrderedDict of maps ('0', '1', ... and 'pool'), each with `out_channels` channels, as torchvision's
    detectors expect of a backbone.
    """

    def __init__(self, body: SequencerFeatures, out_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        self.body = body
        self.featmap_names = [str(i) for i in range(len(body.feature_info))]
        strides = [2 ** round(math.log2(info["reduction"])) for info in body.feature_info]
        if len(set(strides)) != len(strides):
            raise UsageError(f"out_indices give maps of equal strides {strides}; take one stage per stride")
        self.map_strides = strides
        self.strides = [*strides, 2 * strides[-1]] if extra_pool else strides
        self.out_channels = out_channels
        self.fpn = FeaturePyramidNetwork(
            [info["num_chs"] for info in body.feature_info],
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_pool else None,
        )

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        height, width = images.shape[-2:]
        levels = OrderedDict()
        for name, stride, feature in zip(self.featmap_names, self.map_strides, self.body(images), strict=True):
            size = (math.ceil(height / stride), math.ceil(width / stride))
            if feature.shape[-2:] != size:
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            levels[name] = feature
        return self.fpn(levels)


def sequencer_fpn_backbone(
    name: str,
    pretrained: str | bool | None = None,
    out_indices: tuple[int, ...] | None = None,
    trainable_stages: int | None = None,
    out_channels: int = 256,
    extra_pool: bool = True,
    **overrides,
) -> SequencerFPN:
    """A detection backbone: `create_model(name, pretrained=...)`'s stage maps through an FPN.

    `out_indices`: the stages to use (default: the deepest of each stride). `trainable_stages`: how many of the
    last stages train (default: all); the earlier stages and the stem are frozen. `extra_pool` adds a max-pooled
    level at twice the last stride. `overrides` go to `create_model`.
    """
    model = create_model(name, pretrained=pretrained, **overrides)
    if out_indices is None:
        deepest = {info["reduction"]: i for i, info in enumerate(model.feature_info)}
        out_indices = tuple(sorted(deepest.values()))
    body = SequencerFeatures(model, tuple(out_indices))
    stages = len(body.model.stages)
    trainable = stages if trainable_stages is None else trainable_stages
    if not 0 <= trainable <= stages:
        raise UsageError(f"trainable_stages {trainable_stages}: expected 0 to {stages}")
    if trainable < stages:
        for module in [body.model.stem, *body.model.stages[: stages - trainable]]:
            module.requires_grad_(False)
        if body.model.absolute_pos_embed is not None:
            body.model.absolute_pos_embed.requires_grad_(False)
    return SequencerFPN(body, out_channels, extra_pool)


def anchor_generator(
    backbone: SequencerFPN, size_per_stride: int = 8, aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
) -> AnchorGenerator:
    """One anchor size per pyramid level, `size_per_stride` times its stride, at each aspect ratio."""
    sizes = tuple((size_per_stride * stride,) for stride in backbone.strides)
    return AnchorGenerator(sizes, (aspect_ratios,) * len(sizes))


def roi_pool(backbone: SequencerFPN, output_size: int = 7, sampling_ratio: int = 2) -> MultiScaleRoIAlign:
    """RoI Align over the backbone's maps (not the pooled level): output 7 for boxes, 14 for Mask R-CNN's masks."""
    return MultiScaleRoIAlign(backbone.featmap_names, output_size, sampling_ratio)
