"""timm train.py's flags on `sequencer train`: each accepted with timm's meaning, and each doing what it says."""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from sequencer import train as train_module
from sequencer.builder import load_model
from sequencer.checkpoint import read_file
from sequencer.cli import build_parser
from sequencer.distributed import process_group
from sequencer.errors import CheckpointError, UsageError
from sequencer.train_config import TrainConfig

# timm's train.py flags: option strings, dest, default, group (NaFlex and distillation among them).
FLAGS = [
    line.split("\t")
    for line in (Path(__file__).parent / "data" / "timm_train_flags.tsv").read_text().splitlines()
    if not line.startswith("#")
]
TIMM_ONLY = ("naflex", "kd_", "distill_loss_weight", "task_loss_weight")
# Defaults that are deliberately not timm 1.0's: the data-dependent ones (None: the digits demo's or the authors'
# train.py's, timm 0.5.4), --lr-base and --lr-base-size (None: timm's, unless the digits demo's --lr applies), and those
# of a model that is not timm's (its input channels, drop path).
OWN_DEFAULTS = {
    "model",
    "in_chans",
    "batch_size",
    "device",
    "amp_dtype",
    "opt",
    "weight_decay",
    "sched_on_updates",
    "lr_base",
    "lr_base_size",
    "warmup_lr",
    "min_lr",
    "epochs",
    "decay_epochs",
    "warmup_epochs",
    "cooldown_epochs",
    "scale",
    "hflip",
    "color_jitter",
    "train_interpolation",
    "drop_path",
    "workers",
    "model_kwargs",
    "opt_kwargs",
}
TINY = "--model sequencer2d_tiny --img-size 16 -j 0 --threads 1 --no-progress --cooldown-epochs 0 --warmup-epochs 0"


@pytest.fixture(scope="module")
def data_root(make_image_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("data"), classes=3, per_class=8)


def test_every_timm_train_flag_is_accepted_with_timm_s_default_and_errors_name_the_subcommand(
    run_cli, capsys, tmp_path: Path
) -> None:
    parser = build_parser("train").command_parsers["train"]
    ours = {name for action in parser._actions for name in action.option_strings} | {"data"}
    wanted = [row for row in FLAGS if not row[1].startswith(TIMM_ONLY)]
    assert (len(FLAGS), len(wanted)) == (164, 149)
    assert [row[0] for row in wanted if not set(row[0].split(",")) <= ours] == []
    defaults = TrainConfig().as_dict()
    dest = {
        name.lstrip("-").replace("-", "_"): action.dest for action in parser._actions for name in action.option_strings
    }
    differing = {
        row[1]
        for row in wanted
        if row[1] not in ("config", "data") and defaults[dest.get(row[1], row[1])] != ast.literal_eval(row[2])
    }
    assert differing == OWN_DEFAULTS
    # timm's own args.yaml, every option at its default (NaFlex and distillation too), reads back as a config.
    timm_yaml = {row[1]: ast.literal_eval(row[2]) for row in FLAGS if row[1] != "config"}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({**timm_yaml, "data": "/d", "initial_checkpoint": "w.pth"}))
    config = TrainConfig.from_yaml(str(tmp_path / "args.yaml"))
    assert (config.checkpoint, config.model, config.patience_epochs) == ("w.pth", "resnet50", 10)
    # timm writes null for "the model's default" (in_chans, drop_path ...): each such field keeps its own default.
    nulls = {
        dest.get(key, key)
        for key, value in timm_yaml.items()
        if value is None and key != "data" and not key.startswith(TIMM_ONLY)
    }
    defaults = TrainConfig()
    assert {key: getattr(config, key) for key in nulls} == {key: getattr(defaults, key) for key in nulls}
    assert (config.in_chans, config.drop_path) == (3, 0.0)
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({"naflex_loader": True}))
    with pytest.raises(UsageError, match="sets options this command does not have: naflex_loader"):
        TrainConfig.from_yaml(str(tmp_path / "args.yaml"))
    assert run_cli("train", "--no-such-flag") == 2
    assert capsys.readouterr().err.strip() == "sequencer train: error: unrecognized arguments: --no-such-flag"


