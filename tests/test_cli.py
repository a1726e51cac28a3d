"""The `sequencer` command line: light parsers, each subcommand's flags beside the module doing its work."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sequencer
from sequencer import cli, runtime
from sequencer.choices import CORRUPTIONS
from sequencer.config import Bounded, CommaList
from sequencer.options import apply_config

HEAVY = ("torch", "timm", "torchvision", "numpy", "matplotlib", "PIL")


def help_text(command: str) -> str:
    """`sequencer COMMAND --help`, as printed (lines joined, so that wrapped names read whole)."""
    return " ".join(cli.build_parser(command).command_parsers[command].format_help().split())


def test_every_parser_and_help_builds_without_importing_torch() -> None:
    script = (
        "import sys\nfrom sequencer import cli\n"
        "for name in [None, *cli.COMMANDS]:\n"
        "    parser = cli.build_parser(name)\n"
        "    parser.format_help()\n"
        "    name and parser.command_parsers[name].format_help()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def imported_modules(path: Path) -> set[str]:
    """The modules a source file imports (absolute imports)."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_flag_names_live_in_choices_which_the_work_modules_import_instead_of_the_parsers() -> None:
    package = Path(sequencer.__file__).parent
    assert imported_modules(package / "choices.py") <= {"__future__", "typing"}  # no torch: every parser reads it
    work_modules = [p for p in package.rglob("*.py") if p.parent.name != "commands" and p.name != "cli.py"]
    importers = [p.name for p in work_modules if any(m.startswith("sequencer.commands") for m in imported_modules(p))]
    assert importers == []


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_has_its_flags_module_and_a_runner(command: str) -> None:
    flags = importlib.import_module(f"sequencer.commands.{command}")
    assert flags.__doc__ and callable(flags.add_arguments)
    assert callable(importlib.import_module(cli.COMMANDS[command][0]).run)
    assert cli.build_parser(command).command_parsers[command].description == flags.__doc__


def test_the_public_predict_and_export_stay_functions_once_the_commands_are_imported() -> None:
    for command in ("predict", "export"):
        importlib.import_module(f"sequencer.commands.{command}")
        importlib.import_module(cli.COMMANDS[command][0])
    assert callable(sequencer.predict) and callable(sequencer.export)


def test_version(run_cli, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("--version") == 0 and capsys.readouterr().out == f"sequencer {sequencer.__version__}\n"


def test_help_shows_real_defaults() -> None:
    text = help_text("train")
    assert "random seed (per epoch and rank) (default: 42)" in text
    assert "sequencer2d_tiny" in text and "torch/oxford_iiit_pet" in text  # the digits recipe, the transfer sets


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("robustness {tmp} --corruptions fog,hail", "hail"),
    ],
)
def test_names_checked_when_the_command_runs_end_in_one_line_before_any_work(
    assert_refused, tmp_path: Path, words: str, message: str
) -> None:
    assert_refused(words.format(tmp=tmp_path), match=re.escape(message), unchanged=tmp_path)


@pytest.fixture(scope="module")
def data(make_image_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("data"), classes=2, per_class=2, size=40)


