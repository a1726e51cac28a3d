"""The FPN backbone in torchvision's Faster R-CNN and Mask R-CNN, on non-square synthetic images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN

from sequencer.checkpoint import extract_state_dict, read_file
from sequencer.detection import anchor_generator, roi_pool, sequencer_fpn_backbone
from sequencer.errors import UsageError

HEIGHT, WIDTH = 64, 96  # non-square, multiples of 32 so torchvision's batching adds no padding


def synthetic_batch(n: int, seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Dim noise with one bright rectangle per image; its box (class 1) and mask are the targets."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, HEIGHT, WIDTH, generator=generator) * 0.3
        w, h = (int(v) for v in torch.randint(16, 40, (2,), generator=generator))
        x, y = (
            int(torch.randint(0, WIDTH - w, (1,), generator=generator)),
            int(torch.randint(0, HEIGHT - h, (1,), generator=generator)),
        )
        image[:, y : y + h, x : x + w] = 1.0
        mask = torch.zeros(1, HEIGHT, WIDTH, dtype=torch.uint8)
        mask[:, y : y + h, x : x + w] = 1
        box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
        images.append(image)
        targets.append({"boxes": box, "labels": torch.ones(1, dtype=torch.int64), "masks": mask})
    return images, targets


def test_pyramid_levels_sit_on_power_of_two_strides(checkpoint: Path) -> None:
    # Sequencer2D-S's patch sizes (strides 7 and 14) on the tiny widths: the maps are resampled to strides 8 and 16.
    backbone = sequencer_fpn_backbone("sequencer2d_tiny", patch_sizes=(7, 2, 1, 1), out_channels=32)
    assert backbone.body.out_indices == [0, 3]  # the deepest stage of each stride
    assert backbone.strides == [8, 16, 32] and backbone.featmap_names == ["0", "1"]
    maps = backbone(torch.randn(2, 3, HEIGHT, WIDTH))
    assert list(maps) == ["0", "1", "pool"]
    for feature, stride in zip(maps.values(), backbone.strides, strict=True):
        assert feature.shape == (2, 32, HEIGHT // stride, WIDTH // stride)
    sizes = anchor_generator(backbone).sizes
    assert sizes == ((64,), (128,), (256,))
    # torchvision's RoI Align infers exactly these scales from the maps (it rounds to powers of two).
    pool = roi_pool(backbone)
    pool(maps, [torch.tensor([[0.0, 0.0, 32.0, 32.0]])], [(HEIGHT, WIDTH)])
    assert pool.scales == [1 / 8, 1 / 16]

    with pytest.raises(UsageError, match="equal strides"):
        sequencer_fpn_backbone("sequencer2d_tiny", out_indices=(2, 3))
    frozen = sequencer_fpn_backbone("sequencer2d_tiny", pretrained=str(checkpoint), trainable_stages=1)
    key = "stages.3.blocks.0.mlp_channels.fc1.weight"
    assert torch.equal(frozen.body.model.state_dict()[key], extract_state_dict(read_file(checkpoint))[key])
    trains = {name.split(".")[2] for name, p in frozen.body.named_parameters() if p.requires_grad}
    assert trains == {"3"}  # stages.3 only: the stem and stages 0-2 are frozen
    assert all(p.requires_grad for p in frozen.fpn.parameters())


@pytest.mark.slow
def test_faster_rcnn_trains_on_synthetic_boxes() -> None:
    torch.manual_seed(0)
    backbone = sequencer_fpn_backbone("sequencer2d_tiny", out_channels=64)
    assert backbone.strides == [4, 8, 16]
    detector = FasterRCNN(
        backbone,
        num_classes=2,
        min_size=HEIGHT,
        max_size=WIDTH,
        rpn_anchor_generator=anchor_generator(backbone),
        box_roi_pool=roi_pool(backbone),
        representation_size=128,
        # Fewer proposals and samples than torchvision's defaults: a handful of small images needs no more.
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
    )
    images, targets = synthetic_batch(4, seed=0)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=5e-4)
    detector.train()
    losses = []
    for _ in range(15):
        loss = sum(detector(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses
    detector.eval()
    with torch.no_grad():
        (detections,) = detector(images[:1])
    assert detections["boxes"].shape[1] == 4


def test_mask_rcnn_accepts_the_backbone() -> None:
    torch.manual_seed(0)
    backbone = sequencer_fpn_backbone("sequencer2d_tiny", out_channels=32)
    detector = MaskRCNN(
        backbone,
        num_classes=2,
        min_size=HEIGHT,
        max_size=WIDTH,
        rpn_anchor_generator=anchor_generator(backbone),
        box_roi_pool=roi_pool(backbone),
        mask_roi_pool=roi_pool(backbone, output_size=14),
    ).train()
    images, targets = synthetic_batch(2, seed=1)
    losses = detector(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert backbone.body.model.stem.proj.weight.grad is not None