def test_gradient_accumulation_makes_the_update_of_the_larger_batch(run_cli, data_root: Path, tmp_path: Path) -> None:
    # 24 images: 3 updates of 8, each one batch of 8 or two accumulated batches of 4 (the same images, same order).
    base = f"{data_root} {TINY} --epochs 1 --no-aug --smoothing 0 --opt sgd --lr 0.5 --sched none"
    for name, flags in (("big", "-b 8"), ("accumulated", "-b 4 --grad-accum-steps 2"), ("small", "-b 4")):
        assert run_cli("train", f"{base} {flags} -o {tmp_path / name}") == 0
    weights = {name: read_file(tmp_path / name / "last.pth.tar") for name in ("big", "accumulated", "small")}
    assert weights["accumulated"]["num_updates"] == weights["big"]["num_updates"] == 3
    for key, value in weights["big"]["state_dict"].items():
        torch.testing.assert_close(weights["accumulated"]["state_dict"][key], value, rtol=1e-4, atol=1e-6)
    moved = weights["small"]["state_dict"]["head.fc.weight"] - weights["big"]["state_dict"]["head.fc.weight"]
    assert moved.abs().max() > 1e-3  # six smaller updates land elsewhere: the comparison can tell


def test_bce_and_jsd_losses_with_split_augmentation(parse_train, data_root: Path) -> None:
    _, bce = train_module.training_loss(parse_train("--bce-loss --bce-target-thresh 0.2 --bce-sum"), 3)
    assert isinstance(bce, BinaryCrossEntropy) and (bce.target_threshold, bce.sum_classes) == (0.2, True)
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.isclose(bce(logits, targets), BinaryCrossEntropy(0.1, 0.2, sum_classes=True)(logits, targets))
    config = train_module.resolve(parse_train(f"{data_root} {TINY} -b 4 --aug-splits 3 --jsd-loss"))
    with process_group("cpu") as context:
        data = train_module.build_data(config, context)
        train_module.set_transforms(data, train_module.build_training_model(config, 3), config)
        images, labels = next(iter(data.train_loader))
    assert isinstance(data.criterion, JsdCrossEntropy) and data.criterion.num_splits == 3
    # Split-major: the clean copies of the batch, then each augmented (colour-jittered) copy.
    assert images.shape == (12, 3, 16, 16) and torch.equal(labels[:4], labels[4:8])
    assert not torch.equal(images[4:8], images[:4]) and not torch.equal(images[8:], images[4:8])
    assert data.criterion(torch.randn(12, 3), labels).isfinite()


def test_repeated_augmentation_reads_each_image_on_consecutive_draws(parse_train, data_root: Path) -> None:
    config = train_module.resolve(parse_train(f"{data_root} {TINY} -b 4 --aug-repeats 3"))
    with process_group("cpu") as context:
        sampler = train_module.build_data(config, context).train_loader.sampler
    sampler.set_epoch(0)
    order = list(sampler)
    assert len(order) == 24 and all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 24, 3))
    # timm's sampler rounds an epoch down to 256-image blocks: the digits' 1,437 images give 1,280 an epoch.
    with process_group("cpu") as context, pytest.raises(UsageError, match="gives each process 1280 images an epoch"):
        train_module.build_data(train_module.resolve(parse_train("--aug-repeats 3 -b 1300")), context)