TINY = "--model sequencer2d_tiny -j 0 --device cpu"


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("predict {data}/val -b 0 " + TINY, "argument -b/--batch-size: 0 is out of range: it must be >= 1"),
        ("predict {data}/val --img-size 4 " + TINY, "input 4x4 is smaller than the 8x8"),
        ("predict {data}/val --topk 0 " + TINY, "argument --topk: 0 is out of range"),
        ("validate {data} --crop-pct 1.5 " + TINY, "argument --crop-pct: 1.5 is out of range: it must be > 0 and <= 1"),
        ("validate {data} --std 0.2 0 0.2 " + TINY, "argument --std: 0 is out of range: it must be > 0"),
        ("validate {data} --in-chans 1 --input-img-mode RGB " + TINY, "the input has 1 channels (--in-chans / --input"),
        ("validate {data} --input-size 1 32 32 " + TINY, "the input has 1 channels (--in-chans / --input-size)"),
        ("predict {data}/val --input-size 3 32 4 " + TINY, "input 32x4 is smaller than the 8x8"),
        ("validate {data} --threads 0 " + TINY, "argument --threads: 0 is out of range: it must be >= 1"),
        ("train {data} --in-chans 1 --input-img-mode RGB " + TINY, "--input-img-mode RGB reads 3 channel(s)"),
        ("train {data} --scale 0.9 0.1 " + TINY, "--scale 0.9 0.1: the first value must be <= the second"),
        ("train {data} --cutmix-minmax 0.5 0.5 " + TINY, "--cutmix-minmax 0.5 0.5: the first value must be <"),
        ("train {data} --ratio 0 1 " + TINY, "argument --ratio: 0 is out of range: it must be > 0"),
        ("robustness {data} --limit 0 " + TINY, "argument --limit: 0 is out of range"),
        ("robustness {data} --alexnet-errors {tmp}/no.json " + TINY, "--alexnet-errors {tmp}/no.json: file not found"),
        ("erf --num-images 0 " + TINY, "argument --num-images: 0 is out of range"),
        ("average {tmp} -n 0 -o {tmp}/avg.pth", "argument -n/--num: 0 is out of range"),
        ("variants " + TINY, "name ROOT, the folder holding the datasets, or their folders with --imagenet-val"),
    ],
)
def test_bad_values_of_any_command_end_in_one_line_before_any_work(
    assert_refused, data: Path, tmp_path: Path, words: str, message: str
) -> None:
    words = words.format(data=data, tmp=tmp_path)
    assert_refused(
        words, "--output", tmp_path / "out", match=re.escape(message.format(tmp=tmp_path)), unchanged=tmp_path
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("epochs: 0", "argument --epochs: 0 is out of range: it must be >= 1"),
        ("std: [0.2, 0, 0.2]", "argument --std: 0 is out of range: it must be > 0"),
        ("drop_path: lots", "argument --drop-path: invalid float value: 'lots'"),
        ("sched: cosin", "argument --sched: invalid choice: 'cosin'"),
    ],
)
def test_config_values_are_checked_like_the_command_line(
    run_cli, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, config: str, message: str
) -> None:
    (tmp_path / "args.yaml").write_text(config + "\n")
    assert run_cli(f"train {data} {TINY} -c {tmp_path / 'args.yaml'} --output {tmp_path / 'out'}") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sequencer train: error: --config {tmp_path / 'args.yaml'}: {message}")
    assert error.count("\n") == 1 and not (tmp_path / "out").exists()


def test_config_values_are_read_like_the_command_line(tmp_path: Path) -> None:
    # YAML reads 1e-3 (no dot) as a string; the flag's type makes it the number the command line would.
    # timm's args.yaml writes null for "the model's default": the flag keeps its own default.
    (tmp_path / "args.yaml").write_text(
        "lr: 1e-3\nscale: [0.5, 1]\ninterpolation: ''\nepochs: 3\nin_chans: null\ndrop_path: null\n"
    )
    parser = cli.build_parser("train")
    apply_config(parser.command_parsers["train"], str(tmp_path / "args.yaml"))
    args = parser.parse_args(["train", "--epochs", "5"])
    assert args.lr == 0.001 and args.scale == [0.5, 1.0] and args.interpolation == ""
    assert (args.in_chans, args.drop_path) == (3, 0.0)
    assert args.epochs == 5  # the command line wins


def bounded_flags() -> list[tuple[str, argparse.Action, Bounded]]:
    """(command, flag, its range) for every flag of every subcommand whose values (or list items) have a range."""
    found = []
    for command in cli.COMMANDS:
        for action in cli.build_parser(command).command_parsers[command]._actions:
            limits = action.type.item if isinstance(action.type, CommaList) else action.type
            if isinstance(limits, Bounded):
                found.append((command, action, limits))
    return found


# The options whose every flag must keep a range: the former table of ranges (keyed by dest), and the lists of sizes.
RANGED = {
    *("batch_size", "workers", "threads", "num_classes", "in_chans", "img_size", "input_size", "crop_pct", "std"),
    *("validation_batch_size", "epochs", "lr", "lr_base", "lr_base_size", "warmup_lr", "min_lr", "warmup_epochs"),
    *("cooldown_epochs", "weight_decay", "momentum", "clip_grad", "drop", "drop_path", "smoothing", "scale", "ratio"),
    *("hflip", "vflip", "reprob", "recount", "mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob"),
    *("model_ema_decay", "checkpoint_hist", "log_interval", "topk", "tolerance", "num", "repeats", "warmup"),
    *("num_images", "limit", "resolutions", "batch_sizes", "sizes", "opt_eps", "opt_betas"),
}


