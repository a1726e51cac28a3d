"""The paper's analyses: the model-zoo table, ERF maps, accuracy against resolution, ImageNet-C robustness."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from sequencer.analysis import erf, robustness, summary
from sequencer.analysis.common import build_compared_model, evenly_spaced_subset, model_labels
from sequencer.builder import create_model
from sequencer.checkpoint import save_weights
from sequencer.data import build_dataset, create_loader, create_transform
from sequencer.errors import UsageError
from sequencer.validate import evaluate

NUM_CLASSES = 3
# MACs at 224 px (with every time step of every recurrent layer counted), as counted by running the layers.
EXACT_MACS = {
    "sequencer2d_s": 8_340_495_360,
    "sequencer2d_m": 11_060_173_824,
    "sequencer2d_l": 16_500_710_400,
    "v_sequencer_s": 8_330_468_352,
    "gru_sequencer2d_s": 7_491_148_800,
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
        return Image.open(path).size


@pytest.fixture(scope="module")
def image_tree(make_image_tree: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/val/<class>/*.png: 3 classes x 4 images of 40x40 px, each class tinted its own colour."""
    names = [f"class{label}" for label in range(NUM_CLASSES)]
    return make_image_tree(tmp_path_factory.mktemp("images"), names, per_class=4, size=40, splits=("val",))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a 3-class sequencer2d_tiny whose head is not zero, so predictions differ between images."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(tiny_model(NUM_CLASSES), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------


def test_summary_reproduces_the_model_zoo_table(run_cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("summary", f"--models 'sequencer2d_[sml]' --out {tmp_path}") == 0
    printed = capsys.readouterr().out  # the markdown table, on stdout
    assert printed.startswith("| model") and printed.count("\n") == 5 and "sequencer2d_m" in printed
    assert png_size(tmp_path / "summary.png")[0] > 400  # the README: each analysis writes a CSV and a PNG
    rows = {r["model"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert list(rows) == ["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"]  # registry order, not alphabetical
    # README model zoo: 28M / 8.4G, 38M / 11.1G, 54M / 16.6G (MACs with the LSTMs counted).
    for name, params_m, gmacs in (("sequencer2d_s", 28, 8.4), ("sequencer2d_m", 38, 11.1), ("sequencer2d_l", 54, 16.6)):
        assert round(float(rows[name]["params_m"])) == params_m
        assert float(rows[name]["gmacs"]) == pytest.approx(gmacs, rel=0.03)
        assert int(rows[name]["img_size"]) == 224
    assert int(rows["sequencer2d_s"]["params"]) == 27_651_688


def test_summary_counts_exactly_what_the_model_zoo_says(capsys: pytest.CaptureFixture[str]) -> None:
    # The recurrent layers are counted from their shapes, unrun: the same integers as running them step by step.
    rows = summary.summarize(["sequencer2d_s", "sequencer2d_m", "sequencer2d_l", "v_sequencer_s", "gru_sequencer2d_s"])
    assert {r["model"]: r["macs"] for r in rows} == EXACT_MACS
    assert capsys.readouterr().err == ""  # no progress bar unless asked for (the command asks)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--models", "resnet*"], "no model matches 'resnet*'"), (["--img-size", "4"], "below the 8 px")],
)
def test_summary_refuses_bad_input_in_one_line(assert_refused, flags: list[str], message: str) -> None:
    assert_refused("summary", "--models", "sequencer2d_tiny", *flags, match=re.escape(message))


def test_summary_markdown_table_and_aliases() -> None:
    # The alias of the vertical ablation is not listed twice, unless asked for by itself.
    assert summary.variant_names("sequencer2d_*vertical") == ["sequencer2d_vertical"]
    assert summary.variant_names("sequencer2d_s_vertical") == ["sequencer2d_s_vertical"]
    with pytest.raises(ValueError, match="no model matches"):
        summary.variant_names("resnet*")
    rows = [dict(model="m", params_m=1.5, gmacs=0.25, img_size=32, params=1_500_000, macs=250_000_000)]
    lines = summary.format_table(rows).splitlines()
    assert lines[0].split("|")[1].strip() == "model" and set(lines[1]) <= set("|-: ")
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "m",
        "1.50",
        "0.25",
        "32",
        "1,500,000",
        "250,000,000",
    ]
    assert summary.format_table(rows, "csv").splitlines()[1] == "m,1.5,0.25,32,1500000,250000000"


# ---------------------------------------------------------------------------------------------------------------
# effective receptive field
# ---------------------------------------------------------------------------------------------------------------


class OneConv(nn.Module):
    """A 3x3 convolution, weights +1 on the red and blue inputs and -1 on green, dressed as a one-level timm model."""

    def __init__(self, out_chs: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out_chs, 3, padding=1, bias=False)
        nn.init.ones_(self.conv.weight)
        with torch.no_grad():
            self.conv.weight[:, 1] = -1
        self.feature_info = [dict(num_chs=out_chs, reduction=1, module="conv")]

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], intermediates_only: bool) -> list:
        return [self.conv(x)]