def test_schedule_noise_cycles_and_plateau_reach_timm_s_scheduler(parse_train) -> None:
    def rates(words: str) -> list[float]:
        config = train_module.resolve(parse_train(f"/d {words} --epochs 10 --warmup-epochs 0 --cooldown-epochs 0"))
        optimizer = create_optimizer_v2(torch.nn.Linear(2, 2), opt="sgd", lr=0.1)
        scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(config), updates_per_epoch=1)
        seen = []
        for epoch in range(10):
            scheduler.step(epoch)
            seen.append(optimizer.param_groups[0]["lr"])
        return seen

    plain = rates("--lr 0.1")
    noisy = rates("--lr 0.1 --lr-noise 0.5 --lr-noise-pct 0.5")
    assert noisy[:5] == plain[:5] and noisy[5:] != plain[5:]  # noise from half the epochs on
    cycled = rates("--lr 0.1 --lr-cycle-limit 2 --lr-cycle-mul 1 --lr-cycle-decay 0.5 --epochs 5")
    assert cycled[5] == pytest.approx(0.05, rel=1e-4)  # the second cycle restarts at half the peak
    assert rates("--lr 0.1 --lr-k-decay 2")[3] != plain[3]
    try:
        train_module.check_plateau_schedule()
    except UsageError as refused:  # timm 1.0.12 on torch 2.7 (the oldest set): refused in one line, as a run is
        assert "--sched plateau: timm" in str(refused)
        return
    config = train_module.resolve(
        parse_train("/d --sched plateau --patience-epochs 0 --decay-rate 0.5 --lr 0.1 --warmup-epochs 0")
    )
    optimizer = create_optimizer_v2(torch.nn.Linear(2, 2), opt="sgd", lr=0.1)
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(config, decreasing_metric=False))
    scheduler.step(1, 50.0)
    scheduler.step(2, 40.0)  # no better: patience 0 decays at once
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def plateau_runs() -> bool:
    """Whether timm's plateau schedule runs on this timm and torch (not timm 1.0.12 on torch 2.7: refused there)."""
    try:
        train_module.check_plateau_schedule()
    except UsageError:
        return False
    return True


needs_plateau = pytest.mark.skipif(not plateau_runs(), reason="no plateau schedule on this timm and torch")


@needs_plateau
def test_plateau_steps_per_epoch_whatever_the_recipe_and_refuses_per_update_steps(parse_train) -> None:
    config = train_module.resolve(parse_train("--sched", "plateau"))  # the digits demo, whose recipe steps per update
    assert config.sched_on_updates is False
    optimizer = create_optimizer_v2(torch.nn.Linear(2, 2), opt="sgd", lr=0.1)
    create_scheduler_v2(optimizer, **scheduler_kwargs(config), updates_per_epoch=10)  # timm asserts on per-update
    with pytest.raises(UsageError, match=r"^--sched plateau steps once an epoch.*drop --sched-on-updates$"):
        train_module.resolve(parse_train("--sched plateau --sched-on-updates"))
    assert train_module.resolve(parse_train("--sched-on-updates")).sched_on_updates


@needs_plateau
def test_a_resumed_plateau_schedule_goes_on_at_the_rate_it_had_reduced_to(
    run_cli, data_root: Path, tmp_path: Path
) -> None:
    # A rate too small to move the held-out top-1: with patience 0 the schedule halves it after epoch 1.
    command = (
        f"{data_root} {TINY} -b 8 --opt sgd --lr 1e-5 --min-lr 0 --sched plateau --patience-epochs 0 --decay-rate 0.5"
    )
    assert run_cli("train", f"{command} --epochs 3 -o {tmp_path / 'whole'}") == 0
    whole = (tmp_path / "whole" / "summary.csv").read_text().splitlines()
    rates = [float(row.split(",")[5]) for row in whole[1:]]
    assert rates[2] == pytest.approx(rates[1] / 2)
    resume = f"--resume {tmp_path / 'whole' / 'checkpoint-1.pth.tar'}"
    assert run_cli("train", f"{command} --epochs 3 {resume} -o {tmp_path / 'resumed'}") == 0
    assert (tmp_path / "resumed" / "summary.csv").read_text().splitlines() == whole
    # A run at rate 0, and a resume whose optimizer groups differ (--no-resume-opt, no weight decay): resumed too.
    zero = command.replace("--lr 1e-5", "--lr 0")
    assert run_cli("train", f"{zero} --epochs 1 -o {tmp_path / 'zero'}") == 0
    assert run_cli("train", f"{zero} --epochs 2 --resume {tmp_path / 'zero' / 'last.pth.tar'}") == 0
    regrouped = f"--no-resume-opt --weight-decay 0 --resume {tmp_path / 'whole' / 'checkpoint-1.pth.tar'}"
    assert run_cli("train", f"{command} --epochs 3 {regrouped} -o {tmp_path / 'regrouped'}") == 0


