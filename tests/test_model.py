"""The model library: variants, sizes, initialisation, resolutions, errors and backbone use."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import timm
import torch
from timm.models import FeatureInfo
from timm.optim._param_groups import param_groups_layer_decay
from torch import nn

import sequencer
from sequencer.analysis.complexity import count_macs
from sequencer.errors import UsageError
from sequencer.kernels import onednn
from sequencer.kernels.onednn import FastLinear
from sequencer.model import BiLSTM2D, Sequencer, SequencerBlock, SequencerConfig, route

# The authors' code at 1000 classes, to the unit (also in the README's variant table).
PARAMS = {
    "sequencer2d_s": 27_651_688,
    "sequencer2d_m": 38_307_688,
    "sequencer2d_l": 54_298_216,
    "sequencer2d_s_392": 27_651_688,
    "sequencer2d_m_392": 38_307_688,
    "sequencer2d_l_392": 54_298_216,
    "sequencer2d_s_unidirectional": 20_991_592,
    "sequencer2d_s_add": 26_545_768,
    "sequencer2d_s_h2x": 45_395_560,
    "sequencer2d_s_without_fc": 25_433_704,
    "sequencer2d_vertical": 27_645_544,
    "sequencer2d_s_vertical": 27_645_544,
    "sequencer2d_s_horizontal": 27_645_544,
    "gru_sequencer2d_s": 24_874_600,
    "rnn_sequencer2d_s": 19_320_424,
    "sequencer2d_l_d4_3x": 96_252_392,
    "v_sequencer_s": 33_016_552,
    "v_sequencer_s_h": 27_645_544,
    "v_sequencer_s_pe": 33_114_856,
}


@pytest.fixture(scope="module")
def small_s() -> nn.Module:
    """Sequencer2D-S's stem, widths, patches and mixers with one block per stage: resolution logic, at a fraction."""
    return sequencer.create_model("sequencer2d_s", layers=(1, 1, 1, 1)).eval()


def test_every_official_variant_is_registered_with_exact_parameter_count() -> None:
    assert set(PARAMS) <= set(sequencer.list_models())
    for name, expected in PARAMS.items():
        with torch.device("meta"):
            model = sequencer.create_model(name)
        assert sequencer.count_parameters(model) == expected, name


# The published sizes: the paper's (Tatsunami & Taki 2022, Table 1) and the model cards of timm's released
# sequencer2d_*.in1k weights ("Params (M)").
PUBLISHED_MILLIONS = {"sequencer2d_s": (28, 27.7), "sequencer2d_m": (38, 38.3), "sequencer2d_l": (54, 54.3)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_published_sizes_s_m_l(name: str) -> None:
    paper, model_card = PUBLISHED_MILLIONS[name]
    with torch.device("meta"):  # shapes only: counting needs no weights
        ours = sequencer.count_parameters(sequencer.create_model(name))
        timms = sequencer.count_parameters(timm.create_model(name))
    assert round(ours / 1e6) == paper and round(ours / 1e6, 1) == model_card, ours
    assert ours == timms == PARAMS[name]  # timm's implementation of the network, the authors' count to the unit


@pytest.mark.parametrize(("name", "gmacs"), [("sequencer2d_s", 8.4), ("sequencer2d_m", 11.1), ("sequencer2d_l", 16.6)])
def test_macs_count_the_recurrent_layers_and_match_the_paper(name: str, gmacs: float) -> None:
    macs = count_macs(sequencer.create_model(name), (3, 224, 224)) / 1e9
    assert abs(macs - gmacs) / gmacs < 0.03, macs


def test_list_models_filters_and_unknown_names_suggest_close_ones() -> None:
    assert sequencer.list_models("sequencer2d_?") == ["sequencer2d_l", "sequencer2d_m", "sequencer2d_s"]
    assert "sequencer2d_tiny" in sequencer.list_models()
    with pytest.raises(ValueError, match="sequencer2d_s") as info:
        sequencer.create_model("sequencer2d_ss")
    assert "did you mean" in str(info.value)


def test_alias_builds_the_same_network_as_the_authors_name() -> None:
    torch.manual_seed(0)
    a = sequencer.create_model("sequencer2d_vertical")
    b = sequencer.create_model("sequencer2d_s_vertical")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(blk.rnn_tokens.rnn_h is None for blk in a.modules() if isinstance(blk, SequencerBlock))


def test_default_config_of_each_model() -> None:
    cfg = sequencer.create_model("sequencer2d_s").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert sequencer.create_model("sequencer2d_l_392").pretrained_cfg["input_size"] == (3, 392, 392)
    assert sequencer.create_model("sequencer2d_tiny", num_classes=10).pretrained_cfg["num_classes"] == 10


def test_authors_initialisation() -> None:
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_s")
    assert torch.count_nonzero(model.head.fc.weight) == 0 and torch.count_nonzero(model.head.fc.bias) == 0
    block = model.stages[2].blocks[0]
    assert torch.equal(block.norm1.weight, torch.ones(384)) and torch.equal(block.norm1.bias, torch.zeros(384))
    assert 0 < block.mlp_channels.fc1.bias.abs().max() < 1e-4  # N(0, 1e-6), not zero
    assert torch.count_nonzero(block.rnn_tokens.fc.bias) == 0
    fc1 = block.mlp_channels.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / sum(fc1.shape)) + 1e-6  # xavier-uniform bound
    bound = 1 / math.sqrt(96)
    for p in block.rnn_tokens.rnn_v.parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    stem_std = model.stem.proj.weight.std().item()
    assert abs(stem_std - 1 / math.sqrt(3 * 7 * 7)) < 0.02  # lecun-normal (truncated)