def test_erf_of_one_convolution_is_its_kernel_footprint() -> None:
    # d(sum of the 5 centre outputs)/d(input) = +5 (red, blue) and -5 (green) on the 3x3 window around the centre:
    # ReLU per colour channel, then the sum over channels, gives 10 (the other order would give 5).
    images = [torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)]  # averaged over 3 images, not batches
    (stage,) = erf.effective_receptive_fields(OneConv(), iter(images), torch.device("cpu"))
    expected = np.zeros((8, 8))
    expected[2:5, 2:5] = 10  # centre of an even map: cell (3, 3), the upper-left of the central four
    np.testing.assert_allclose(stage.erf, expected)
    assert stage.feature_size == (8, 8) and stage.band == 0.5


def test_erf_shows_a_progress_bar_over_the_images_on_a_terminal(capture_stderr) -> None:
    stream = capture_stderr(terminal=True)
    images = [torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)]
    erf.effective_receptive_fields(OneConv(), iter(images), torch.device("cpu"), progress="one conv", total=3)
    assert "one conv" in stream.getvalue() and "/3 [" in stream.getvalue()


def test_cross_share_tells_a_cross_from_a_blob() -> None:
    ys, xs = np.mgrid[:64, :64] - 31.5
    blob = np.exp(-(ys**2 + xs**2) / (2 * 6.0**2))
    cross = ((np.abs(ys) < 2) | (np.abs(xs) < 2)).astype(float) * np.exp(-np.hypot(ys, xs) / 40)
    square = ((np.abs(ys) < 8) & (np.abs(xs) < 8)).astype(float)
    assert erf.cross_share(blob, 2) == pytest.approx(0.5, abs=0.03)  # isotropic, whatever its width
    assert erf.cross_share(cross + 0.01 * blob, 2) > 0.9
    assert erf.cross_share(square, 2) < 0.5
    assert erf.area_for_mass(square, 1.0) == pytest.approx(256 / 64**2)


def test_cross_share_is_bounded_or_says_it_cannot_tell() -> None:
    ys, xs = np.mgrid[:32, :32] - 16
    assert erf.cross_share(np.zeros((32, 32)), 2) is None  # no gradient at all
    assert erf.area_for_mass(np.zeros((32, 32)), 0.5) is None
    assert erf.cross_share((np.hypot(ys, xs) <= 2).astype(float), 2) is None  # all within the centre cell
    only_cross = ((ys == 0) | (xs == 0)).astype(float)
    assert erf.cross_share(only_cross, 2) == 1.0  # was inf: nothing off the cross
    assert erf.cross_share(only_cross * np.exp(-np.hypot(ys, xs)), 0.5) == 1.0
    diagonals = ((np.abs(ys) == np.abs(xs)) & (np.abs(ys) > 3)).astype(float)
    assert erf.cross_share(diagonals, 2) == 0.0  # nothing on the cross