def test_start_epoch_starts_the_per_update_schedule_at_its_updates(data_root: Path, tmp_path: Path) -> None:
    flags = dict(
        data=str(data_root), model="sequencer2d_tiny", img_size=16, batch_size=8, workers=0, threads=1,
        no_progress=True, warmup_epochs=0, cooldown_epochs=0, sched_on_updates=True, epochs=2,
    )  # fmt: skip
    whole = train_module.train(**flags, output=str(tmp_path / "whole"))
    started = train_module.train(**flags, start_epoch=1, output=str(tmp_path / "started"))
    assert started["epoch"] == whole["epoch"] == 1
    assert started["lr"] == whole["lr"]  # epoch 1 ends at update 6 of 6, as the run from epoch 0 does
    assert read_file(tmp_path / "started" / "last.pth.tar")["num_updates"] == 6


def test_lr_base_flags_set_the_rate_on_the_digits_demo_too(parse_train) -> None:
    assert train_module.resolve(parse_train()).lr == 3e-3  # the demo's rate, when no --lr-base* flag asks otherwise
    # The demo's adamw scales by the square root of its batch of 64 over --lr-base-size.
    assert train_module.resolve(parse_train("--lr-base 0.2")).lr == pytest.approx(0.2 * (64 / 256) ** 0.5)
    assert train_module.resolve(parse_train("--lr-base-size 64")).lr == pytest.approx(0.1)
    assert train_module.resolve(parse_train("--lr-base-scale linear")).lr == pytest.approx(0.1 * 64 / 256)
    assert train_module.resolve(parse_train("--lr-base 0.1 --lr 0.5")).lr == 0.5  # --lr wins, as in timm
    assert train_module.resolve(parse_train("/d")).lr == pytest.approx(0.1 * 128 / 256)  # sgd: linear


@pytest.mark.parametrize("flag", ["--pretrained-path", "--initial-checkpoint"])
def test_head_init_applies_after_the_starting_weights_as_timm(
    parse_train, data_root: Path, tmp_path: Path, tiny_model, flag: str
) -> None:
    from sequencer.checkpoint import record_of, write_weights

    start = tiny_model(num_classes=3)
    write_weights(start.state_dict(), record_of(start), tmp_path / "s.pth")
    config = train_module.resolve(
        parse_train(f"{data_root} {TINY} {flag} {tmp_path / 's.pth'} --head-init-scale 0 --head-init-bias 0.5")
    )
    model = train_module.build_training_model(config, 3)
    head = model.get_classifier()
    assert not head.weight.any() and torch.all(head.bias == 0.5)
    assert torch.equal(model.stem.proj.weight, start.stem.proj.weight)  # the rest from the file


def test_agc_leaves_the_head_unclipped_as_timm(run_cli, data_root: Path, tmp_path: Path) -> None:
    # Two updates from the same weights: the zero-initialised head leaves the rest without a gradient in the first,
    # so the head's two match those without clipping, and the rest's second is clipped.
    base = f"{data_root} {TINY} -b 12 --epochs 1 --no-aug --smoothing 0 --opt sgd --lr 0.1 --sched none"
    for name, flags in (("plain", ""), ("agc", "--clip-grad 0.001 --clip-mode agc")):
        assert run_cli("train", f"{base} {flags} -o {tmp_path / name}") == 0
    plain, agc = (read_file(tmp_path / name / "last.pth.tar")["state_dict"] for name in ("plain", "agc"))
    for key in ("head.fc.weight", "head.fc.bias"):
        torch.testing.assert_close(agc[key], plain[key])
    assert not torch.allclose(agc["stem.proj.weight"], plain["stem.proj.weight"])


