"""timm's generic model contract (the checks of its tests/test_models.py, timm 1.0.31), on every registered name.

What timm checks on its own sequencer2d_*: forward and backward, the default config (the non-standard variant timm
applies to sequencer2d_*), TorchScript, forward_features with feature_info, forward_intermediates with
features_only, prune, and torch.fx (forward, backward, fx + TorchScript). Written here from that contract. Small
inputs keep it fast: each variant is built once with one block per stage (`shallow`: the same layers and the same
traced graph per block as `create_model(name)` makes, which timm checks at full depth); TorchScript, which takes about
a second per model, compiles one variant of each distinct structure.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
import math

import pytest
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo
from timm.models._manipulate import group_parameters
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import sequencer
from sequencer.model import VARIANTS

NAMES = sequencer.list_models()
SIZE = 28  # an input every variant maps to at least 2x2 tokens in its last stage, small enough to be quick


def random_head(model: nn.Module) -> nn.Module:
    """`model` with its classifier drawn at random: the zero-initialised one hides what comes before it."""
    nn.init.normal_(model.head.fc.weight, std=0.02)
    return model


@pytest.fixture(scope="module", params=NAMES)
def shallow(request: pytest.FixtureRequest) -> nn.Module:
    """The variant with one block per stage, once per name."""
    torch.manual_seed(0)
    return random_head(sequencer.create_model(request.param, layers=(1,) * 4))


@pytest.fixture
def model(shallow: nn.Module) -> nn.Module:
    """A copy of the shallow variant, for a test to change."""
    return copy.deepcopy(shallow)


def test_forward_backward_and_gradient_checkpointing(model: nn.Module) -> None:
    model.reset_classifier(42)
    random_head(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model.train()(x)
    out.mean().backward()
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    with torch.no_grad():
        plain = model.eval()(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_default_config_as_timm_checks_its_non_standard_models(name: str) -> None:
    """timm's check of its sequencer2d_* defaults: the structure on the meta device, as timm builds it there."""
    with pytest.raises(TypeError, match="not_a_model_arg"):
        sequencer.create_model(name, device="meta", not_a_model_arg=1)
    model = sequencer.create_model(name, device="meta", dtype=torch.float32).eval()
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size == model.num_features
    cfg, state = model.default_cfg, model.state_dict()
    assert model.in_chans == cfg["input_size"][0] and f"{cfg['classifier']}.weight" in state
    assert f"{cfg['first_conv']}.weight" in state
    assert [p.device.type for p in [*model.parameters(), *model.buffers()]] == ["meta"] * len(state)
    assert model.output_fmt == "NHWC" and model.feature_dim == -1  # timm's channel axis of forward_features

    # A new head is made where the model is, in its dtype and mode; a frozen model stays frozen.
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    assert {(p.device.type, p.dtype) for p in model.get_classifier().parameters()} == {("meta", torch.float64)}
    assert not any(module.training for module in model.modules())
    model.requires_grad_(False)
    model.reset_classifier(0)
    assert not any(p.requires_grad for p in model.parameters())


def test_default_config_matches_the_outputs(model: nn.Module) -> None:
    """The rest of timm's check, run on the CPU (a 32-step LSTM on the meta device takes seconds per layer)."""
    cfg = model.default_cfg
    with torch.no_grad():
        features = model.eval().forward_features(torch.randn(1, *cfg["input_size"]))
        assert features.shape[model.feature_dim] == model.num_features
        assert tuple(features.shape[i] for i in get_spatial_dim(model.output_fmt)) == cfg["pool_size"]
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model.forward_head(features).shape == pooled.shape
        model.reset_classifier(0, "")
        assert model.forward_head(features).shape == features.shape
        x = torch.randn(1, 3, SIZE, SIZE)
        assert model.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16
        headless = sequencer.create_model(model.model_name, num_classes=0, layers=(1,) * 4).eval()
        assert headless(x).shape == (1, headless.head_hidden_size)


# TorchScript compiles every module class anew (about a second a model): once per distinct structure of the
# registered variants, one block per stage (depth and width do not change what is compiled).
STRUCTURES = {
    dataclasses.replace(VARIANTS[name], layers=(), patch_sizes=(), embed_dims=(), hidden_sizes=(), img_size=0): name
    for name in reversed(NAMES)
    if name in VARIANTS
}


@pytest.mark.parametrize("name", sorted(STRUCTURES.values()))
def test_torchscript_of_the_model_and_of_its_fx_trace(name: str) -> None:
    torch.manual_seed(0)
    model = random_head(sequencer.create_model(name, layers=(1,) * 4)).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        traced = torch.jit.script(create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]]))
        (got,) = traced(x).values()
    torch.testing.assert_close(got, expected)