def test_sequencer_erf_is_a_cross_and_a_cnn_erf_is_not() -> None:
    torch.manual_seed(0)
    config = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 96, 96))
    sequencer = create_model("sequencer2d_tiny")
    impls = [m.rnn_impl for m in sequencer.modules() if hasattr(m, "rnn_impl")]
    cnn = timm.create_model("resnet18", zero_init_last=False)  # residual branches live, as in a trained net
    ratios = {}
    for name, model in (("sequencer", sequencer), ("cnn", cnn)):
        stages = erf.effective_receptive_fields(model, erf.random_images(config, 2, 2), torch.device("cpu"))
        assert len(stages) == 4 and all(s.erf.shape == (96, 96) for s in stages)
        ratios[name] = [erf.cross_share(s.erf, s.band) for s in stages]
    assert min(ratios["sequencer"]) > 0.75, ratios
    assert max(ratios["cnn"]) < 0.6, ratios
    # The map is measured in eval mode and leaves the model as it was.
    assert not sequencer.training and [m.rnn_impl for m in sequencer.modules() if hasattr(m, "rnn_impl")] == impls


def test_input_gradient_mode_runs_the_reference_recurrences_and_restores_the_choice() -> None:
    model = create_model("sequencer2d_tiny", rnn_impl="fused").eval()
    with erf.input_gradient_mode(model):
        assert {m.rnn_impl for m in model.modules() if hasattr(m, "rnn_impl")} == {"reference"}
    assert {m.rnn_impl for m in model.modules() if hasattr(m, "rnn_impl")} == {"fused"}
    assert not any(m.training for m in model.modules())


def test_stage_feature_levels_pick_one_level_per_stage() -> None:
    resnet = [dict(reduction=r) for r in (2, 4, 8, 16, 32)]  # act1, layer1..4
    assert erf.stage_feature_levels(resnet) == [1, 2, 3, 4]
    assert erf.stage_feature_levels([dict(reduction=16)] * 12) == [2, 5, 8, 11]  # a ViT's blocks
    assert erf.stage_feature_levels([dict(reduction=16)] * 2) == [0, 1]
    assert erf.stage_feature_levels([dict(reduction=r) for r in (4, 8, 16, 32)]) == [0, 1, 2, 3]


def test_erf_command_writes_table_maps_and_figure(
    run_cli, tmp_path: Path, image_tree: Path, tiny_checkpoint: Path
) -> None:
    out = tmp_path / "erf"
    command = (
        f"{image_tree} --model sequencer2d_tiny --checkpoint {tiny_checkpoint} --compare resnet18 "
        f"--img-size 64 --num-images 3 -b 2 -j 0 --out {out}"
    )
    assert run_cli("erf", command) == 0
    rows = read_csv(out / "erf.csv")
    assert [(r["model"], r["stage"]) for r in rows] == [
        (m, str(s)) for m in ("sequencer2d_tiny", "resnet18") for s in range(1, 5)
    ]
    assert [r["layer"] for r in rows[4:]] == ["layer1", "layer2", "layer3", "layer4"]
    maps = np.load(out / "erf.npz")
    assert sorted(maps.files)[0] == "resnet18/stage1" and maps["sequencer2d_tiny/stage4"].shape == (64, 64)
    width, height = png_size(out / "erf.png")
    assert width > 4 * 200 and height > 2 * 200  # a 2 x 4 grid of maps


def test_erf_maps_do_not_depend_on_how_the_images_are_batched() -> None:
    # Micro-batches of 1 or 3 images (what -b sets, to bound the memory) give the maps of one batch of 4.
    torch.manual_seed(0)
    model = create_model("sequencer2d_tiny").double()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    cpu = torch.device("cpu")
    whole = erf.effective_receptive_fields(model, iter([images]), cpu)
    for batches in (images.split(1), images.split(3)):
        split = erf.effective_receptive_fields(model, iter(batches), cpu)
        for a, b in zip(whole, split, strict=True):
            np.testing.assert_allclose(b.erf, a.erf, rtol=1e-10, atol=1e-300)
    assert whole[0].erf.max() > 0