def test_a_second_order_optimizer_trains(run_cli, data_root: Path, tmp_path: Path) -> None:
    assert run_cli("train", f"{data_root} {TINY} -b 8 --epochs 1 --opt adahessian -o {tmp_path}") == 0
    assert read_file(tmp_path / "last.pth.tar")["num_updates"] == 3


def test_an_accumulated_group_short_of_a_skipped_batch_still_makes_its_update(
    run_cli, make_image_tree, tmp_path: Path
) -> None:
    # 6 readable images, one update of all of them; then an unreadable 7th, alone in its batch (None), is skipped.
    root = make_image_tree(tmp_path / "data", per_class=3)
    base = f"{root} {TINY} --epochs 1 --no-aug --smoothing 0 --opt sgd --lr 0.5 --sched none"
    assert run_cli("train", f"{base} -b 6 -o {tmp_path / 'big'}") == 0
    (root / "train" / "class_0" / "corrupt.png").write_bytes(b"not an image")
    assert run_cli("train", f"{base} -b 1 --grad-accum-steps 7 -o {tmp_path / 'accumulated'}") == 0
    big, accumulated = (read_file(tmp_path / name / "last.pth.tar") for name in ("big", "accumulated"))
    assert accumulated["num_updates"] == big["num_updates"] == 1
    for key, value in big["state_dict"].items():
        torch.testing.assert_close(accumulated["state_dict"][key], value, rtol=1e-4, atol=1e-6)


def test_val_interval_recovery_and_the_flags_that_cannot_matter(
    run_cli, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    command = f"{data_root} {TINY} -b 8 --epochs 3 --val-interval 2 --recovery-interval 2 --bn-eps 1e-3 --sync-bn"
    with caplog.at_level(logging.INFO):
        assert run_cli("train", f"{command} -o {tmp_path}") == 0
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]  # epoch 0 not evaluated, the last one always
    assert "epoch 0/2  train loss" in caplog.text and "not evaluated: --val-interval 2" in caplog.text
    assert "--bn-eps has no effect" in caplog.text and "--sync-bn has no effect" in caplog.text
    recovery = read_file(tmp_path / "recovery.pth.tar")  # 3 updates an epoch: the last at update 8, epoch 2
    assert (recovery["epoch"], recovery["num_updates"], recovery["recovery"]) == (1, 6, True)
    # Resumed from it, epoch 2 runs again; epoch 1's files keep epoch 1's weights, not the mid-epoch ones.
    epoch_1 = {name: (tmp_path / name).read_bytes() for name in ("checkpoint-1.pth.tar", "summary.csv")}
    assert run_cli("train", f"{command} -o {tmp_path} --resume {tmp_path / 'recovery.pth.tar'}") == 0
    assert (tmp_path / "checkpoint-1.pth.tar").read_bytes() == epoch_1["checkpoint-1.pth.tar"]
    assert (tmp_path / "summary.csv").read_text().splitlines()[:2] == epoch_1["summary.csv"].decode().splitlines()[:2]