def assert_maps_fit(maps: list[torch.Tensor], channels: list[int], reductions: list[int], fmt: str) -> None:
    """timm's check of feature maps against feature_info: channels, and a side near input / reduction."""
    assert len(maps) == len(channels) == len(reductions) >= 3
    for tensor, chans, reduction in zip(maps, channels, reductions, strict=True):
        assert tensor.shape[get_channel_dim(fmt)] == chans and torch.isfinite(tensor).all()
        for axis in get_spatial_dim(fmt):
            assert SIZE / (2 * reduction) < tensor.shape[axis] <= math.ceil(SIZE / reduction) + 1


def test_features_only_maps_follow_feature_info(model: nn.Module) -> None:
    backbone = sequencer.SequencerFeatures(model).eval()
    info = backbone.feature_info
    assert isinstance(info, FeatureInfo) and info.module_name() == [f"stages.{i}" for i in range(4)]
    assert [entry["num_chs"] for entry in info] == info.channels()  # still a sequence of dicts
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, SIZE, SIZE))
    assert_maps_fit(maps, info.channels(), info.reduction(), getattr(backbone, "output_fmt", "NCHW"))


def test_forward_intermediates_follow_feature_info(model: nn.Module) -> None:
    info = FeatureInfo(model.feature_info, len(model.feature_info))  # how timm wraps a plain model's list
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        final, maps = model.eval().forward_intermediates(x, output_fmt="NCHW")
        assert_maps_fit(maps, info.channels(), info.reduction(), "NCHW")
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


def test_pruning_keeps_each_stage_and_what_trains(model: nn.Module) -> None:
    x = torch.randn(2, 3, SIZE, SIZE)
    last = len(model.feature_info) - 1
    with torch.no_grad():
        expected = model.eval()(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(kept(x), expected)
    for i in range(last + 1):
        with torch.no_grad():
            early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early[0], taps[i])
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i])
            torch.testing.assert_close(
                pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0], taps[i]
            )
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i], prune_norm=True)
            if i < last:  # without the norm the features end at the tap (NHWC)
                torch.testing.assert_close(pruned.forward_features(x).permute(0, 3, 1, 2), taps[i])
        pruned.train()
        selected = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        sum(t.sum() for t in [*selected, pruned.forward_features(x)]).backward()
        assert [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None] == []


def test_fx_traces_eval_and_train_mode_to_the_eager_outputs_and_gradients(model: nn.Module) -> None:
    x = torch.randn(1, 3, SIZE, SIZE + 7)  # not square: the vertical and horizontal sequences differ in length
    for training in (False, True):
        model.train(training)
        traced = torch.fx.symbolic_trace(model)
        eager_x, traced_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, got = model(eager_x), traced(traced_x)
        torch.testing.assert_close(got, expected)
        upstream = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, [eager_x, *model.parameters()], upstream)
        got_grads = torch.autograd.grad(got, [traced_x, *traced.parameters()], upstream)
        for e, g in zip(expected_grads, got_grads, strict=True):
            # Eager runs an eval-mode model's RNN layers in train mode when a backward follows, fx as they are.
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


def test_fx_feature_extraction_as_timm_and_torchvision_do_it(model: nn.Module) -> None:
    """timm's fx forward and backward tests go through torchvision's create_feature_extractor: so do necks."""
    x = torch.randn(2, 3, SIZE, SIZE)
    train_nodes, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1], *STAGES]
    ).eval()
    with torch.inference_mode():
        expected, maps = model.eval()(x), model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        got = extractor(x)
    torch.testing.assert_close(got[eval_nodes[-1]], expected, rtol=1e-4, atol=1e-5)
    for stage, tensor in zip(STAGES, maps, strict=True):
        torch.testing.assert_close(got[stage], tensor)  # the stage maps, channels-last as the stages keep them
    (out,) = extractor.train()(x).values()
    out.mean().backward()
    assert out.shape == (2, model.num_classes)
    assert [n for n, p in extractor.named_parameters() if p.grad is None] == []
    assert sum(p.numel() for p in extractor.parameters()) == sum(p.numel() for p in model.parameters())


STAGES = [f"stages.{i}" for i in range(4)]


def test_every_name_is_checked() -> None:
    assert len(NAMES) == 20 and len(STRUCTURES) == 10
    assert not [n for n in NAMES if not fnmatch.fnmatch(n, "*sequencer*")]