def erf_maps(run_cli: Callable[..., int], out: Path, *flags: str) -> dict[str, np.ndarray]:
    """The maps `sequencer erf` writes for sequencer2d_tiny without checkpoint (random weights) on 3 noise images."""
    argv = ["erf", "--model", "sequencer2d_tiny", "--img-size", "32", "--num-images", "3", "--out", str(out)]
    assert run_cli(*argv, "--device", "cpu", *flags) == 0
    with np.load(out / "erf.npz") as maps:
        return {name: maps[name] for name in maps.files}


def test_erf_passes_over_a_batch_of_unreadable_images() -> None:
    from sequencer.analysis.erf import dataset_images

    readable = torch.zeros(2, 3, 8, 8)
    [images] = dataset_images([None, (readable, torch.tensor([0, 1]))])
    assert images is readable


def test_erf_seed_fixes_the_random_weights(run_cli, tmp_path: Path) -> None:
    first = erf_maps(run_cli, tmp_path / "a", "--seed", "1")
    torch.manual_seed(12345)  # whatever the global state before the run
    again = erf_maps(run_cli, tmp_path / "b", "--seed", "1", "-b", "1")
    other = erf_maps(run_cli, tmp_path / "c", "--seed", "2")
    assert list(first) == [f"sequencer2d_tiny/stage{i}" for i in range(1, 5)]
    for name in first:
        # Same weights, other micro-batches: equal up to float32 round-off.
        np.testing.assert_allclose(again[name], first[name], rtol=1e-4, atol=1e-6 * first[name].max())
        assert not np.allclose(other[name], first[name], rtol=1e-2), name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compare", "resnet_nope"], "unknown model 'resnet_nope'"),
        (["--compare", "resnet18=MISSING/none.pth"], "checkpoint of resnet18 not found"),
        (["--checkpoint", "MISSING/none.pth"], "checkpoint of sequencer2d_tiny not found"),
        (["--compare", "=x.pth"], "empty model name"),
        (["--num-images", "0"], "argument --num-images: 0 is out of range: it must be >= 1"),
        (["-b", "0"], "argument -b/--batch-size: 0 is out of range: it must be >= 1"),
        (["--amp"], "--amp does not apply"),
        (["--img-size", "4"], "smaller than the 8x8"),
        (["MISSING"], "dataset folder not found"),
    ],
)
def test_erf_refuses_bad_input_in_one_line_before_any_work(
    assert_refused, flags: list[str], message: str, tmp_path: Path
) -> None:
    flags = [flag.replace("MISSING", str(tmp_path / "missing")) for flag in flags]
    out = tmp_path / "out"
    argv = ["erf", "--model", "sequencer2d_tiny", "--device", "cpu", "--out", out, *flags]
    assert_refused(*argv, match=re.escape(message), absent=[out])


# ---------------------------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------------------------


def test_timm_checkpoint_keeps_its_classifier(tmp_path: Path) -> None:
    saved = timm.create_model("resnet18", num_classes=NUM_CLASSES)
    torch.save({"state_dict": saved.state_dict()}, tmp_path / "r18.pth")
    model = build_compared_model("resnet18", tmp_path / "r18.pth")
    assert model.fc.out_features == NUM_CLASSES and not model.training
    torch.testing.assert_close(model.fc.weight, saved.fc.weight)