def test_class_map_grayscale_input_and_model_and_optimizer_kwargs(
    run_cli, assert_refused, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "map.txt").write_text("class_2\nclass_0\n")
    flags = (
        f"--class-map {tmp_path / 'map.txt'} --input-img-mode L --in-chans 1 --model-kwargs mlp_ratio=2 "
        "--opt sgd --opt-kwargs nesterov=True --tta 2"
    )
    with caplog.at_level(logging.INFO):
        assert run_cli("train", f"{data_root} {TINY} -b 4 --epochs 1 {flags} -o {tmp_path / 'run'}") == 0
    assert "(2 classes, input 1x16x16)" in caplog.text  # what the model takes, as the record says
    ckpt = read_file(tmp_path / "run" / "last.pth.tar")
    record = ckpt["sequencer_record"]
    assert record["class_names"] == ["class_2", "class_0"] and record["input_size"] == [1, 16, 16]
    assert ckpt["state_dict"]["stem.proj.weight"].shape[1] == 1  # a one-channel stem
    hidden, channels = ckpt["state_dict"]["stages.0.blocks.0.mlp_channels.fc1.weight"].shape
    assert hidden == 2 * channels  # --model-kwargs mlp_ratio=2, not the variant's 3
    assert record["model_args"] == {"mlp_ratio": 2}  # so readers build that architecture
    # Fine-tuned from it, the one-channel model keeps its own statistics (they were divided by 3 again).
    start = f"--initial-checkpoint {tmp_path / 'run' / 'last.pth.tar'}"
    assert run_cli("train", f"{data_root} {TINY} -b 4 --epochs 1 {flags} {start} -o {tmp_path / 'tuned'}") == 0
    tuned = read_file(tmp_path / "tuned" / "last.pth.tar")["sequencer_record"]
    assert (tuned["mean"], tuned["std"]) == (record["mean"], record["std"]) and len(record["mean"]) == 1
    assert load_model(None, tmp_path / "run" / "last.pth.tar", in_chans=1).config.mlp_ratio == 2
    assert ckpt["optimizer"]["param_groups"][0]["nesterov"] is True
    # Resumed on the classes in another order, its head would be recorded as classes it never learned: refused.
    (tmp_path / "other.txt").write_text("class_0\nclass_2\n")
    other = flags.replace(str(tmp_path / "map.txt"), str(tmp_path / "other.txt"))
    resume = f"--resume {tmp_path / 'run' / 'last.pth.tar'} --epochs 2 -o {tmp_path / 'run'}"
    assert_refused(
        "train",
        f"{data_root} {TINY} -b 4 {other} {resume}",
        match="that run's classes are class_2, class_0, this data's class_0, class_2",
        unchanged=tmp_path / "run",
    )


def test_a_run_started_from_averaged_ema_weights_records_its_own_weights(
    run_cli, data_root: Path, tmp_path: Path, tiny_model
) -> None:
    from sequencer.checkpoint import has_ema_weights, open_checkpoint, record_of, write_weights

    start = tiny_model(num_classes=2)
    write_weights(start.state_dict(), replace(record_of(start), ema=True, averaged_from=("a", "b")), tmp_path / "s.pth")
    command = f"{data_root} {TINY} -b 8 --epochs 1 --initial-checkpoint {tmp_path / 's.pth'} -o {tmp_path / 'run'}"
    assert run_cli("train", command) == 0
    last = read_file(tmp_path / "run" / "last.pth.tar")
    assert (last["sequencer_record"]["ema"], last["sequencer_record"]["averaged_from"]) == (False, [])
    assert not has_ema_weights(last)  # so --use-ema on it is refused, not the raw weights scored as the EMA
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        open_checkpoint(tmp_path / "run" / "last.pth.tar", use_ema=True)


def test_tta_averages_each_image_with_its_mirror(tiny_model) -> None:
    from sequencer.validate import evaluate

    model = tiny_model(num_classes=3).eval()
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loader = torch.utils.data.DataLoader(list(zip(images, targets, strict=True)), batch_size=4)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
    loss = torch.nn.functional.cross_entropy(expected, targets).item()
    assert evaluate(model, loader, torch.device("cpu"), tta=2)["loss"] == pytest.approx(loss, rel=1e-5)
    assert evaluate(model, loader, torch.device("cpu"))["loss"] != pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--aug-splits 1", "--aug-splits 1: splits are 0 (off) or >= 2"),
        ("--jsd-loss", "--jsd-loss compares the --aug-splits copies"),
        ("--in-chans 1", None),  # L, from the channel count: accepted
        ("--input-img-mode RGB --in-chans 1", "--input-img-mode RGB reads 3 channel(s), but the model takes 1"),
        ("--torchscript --torchcompile", "--torchscript and --torchcompile both compile the model"),
        ("--model-dtype bfloat16 --amp", "--model-dtype bfloat16 with --amp"),
        ("--model-kwargs bogus=1", "--model-kwargs: create_model() got an unexpected keyword argument 'bogus'"),
        ("--wandb-project p", "--wandb-project"),
        (
            "--opt-kwargs bogus=1",
            "--opt-kwargs with --opt sgd: SGD.__init__() got an unexpected keyword argument 'bogus'",
        ),
    ],
)
def test_flags_that_cannot_work_together_are_refused_before_work(parse_train, flags: str, message: str | None) -> None:
    config = train_module.resolve(parse_train(f"/d {flags}"))
    if message is None:
        train_module.check_config(config)
        assert config.image_mode == "L"
        return
    with pytest.raises(Exception, match=re.escape(message)):
        train_module.check_config(config)
        train_module.build_training_model(config, 3)