def test_every_ranged_option_of_every_command_keeps_its_range() -> None:
    ranged = {(command, action.dest) for command, action, _ in bounded_flags()}
    for command in cli.COMMANDS:
        dests = {action.dest for action in cli.build_parser(command).command_parsers[command]._actions}
        assert {(command, dest) for dest in dests & RANGED} <= ranged, command
    assert {dest for _, dest in ranged} >= RANGED


def _out_of_range(limits: Bounded) -> list[float]:
    """The values just outside `limits`: below the lowest allowed, the excluded bound itself, above the highest."""
    step = 1 if limits.kind is int else 0.01
    values = [limits.low - step] if limits.low is not None else []
    values += [limits.above] if limits.above is not None else []
    return values + ([limits.high + step] if limits.high is not None else [])


@pytest.mark.parametrize(
    ("command", "action", "limits"), bounded_flags(), ids=[f"{c} {a.dest}" for c, a, _ in bounded_flags()]
)
def test_each_ranged_flag_refuses_values_outside_its_range_while_parsing(
    run_cli, capsys: pytest.CaptureFixture, command: str, action: argparse.Action, limits: Bounded
) -> None:
    inside = limits.low if limits.low is not None else limits.high if limits.high is not None else limits.above + 1
    count = 2 if action.nargs == "+" or isinstance(action.type, CommaList) else action.nargs or 1
    flag = action.option_strings[-1]
    assert limits(str(inside)) == inside  # the lowest (or highest) allowed value itself is taken
    for value in _out_of_range(limits):
        # A list is checked item by item: only its last value is outside.
        values = [*[inside] * (count - 1), value]
        words = [",".join(map(str, values))] if isinstance(action.type, CommaList) else values
        assert run_cli(command, flag, *words) == 2
        error = capsys.readouterr().err
        assert error == (
            f"sequencer {command}: error: argument {'/'.join(action.option_strings)}: {value} is out of range: "
            f"it must be {limits.limits}\n"
        )


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("predict x.png --interpolation nearestx", "argument --interpolation: invalid choice: 'nearestx'"),
        ("train --remode nosuch", "argument --remode: invalid choice: 'nosuch'"),
        ("train --sched cosin", "argument --sched: invalid choice: 'cosin'"),
        ("export --format tflite -o m.onnx", "argument --format: invalid choice: 'tflite'"),
        ("bench --impls auto,triton", "argument --impls: unknown triton; expected some of auto, reference, fused"),
        ("bench --runtimes torch,trt", "argument --runtimes: unknown trt; expected some of torch, torch-compile, onnx"),
        ("bench --models ,", "argument --models: expected a comma-separated list, got ','"),
        ("resolution d --sizes 224,big", "argument --sizes: invalid int value: 'big'"),
        (
            "robustness d --corruptions fog,rain",
            "argument --corruptions: unknown rain; expected some of gaussian_noise,",
        ),
        ("robustness d --severities 2,6", "argument --severities: unknown 6; expected some of 1, 2, 3, 4, 5"),
        ("robustness d --severities 2,x", "argument --severities: invalid int value: 'x'"),
    ],
)
def test_unknown_names_and_bad_lists_are_refused_by_the_parser(
    run_cli, words: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    assert run_cli(words) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sequencer {words.split()[0]}: error: {message}") and error.count("\n") == 1  # no usage


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("resolution d --sizes '288, 160,224,160'", {"sizes": [160, 224, 288]}),
        ("resolution d", {"sizes": [160, 224, 288, 384, 448]}),
        # ImageNet-C's order, each once, whatever the order asked in; empty or left out: all of them.
        (
            "robustness d --corruptions fog,gaussian_noise,fog",
            {"corruptions": ["gaussian_noise", "fog"]},
        ),
        ("robustness d --severities 3,1", {"severities": [1, 3], "corruptions": list(CORRUPTIONS)}),
        (
            "robustness d --corruptions '' --severities ''",
            {"corruptions": list(CORRUPTIONS), "severities": [1, 2, 3, 4, 5]},
        ),
        # bench measures in the order given
        (
            "bench --resolutions 64,32 --impls fused,auto",
            {"resolutions": [64, 32], "impls": ["fused", "auto"]},
        ),
        ("bench", {"models": ["sequencer2d_s"], "resolutions": [224], "modes": ["infer", "train"]}),
    ],
)
def test_comma_lists_reach_the_command_as_lists(parse_cli, words: str, expected: dict[str, list]) -> None:
    args = parse_cli(words)
    assert {key: getattr(args, key) for key in expected} == expected