def test_resolution_command_evaluates_every_size(
    run_cli, tmp_path: Path, image_tree: Path, tiny_checkpoint: Path
) -> None:
    out = tmp_path / "res"
    command = (
        f"{image_tree} --model sequencer2d_tiny --checkpoint {tiny_checkpoint} "
        f"--compare sequencer2d_tiny={tiny_checkpoint} --sizes 48,32 -b 5 -j 0 --out {out}"
    )
    assert run_cli("resolution", command) == 0
    rows = read_csv(out / "resolution.csv")
    assert [(r["model"], r["size"]) for r in rows] == [
        (f"sequencer2d_tiny (tiny.safetensors) #{k}", s) for k in (1, 2) for s in ("32", "48")
    ]
    assert all(r["images"] == "12" and r["train_size"] == "32" for r in rows)
    # Same weights, same numbers; and the 32 px row is what a plain evaluation at 32 px gives.
    assert [r["top1"] for r in rows[:2]] == [r["top1"] for r in rows[2:]]
    model = build_compared_model("sequencer2d_tiny", tiny_checkpoint)
    dataset = build_dataset(str(image_tree), "val", transform=create_transform(model, img_size=32))
    plain = evaluate(model, create_loader(dataset, 4, workers=0), torch.device("cpu"))
    assert float(rows[0]["top1"]) == pytest.approx(plain["top1"], abs=1e-3)
    assert float(rows[0]["loss"]) == pytest.approx(plain["loss"], abs=1e-3)
    assert png_size(out / "resolution.png")[0] > 400


def test_resolution_labels_models() -> None:
    assert model_labels([("a", "x.pth"), ("b", ""), ("a", "")]) == ["a (x.pth)", "b", "a (random init)"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--checkpoint", ""], "no weights for sequencer2d_tiny"),
        (["--sizes", "224,big"], "argument --sizes: invalid int value: 'big'"),
        (["--sizes", "0"], "argument --sizes: 0 is out of range: it must be >= 1"),
        (["--sizes", "4,32"], "smaller than the 8x8"),
        (["--img-size", "64"], "--img-size / --input-size do not apply"),
        (["-b", "0"], "argument -b/--batch-size: 0 is out of range: it must be >= 1"),
        (["--compare", "nope9"], "unknown model 'nope9'"),
        (["--data", "MISSING"], "dataset folder not found"),
        (
            ["--checkpoint", "TWO_CLASSES"],
            "the model has 2 classes but the data has 3 (class0, class1, class2), not one",
        ),
    ],
)
def test_resolution_refuses_bad_input_in_one_line(
    assert_refused, tiny_model, flags: list[str], message: str, tmp_path: Path, image_tree: Path, tiny_checkpoint: Path
) -> None:
    if "TWO_CLASSES" in flags:
        save_weights(tiny_model(2), tmp_path / "two.safetensors")
    data = str(tmp_path / "missing") if "--data" in flags else str(image_tree)
    flags = [f for f in flags if f not in ("--data", "MISSING")]
    flags = [str(tmp_path / "two.safetensors") if f == "TWO_CLASSES" else f for f in flags]
    out = tmp_path / "out"
    argv = ["resolution", data, "--model", "sequencer2d_tiny", "--checkpoint", str(tiny_checkpoint), "-j", "0"]
    assert_refused(*argv, "--device", "cpu", "--out", out, *flags, match=re.escape(message), absent=[out])


# ---------------------------------------------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------------------------------------------


# The `robustness` extra: installed by `make test` and `make test-oldest`, maybe not where the suite runs by hand.
needs_imagecorruptions = pytest.mark.skipif(
    importlib.util.find_spec("imagecorruptions") is None,
    reason='needs the robustness extra: pip install "sequencer[robustness]"',
)


@needs_imagecorruptions
def test_every_corruption_runs_on_this_stack() -> None:
    # imagecorruptions 1.1.2 needs three bridges on NumPy 2 / recent scikit-image / setuptools (see robustness.py).
    library = robustness.imagecorruptions()
    assert tuple(library.get_corruption_names()) == robustness.CORRUPTIONS
    clean = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for name in robustness.CORRUPTIONS:
        corrupted = library.corrupt(clean, severity=5, corruption_name=name)
        assert corrupted.shape == clean.shape and corrupted.dtype == np.uint8, name
        assert np.abs(corrupted.astype(int) - clean).mean() > 1, name