def test_stochastic_depth_grows_linearly_over_all_blocks() -> None:
    model = sequencer.create_model("sequencer2d_s", drop_path_rate=0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.modules() if isinstance(b, SequencerBlock)]
    assert len(rates) == 18
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx([0.1 * i / 17 for i in range(18)])


def _plain_2d(mixer: BiLSTM2D, x: torch.Tensor) -> torch.Tensor:
    """The definition, sequence by sequence: each column through rnn_v, each row through rnn_h, unite, project."""
    H, W = x.shape[1], x.shape[2]
    parts = []
    if mixer.rnn_v is not None:
        columns = [mixer.rnn_v(x[:, :, w, :])[0] for w in range(W)]  # each (B, H, D')
        parts.append(torch.stack(columns, dim=2))
    if mixer.rnn_h is not None:
        rows = [mixer.rnn_h(x[:, h, :, :])[0] for h in range(H)]  # each (B, W, D')
        parts.append(torch.stack(rows, dim=1))
    if len(parts) == 2:
        y = torch.cat(parts, dim=-1) if mixer.union == "cat" else parts[0] + parts[1]
    else:
        y = parts[0]
    return mixer.fc(y)


MIXER_CASES = [
    dict(cell=cell, union=union, bidirectional=bi, with_fc=True)
    for cell in ("lstm", "gru", "rnn")
    for union in ("cat", "add", "vertical", "horizontal")
    for bi in (True, False)
] + [dict(cell="lstm", union="cat", bidirectional=True, with_fc=False)]


@pytest.mark.parametrize("case", MIXER_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_2d_mixer_equals_the_plain_column_and_row_formulation(case: dict) -> None:
    torch.manual_seed(0)
    dim, hidden = 16, (4 if not case["with_fc"] else 6)
    mixer = BiLSTM2D(dim, hidden, **case).double()
    x = torch.randn(2, 5, 7, dim, dtype=torch.float64, requires_grad=True)
    y = mixer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _plain_2d(mixer, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(y)
    params = list(mixer.parameters())
    grads = torch.autograd.grad(y, [x, *params], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], grad_out)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)


def test_vanilla_mixer_runs_one_lstm_over_the_raster() -> None:
    torch.manual_seed(0)
    model = sequencer.create_model("v_sequencer_s_h").eval()
    mixer = model.stages[0].blocks[0].rnn_tokens
    x = torch.randn(2, 3, 4, 192)
    expected = mixer.rnn(x.reshape(2, 12, 192))[0].reshape(2, 3, 4, 192)
    torch.testing.assert_close(mixer(x), expected)


def test_any_resolution_with_the_same_weights(small_s: nn.Module) -> None:
    with torch.no_grad():
        for size in ((224, 224), (320, 320), (392, 392), (448, 448), (224, 320), (97, 150)):
            out = small_s(torch.randn(1, 3, *size))
            assert out.shape == (1, 1000) and torch.isfinite(out).all(), size


def test_position_embedding_is_resized_for_other_inputs() -> None:
    model = sequencer.create_model("v_sequencer_s_pe", layers=(1, 1, 1, 1)).eval()
    assert model.absolute_pos_embed.shape == (1, 16, 16, 384)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 392, 280)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 224, 224), "4-D"),
        ((1, 1, 224, 224), "3 input channels"),
        ((1, 3, 10, 224), "smaller than the 14x14"),
    ],
)
def test_impossible_inputs_raise_a_clear_error(small_s: nn.Module, shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_s(torch.randn(*shape))


def test_forward_features_and_head(small_s: nn.Module) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = small_s.forward_features(x)
        assert feats.shape == (2, 16, 16, 384)
        pooled = small_s.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, 384)
        torch.testing.assert_close(small_s.forward_head(feats), small_s.head.fc(pooled))