def test_warnings_read_as_one_line_while_the_command_runs_only(
    run_cli, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # Python's default, not pytest's
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        assert run_cli(f"export --model sequencer2d_tiny -o {tmp_path / 'm.pt'}") == 0
    error = capsys.readouterr().err
    line = next(line for line in error.splitlines() if "no checkpoint given" in line)
    assert line.startswith("sequencer export: warning: no checkpoint given: sequencer2d_tiny has random")
    assert "UserWarning" not in error and "load_model(" not in error
    # A later warning of the same process is not labelled with the finished command's name.
    later = warnings.formatwarning("after the command", UserWarning, "script.py", 7)
    assert later.startswith("script.py:7: UserWarning: after the command")


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("predict {tmp}/a.png -o {tmp}/blocker/p.csv", "cannot write {tmp}/blocker/p.csv: {tmp}/blocker is a file"),
        ("validate -o {tmp}", "{tmp} is a folder: name a file"),
        ("bench -o {tmp}/blocker/bench", "{tmp}/blocker is a file"),
        ("erf -o {tmp}/blocker", "{tmp}/blocker is a file: name a folder"),
        ("train --output {tmp}/blocker/run", "cannot write {tmp}/blocker/run: {tmp}/blocker is a file"),
    ],
)
def test_outputs_that_cannot_be_written_are_refused_before_any_work(
    assert_refused, tmp_path: Path, words: str, message: str
) -> None:
    (tmp_path / "blocker").write_text("a file where a folder would have to be")
    error = assert_refused(
        words.format(tmp=tmp_path), match=re.escape(message.format(tmp=tmp_path)), unchanged=tmp_path
    )
    assert error.startswith(f"sequencer {words.split()[0]}: error: argument -o/--output")


@pytest.mark.parametrize("command", ["train {data}", "validate {data}", "predict {data}/val", "bench --resolutions 32"])
def test_an_amp_dtype_the_device_cannot_run_is_one_line_naming_what_runs(
    assert_refused, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setattr(runtime, "_autocast_runs", lambda device, dtype: dtype == torch.bfloat16)  # a CPU without fp16
    words = f"{command.format(data=data)} {TINY} --amp --amp-dtype float16 --output {tmp_path / 'out'}"
    error = assert_refused(words, match="--amp in float16", unchanged=tmp_path)
    assert error == (
        f"sequencer {command.split()[0]}: error: --amp in float16 cannot run on cpu: autocast there runs bfloat16 "
        "(pass --amp-dtype bfloat16)"
    )


def test_autocast_probe_tells_a_dtype_autocast_switches_off_from_one_it_runs() -> None:
    cpu = torch.device("cpu")
    assert runtime._autocast_runs(cpu, torch.bfloat16)  # CPU autocast computes bfloat16 on every torch we support
    assert not runtime._autocast_runs(cpu, torch.float64)  # autocast warns and disables itself for a non-half type


def test_every_parser_default_is_the_library_s_default(parse_cli) -> None:
    from sequencer.train_config import TrainConfig

    parsed = parse_cli("train")
    assert TrainConfig(**{k: v for k, v in vars(parsed).items() if k != "command"}) == TrainConfig()
    # The commands whose `run` hands the flags to a library function by name (`flag_values`).
    from sequencer.analysis.robustness import robustness
    from sequencer.analysis.variants import variants
    from sequencer.validate import validate

    for command, function, required in (
        ("validate", validate, ()),
        ("robustness", robustness, ("/d",)),
        ("variants", variants, ()),
    ):
        defaults = vars(parse_cli(command, *required))
        for parameter in inspect.signature(function).parameters.values():
            # robustness's run reads the --alexnet-errors file and passes what it holds.
            passed_by_run = command == "robustness" and parameter.name == "alexnet_errors"
            if parameter.name in defaults and parameter.default is not inspect.Parameter.empty and not passed_by_run:
                given, default = defaults[parameter.name], parameter.default
                given = tuple(given) if isinstance(given, list) else given
                assert given == (tuple(default) if isinstance(default, list) else default), (command, parameter.name)