@needs_imagecorruptions
def test_corrupted_images_are_reproducible_and_normalised(image_tree: Path) -> None:
    base = build_dataset(
        str(image_tree), "val", transform=create_transform(create_model("sequencer2d_tiny"), use_prefetcher=True)
    )
    clean = robustness.CorruptedImages(base, "fog", 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    foggy = robustness.CorruptedImages(base, "fog", 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    raw, label = base[5]
    image, target = clean[5]
    torch.testing.assert_close(image, torch.as_tensor(raw).float() / 127.5 - 1.0)
    assert target == label == 1
    np.testing.assert_array_equal(foggy.pixels(5)[0], foggy.pixels(5)[0])
    assert not np.array_equal(foggy.pixels(5)[0], foggy.pixels(6)[0])
    assert not torch.equal(foggy[5][0], image)


def test_corruption_error_is_normalised_by_alexnet(tmp_path: Path) -> None:
    errors = {1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5, 5: 0.6}
    assert robustness.corruption_error(errors, 0.8) == pytest.approx(2.0 / 4.0)
    assert robustness.corruption_error({1: 0.2}, 0.8) is None  # a mean over five cannot normalise one severity
    assert robustness.corruption_error({1: 0.2, 3: 0.4}, {1: 0.5, 2: 0.9, 3: 0.7}) == pytest.approx(0.6 / 1.2)
    (tmp_path / "a.csv").write_text("corruption,severity,error\nfog,1,50\nfog,2,70\n")
    assert robustness.load_alexnet_errors(tmp_path / "a.csv")["fog"] == pytest.approx({1: 0.5, 2: 0.7})  # percent
    (tmp_path / "a.json").write_text(json.dumps({"snow": 0.8, "fog": [0.1, 0.2, 0.3, 0.4, 0.5]}))
    loaded = robustness.load_alexnet_errors(tmp_path / "a.json")
    assert loaded["snow"] == 0.8 and loaded["fog"] == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}
    (tmp_path / "b.json").write_text(json.dumps({"fgo": 0.5}))
    with pytest.raises(ValueError, match="unknown corruptions"):
        robustness.load_alexnet_errors(tmp_path / "b.json")
    assert tuple(robustness.ALEXNET_MEAN_ERRORS) == robustness.CORRUPTIONS  # one per corruption, in its order


@needs_imagecorruptions
def test_robustness_in_python_returns_each_severity_and_the_ce_against_the_alexnet_errors_given(
    tmp_path: Path, image_tree: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = robustness.robustness(
        data=image_tree,
        model="sequencer2d_tiny",
        checkpoint=tiny_checkpoint,
        corruptions=["brightness", "gaussian_noise"],
        severities=[2, 1],
        alexnet_errors={"gaussian_noise": {1: 0.4, 2: 0.6}, "brightness": 0.5},
        limit=6,
        batch_size=4,
        workers=0,
    )
    assert result.clean["count"] == 6 and len(result.clean_images) == 6
    assert [row["corruption"] for row in result.rows] == ["gaussian_noise", "brightness"]  # ImageNet-C order
    noise = result.by_severity["gaussian_noise"]
    assert [r["severity"] for r in noise] == [1, 2] and all(r["images"] == 6 for r in noise)
    assert all(r["error"] == pytest.approx(100 - r["top1"]) for r in noise)
    # CE in percent: the summed errors over AlexNet's at the same severities.
    assert result.rows[0]["ce"] == pytest.approx((noise[0]["error"] + noise[1]["error"]) / (0.4 + 0.6), abs=0.01)
    assert result.rows[1]["ce"] == ""  # a mean over five severities cannot normalise two
    assert result.mce is None and result.mean_error == pytest.approx(np.mean([r["mean_error"] for r in result.rows]))
    assert not list(tmp_path.iterdir())  # the command writes the files, not the function
    with pytest.raises(UsageError, match="--severities: unknown \\[7\\]"):
        robustness.robustness(data=image_tree, model="sequencer2d_tiny", checkpoint=tiny_checkpoint, severities=[7])


@pytest.mark.slow
@needs_imagecorruptions
def test_robustness_command_writes_per_corruption_tables_and_mce(
    run_cli, tmp_path: Path, image_tree: Path, tiny_checkpoint: Path
) -> None:
    alexnet = tmp_path / "alexnet.csv"
    alexnet.write_text(
        "corruption,severity,error\n"
        + "".join(f"{c},{s},{0.5 + 0.1 * s}\n" for c in ("gaussian_noise", "fog") for s in (1, 2))
    )
    out = tmp_path / "rob"
    command = (
        f"{image_tree} --model sequencer2d_tiny --checkpoint {tiny_checkpoint} --corruptions fog,gaussian_noise "
        f"--severities 2,1 --limit 6 --alexnet-errors {alexnet} -b 4 -j 0 --out {out}"
    )
    assert run_cli("robustness", command) == 0
    result = json.loads((out / "summary.json").read_text())
    assert result["images"] == 6 and result["severities"] == [1, 2]
    assert result["corruptions"] == ["gaussian_noise", "fog"]  # ImageNet-C order
    ces = []
    for corruption in result["corruptions"]:
        rows = read_csv(out / "corruptions" / f"{corruption}.csv")
        assert [r["severity"] for r in rows] == ["1", "2"] and all(r["images"] == "6" for r in rows)
        errors = [100 - float(r["top1"]) for r in rows]
        ces.append(100 * sum(errors) / 100 / (0.6 + 0.7))
    table = read_csv(out / "robustness.csv")
    assert [float(r["ce"]) for r in table] == pytest.approx(ces, abs=0.01)
    assert result["mce"] == pytest.approx(np.mean(ces), abs=0.01)
    assert png_size(out / "robustness.png")[0] > 400 and png_size(out / "examples.png")[1] > 200

    # The published means normalise only a run over all five severities: no mCE here, the plain mean error instead.
    command = command.replace(f"--alexnet-errors {alexnet}", "").replace("fog,gaussian_noise", "fog")
    assert run_cli("robustness", command) == 0
    result = json.loads((out / "summary.json").read_text())
    assert result["mce"] is None and result["mean_corruption_error"] == pytest.approx(
        float(read_csv(out / "robustness.csv")[0]["mean_error"])
    )


def test_evenly_spaced_subset_covers_every_class(image_tree: Path) -> None:
    dataset = build_dataset(str(image_tree), "val")
    subset = evenly_spaced_subset(dataset, 3)
    assert sorted(dataset.targets[i] for i in subset.indices) == [0, 1, 2]
    assert evenly_spaced_subset(dataset, 100) is dataset


@pytest.mark.slow
@needs_imagecorruptions
def test_robustness_in_two_processes_writes_what_one_process_does(
    run_cli, torchrun, tmp_path: Path, image_tree: Path, tiny_checkpoint: Path
) -> None:
    flags = [str(image_tree), "--model", "sequencer2d_tiny", "--checkpoint", str(tiny_checkpoint)]
    flags += ["--corruptions", "fog", "--severities", "1,2", "--limit", "7", "-b", "2", "-j", "0", "--device", "cpu"]
    assert run_cli("robustness", *flags, "--out", tmp_path / "one") == 0
    launch = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint"]
    command = ["-m", "sequencer", "robustness", *flags, "--out", str(tmp_path / "two")]
    result = torchrun.run([*launch, torchrun.endpoint()], command, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone writes and prints
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert one["images"] == 7 and 0 < one["mean_corruption_error"] < 100  # 7 images: shards of 4 and 3
    assert two == one
    one, two = (read_csv(tmp_path / name / "corruptions" / "fog.csv") for name in ("one", "two"))
    assert [float(row.pop("loss")) for row in two] == pytest.approx([float(row.pop("loss")) for row in one], abs=2e-4)
    assert two == one and [row["images"] for row in one] == ["7", "7"]