def test_reset_classifier() -> None:
    model = sequencer.create_model("sequencer2d_tiny")
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_reset_classifier_keeps_the_models_device_dtype_and_mode_and_takes_timms_global_pool() -> None:
    model = sequencer.create_model("sequencer2d_tiny").to(torch.float64).eval()
    model.reset_classifier(10)
    head = model.get_classifier()
    assert (head.weight.dtype, head.weight.device.type, head.training) == (torch.float64, "cpu", False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert model(x).shape == (2, 10)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 4, 4, 128) == model.forward_features(x).shape  # no pooling: the tokens
    model.reset_classifier(5, global_pool="avg")
    assert model(x).shape == (2, 5) and model.head_hidden_size == model.num_features == 128
    with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
        model.reset_classifier(5, global_pool="max")


def test_create_model_builds_on_the_device_and_dtype_asked_and_refuses_unknown_keywords() -> None:
    model = sequencer.create_model("sequencer2d_l", device="meta", dtype=torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in [*model.parameters(), *model.buffers()]} == {("meta", torch.bfloat16)}
    assert model.output_fmt == "NHWC" and model.pretrained_cfg["pool_size"] == (16, 16)
    assert sequencer.create_model("sequencer2d_s_392", device="meta").pretrained_cfg["pool_size"] == (28, 28)
    with pytest.raises(TypeError, match="unexpected keyword argument 'drop_path'"):
        sequencer.create_model("sequencer2d_tiny", drop_path=0.1)  # timm's factory says drop_path_rate


def test_feature_info_is_timms_for_plain_and_features_only_models() -> None:
    model = sequencer.create_model("sequencer2d_s", device="meta")
    info = model.feature_info
    assert isinstance(info, FeatureInfo)
    assert info.channels() == [192, 384, 384, 384] and info.reduction() == [7, 14, 14, 14]
    assert info.module_name() == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert [entry["num_chs"] for entry in info] == info.channels() and info[1]["reduction"] == 14
    backbone = sequencer.SequencerFeatures(model, out_indices=(0, -1))
    assert isinstance(backbone.feature_info, FeatureInfo) and backbone.feature_info.channels() == [192, 384]
    assert [entry["module"] for entry in backbone.feature_info] == backbone.feature_info.module_name()
    assert backbone.feature_info.module_name() == ["stages.0", "stages.3"]


def test_torchvision_feature_extraction_returns_the_stage_maps_as_the_readme_shows() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = sequencer.create_model("v_sequencer_s_pe", layers=(1, 1, 1, 1)).eval()  # resizes its position table
    extractor = create_feature_extractor(model, return_nodes={"stages.1": "s1", "stages.3": "s3"})
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        maps = extractor(x)
        expected = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True)
    assert list(maps) == ["s1", "s3"]
    for got, want in zip(maps.values(), expected, strict=True):
        torch.testing.assert_close(got, want)  # (B, h, w, C): the stages are channels-last


def test_features_only_returns_every_stage_as_nchw() -> None:
    torch.manual_seed(0)
    full = sequencer.create_model("sequencer2d_s").eval()
    backbone = sequencer.create_model("sequencer2d_s", features_only=True).eval()
    backbone.model.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = backbone(x)
        expected = full.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, 192, 32, 32), (1, 384, 16, 16), (1, 384, 16, 16), (1, 384, 16, 16)]
    assert [f["reduction"] for f in backbone.feature_info] == [7, 14, 14, 14]
    assert [f["num_chs"] for f in backbone.feature_info] == [192, 384, 384, 384]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)
        assert got.is_contiguous()  # as timm's maps: got.view(1, -1) works
    last_two = sequencer.create_model("sequencer2d_tiny", features_only=True, out_indices=2)  # timm's "last n"
    assert last_two.out_indices == [2, 3] and last_two.feature_info.channels() == [128, 128]
    plain = sequencer.Sequencer(sequencer.model.VARIANTS["sequencer2d_tiny"])  # no builder: no pretrained_cfg
    direct = sequencer.SequencerFeatures(plain, out_indices=(0,))
    assert direct.pretrained_cfg == {} and direct(torch.randn(1, 3, 32, 32))[0].shape == (1, 64, 8, 8)
    picked = sequencer.create_model("sequencer2d_tiny", features_only=True, out_indices=(1, -1))
    assert len(picked(torch.randn(1, 3, 32, 32))) == 2
    assert not hasattr(picked.model.head, "fc") or isinstance(picked.model.head.fc, nn.Identity)
    with pytest.raises(ValueError, match="out_indices"):
        sequencer.create_model("sequencer2d_tiny", features_only=True, out_indices=(4,))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny", num_classes=5, drop_rate=0.0)
    nn.init.normal_(model.head.fc.weight)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_torchscript_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny", num_classes=10).eval()
    nn.init.normal_(model.head.fc.weight)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_features_only_leaves_the_model_it_was_handed_whole() -> None:
    model = sequencer.create_model("sequencer2d_tiny").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = sequencer.SequencerFeatures(model, out_indices=(1,))
    assert len(model.stages) == 4 and isinstance(model.norm, torch.nn.LayerNorm) and model.num_classes == 1000
    assert model.state_dict().keys() == before.keys()
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 1000)
    assert features(x)[0].shape == (1, 128, 4, 4)
    assert not any(k.startswith(("model.stages.2", "model.norm", "model.head")) for k in features.state_dict())
    assert sequencer.count_parameters(sequencer.create_model("sequencer2d_tiny")) == 1_043_688