def test_optimizer_arguments_the_optimizer_lacks_are_noted_and_left_out_as_timm_does(parse_train) -> None:
    config = train_module.resolve(parse_train("/d --opt sgd --opt-betas 0.9 0.99 --opt-eps 1e-6"))
    train_module.check_config(config)  # timm builds SGD without them
    notes = train_module.no_effect_notes(config)
    assert "--opt-betas has no effect: --opt sgd takes no betas" in notes
    assert "--opt-eps has no effect: --opt sgd takes no eps" in notes
    assert train_module.no_effect_notes(replace(config, opt="adamw")) == []


def test_a_resumed_run_goes_on_in_the_same_tracked_runs(
    run_cli, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path)).items():
        monkeypatch.setenv(name, value)
    command = f"{data_root} {TINY} -b 8 --log-wandb --wandb-tags tiny --log-tensorboard -o {tmp_path / 'run'}"
    assert run_cli("train", f"{command} --epochs 1") == 0
    run_id = (tmp_path / "run" / "wandb-run-id.txt").read_text().strip()
    assert run_cli("train", f"{command} --epochs 2 --resume {tmp_path / 'run' / 'last.pth.tar'}") == 0
    assert (tmp_path / "run" / "wandb-run-id.txt").read_text().strip() == run_id
    runs = sorted(path.name for path in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)  # one W&B run, continued
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("eval_top1")] == [0, 1]  # epochs, as summary.csv counts them


def test_runtime_flags_run_and_leave_their_mark(run_cli, data_root: Path, tmp_path: Path) -> None:
    flags = (
        "--channels-last --torchscript --head-init-scale 0 --head-init-bias 0.5 --save-images --log-interval 1 "
        "--device-modules json --synchronize-step --pin-mem --worker-seeding part --drop-connect 0.1"
    )
    assert run_cli("train", f"{data_root} {TINY} -b 8 --epochs 1 --lr 0 {flags} -o {tmp_path / 'a'}") == 0
    assert sorted(path.name for path in (tmp_path / "a").glob("train-batch-*.jpg")) == [
        "train-batch-1.jpg",
        "train-batch-2.jpg",
        "train-batch-3.jpg",
    ]
    head = read_file(tmp_path / "a" / "last.pth.tar")["state_dict"]
    # --lr 0 keeps the initial head: weights scaled to 0, bias set to 0.5.
    assert not head["head.fc.weight"].any() and torch.all(head["head.fc.bias"] == 0.5)
    assert run_cli("train", f"{data_root} {TINY} -b 8 --epochs 1 --model-dtype bfloat16 -o {tmp_path / 'b'}") == 0
    weights = read_file(tmp_path / "b" / "last.pth.tar")["state_dict"]
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert (
        run_cli(
            "train",
            f"{data_root} {TINY} -b 8 --epochs 1 --pretrained-path {tmp_path / 'a' / 'last.pth.tar'} "
            f"--lr 0 -o {tmp_path / 'c'}",
        )
        == 0
    )
    started = read_file(tmp_path / "c" / "last.pth.tar")["state_dict"]
    assert torch.equal(started["head.fc.bias"], head["head.fc.bias"])  # the weights it started from


def test_aug_splits_skip_an_unreadable_image_as_the_plain_loader_does(run_cli, make_image_tree, tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "data", per_class=4)
    (root / "train" / "class_0" / "corrupt.png").write_bytes(b"not an image")
    assert run_cli("train", f"{root} {TINY} -b 3 --epochs 1 --aug-splits 2 -o {tmp_path / 'run'}") == 0
    assert len((tmp_path / "run" / "summary.csv").read_text().splitlines()) == 2