def test_route_sets_every_mixer_and_linear_and_restores_them_when_the_body_raises() -> None:
    model = sequencer.create_model("sequencer2d_tiny", rnn_impl="fused")
    mixers = [m for m in model.modules() if isinstance(m, BiLSTM2D)]
    linears = [m for m in model.modules() if isinstance(m, FastLinear)]
    assert len(linears) == 3 * len(mixers) and type(model.head.fc) is nn.Linear  # fc, fc1, fc2; no classifier
    assert {m.rnn_impl for m in mixers} == {"fused"} and all(m.onednn for m in linears)
    mixers[0].rnn_impl = "auto"  # each mixer gets back its own choice, not a model-wide one
    before = [m.rnn_impl for m in mixers]
    # A wrapper holding the model is routed too: every mixer and block linear inside it.
    wrapper = nn.Sequential(model)
    with pytest.raises(RuntimeError, match="body failed"), route(wrapper, rnn_impl="reference", onednn_linear=False):
        assert {m.rnn_impl for m in mixers} == {"reference"} and not any(m.onednn for m in linears)
        raise RuntimeError("body failed")
    assert [m.rnn_impl for m in mixers] == before and all(m.onednn for m in linears)
    with pytest.raises(ValueError, match="unknown rnn_impl 'cudnn'"):
        route(model, rnn_impl="cudnn", onednn_linear=False)
    assert [m.rnn_impl for m in mixers] == before and all(m.onednn for m in linears)  # refused first
    # Called as a statement the change stays; a switch left at None is not touched.
    route(model, rnn_impl="reference")
    assert {m.rnn_impl for m in mixers} == {"reference"} and all(m.onednn for m in linears)


def test_no_module_changes_class_and_a_model_built_directly_is_the_one_create_model_builds() -> None:
    source = "\n".join(path.read_text() for path in Path(sequencer.__file__).parent.rglob("*.py"))
    assert "__class__ =" not in source  # the kernel choice is a branch in the forward, not a swapped class
    torch.manual_seed(0)
    plain = Sequencer(sequencer.model.VARIANTS["sequencer2d_tiny"], num_classes=10).eval()
    built = sequencer.create_model("sequencer2d_tiny", num_classes=10).eval()
    assert [type(m) for m in plain.modules()] == [type(m) for m in built.modules()]
    keys = list(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x)
        with route(plain, rnn_impl="fused", onednn_linear=False):
            assert list(plain.state_dict()) == keys  # routing sets attributes, never parameters or their names
            torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_onednn_linear_off_keeps_the_block_linears_on_f_linear_with_the_same_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny", num_classes=10, rnn_impl="reference").eval()
    nn.init.normal_(model.head.fc.weight)
    x = torch.randn(2, 3, 32, 32)
    calls = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape)
        return fast_linear(*args)

    fast_linear = onednn.linear
    monkeypatch.setattr(onednn, "linear", counted)
    with torch.no_grad():
        routed = model(x)
        assert len(calls) == 3 * 5  # three linears in each of the five blocks
        calls.clear()
        with route(model, onednn_linear=False):
            plain = model(x)
        assert not calls
    torch.testing.assert_close(plain, routed)


def layer_decay_scales(model: nn.Module) -> dict[str, float]:
    """Each parameter's learning-rate scale under timm's layer-wise decay (0.5 per level of depth)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    return {names[id(p)]: group["lr_scale"] for group in groups for p in group["params"]}


def test_layer_decay_groups_by_depth_as_timm_does_for_its_port() -> None:
    ours = layer_decay_scales(sequencer.create_model("sequencer2d_s"))
    assert ours == layer_decay_scales(timm.create_model("sequencer2d_s"))  # same names, same groups
    assert ours["stem.proj.weight"] == min(ours.values()) and ours["head.fc.weight"] == 1.0
    first, last = ours["stages.0.blocks.0.norm1.weight"], ours["stages.3.blocks.2.norm1.weight"]
    assert first < last <= ours["norm.weight"] < 1.0
    with_pe = layer_decay_scales(sequencer.create_model("v_sequencer_s_pe"))
    assert with_pe["absolute_pos_embed"] == with_pe["stem.proj.weight"]  # the embedding sits with the stem


# timm's port answers forward_intermediates from timm 1.0.31 on; older timms (the oldest supported is tested in CI)
# have nothing to compare with, while ours still has the methods.
timm_port_has_intermediates = pytest.mark.skipif(
    not hasattr(timm.models.sequencer.Sequencer2d, "forward_intermediates"),
    reason=f"timm {timm.__version__}'s sequencer2d has no forward_intermediates to compare with",
)


@pytest.fixture(scope="module")
def twins() -> tuple[nn.Module, nn.Module]:
    """Sequencer2D-S, ours and timm's port, with the same random weights."""
    torch.manual_seed(0)
    ours = sequencer.create_model("sequencer2d_s").eval()
    theirs = timm.create_model("sequencer2d_s").eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"indices": 2},
        {"indices": [0, -1], "norm": True},
        {"indices": [1], "stop_early": True, "intermediates_only": True},
        {"output_fmt": "NHWC", "norm": True},
    ],
)
@timm_port_has_intermediates
def test_forward_intermediates_answers_as_timms_port(twins, kwargs: dict) -> None:
    ours, theirs = twins
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        got, want = ours.forward_intermediates(x, **kwargs), theirs.forward_intermediates(x, **kwargs)
    if not kwargs.get("intermediates_only"):
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        got, want = got[1], want[1]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@timm_port_has_intermediates
def test_prune_intermediate_layers_keeps_what_timms_port_keeps() -> None:
    for indices, prune_norm in [(1, False), ([0, 1], False), (2, True)]:
        ours, theirs = sequencer.create_model("sequencer2d_tiny"), timm.create_model("sequencer2d_s")
        assert ours.prune_intermediate_layers(indices, prune_norm) == theirs.prune_intermediate_layers(
            indices, prune_norm
        )
        assert len(ours.stages) == len(theirs.stages) and ours.num_classes == theirs.num_classes == 0
        assert isinstance(ours.norm, nn.Identity) == isinstance(theirs.norm, nn.Identity)
        assert ours.num_features == ours.feature_info[len(ours.stages) - 1]["num_chs"]
        x = torch.randn(1, 3, 32, 32)
        assert ours(x).ndim == theirs(x).ndim == 4 and ours(x).shape[-1] == ours.num_features  # tokens, unpooled


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": -1}, "num_classes must be >= 0"),
        ({"in_chans": 0}, "in_chans >= 1"),
        ({"drop_path_rate": 1.5}, "drop_rate and drop_path_rate are probabilities"),
        ({"drop_rate": -0.1}, "drop_rate and drop_path_rate are probabilities"),
    ],
)
def test_constructor_refuses_values_that_cannot_work(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sequencer.create_model("sequencer2d_tiny", **kwargs)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"union": "max"}, "unknown union 'max'"),
        ({"cell": "lstm2"}, "unknown cell 'lstm2'"),
        ({"mixer": "3d"}, "unknown mixer '3d'"),
        ({"layers": (1, 1)}, "one entry per stage"),
        ({"with_fc": False, "union": "add"}, "without an fc the 2d mixer must output the block width: 96 channels"),
        ({"mixer": "1d", "hidden_sizes": (48, 96, 96, 96)}, "the 1d mixer must output the block width"),
    ],
)
def test_a_config_is_checked_once_when_built_and_then_frozen(fields: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        SequencerConfig(**fields)
    config = sequencer.model.VARIANTS["sequencer2d_s"]
    assert config == SequencerConfig()  # the defaults are Sequencer2D-S's
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.union = "add"
    # Lists (a YAML or JSON config) become tuples, so that a config stays hashable and comparable.
    assert SequencerConfig(layers=[4, 3, 8, 3]) == config
    model = Sequencer(config, num_classes=10)
    assert model.config == dataclasses.replace(config, num_classes=10) and model.num_classes == 10
