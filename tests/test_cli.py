"""The `sequencer` command line: light parsers, each subcommand's flags beside the module doing its work."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sequencer
from sequencer import cli, runtime
from sequencer.analysis.robustness import CORRUPTIONS
from sequencer.analysis.variants import TEST_SETS
from sequencer.commands.variants import DATASET_FLAGS
from sequencer.deploy import FORMATS
from sequencer.recurrence import IMPLEMENTATIONS

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


def test_help_names_everything_the_library_accepts() -> None:
    """Where a flag's names live in a heavy module, the help spells them out: this keeps the two in step."""
    assert all(name in help_text("export") for name in FORMATS)
    assert all(name in help_text("bench") for name in IMPLEMENTATIONS)
    assert all(name in help_text("robustness") for name in CORRUPTIONS)
    variants_help = help_text("variants").replace("- ", "-")  # argparse wraps after hyphens
    assert all(folder in variants_help for test_set in TEST_SETS for folder in test_set.folders)
    assert set(DATASET_FLAGS) == {test_set.key for test_set in TEST_SETS} - {"imagenet"}


def test_version(run_cli, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli("--version")
    assert exited.value.code == 0 and capsys.readouterr().out == f"sequencer {sequencer.__version__}\n"


def test_help_shows_real_defaults() -> None:
    text = help_text("train")
    assert "random seed (per epoch and rank) (default: 42)" in text
    assert "sequencer2d_tiny" in text and "torch/oxford_iiit_pet" in text  # the digits recipe, the transfer sets


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("bench --impls auto,triton --no-memory", "unknown --impls triton; expected some of auto, reference, fused"),
        ("export --model sequencer2d_tiny --format tflite -o {tmp}/m.onnx", "unknown export format 'tflite'"),
        ("robustness {tmp} --corruptions fog,hail", "hail"),
    ],
)
def test_names_checked_when_the_command_runs_end_in_one_line_before_any_work(
    run_cli, tmp_path: Path, capsys: pytest.CaptureFixture, words: str, message: str
) -> None:
    assert run_cli(words.format(tmp=tmp_path)) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def data(make_image_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("data"), classes=2, per_class=2, size=40)


TINY = "--model sequencer2d_tiny -j 0 --device cpu"


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("predict {data}/val -b 0 " + TINY, "-b/--batch-size 0 is out of range: it must be >= 1"),
        ("predict {data}/val --img-size 4 " + TINY, "input 4x4 is smaller than the 8x8"),
        ("predict {data}/val --topk 0 " + TINY, "--topk 0 is out of range"),
        ("validate {data} --crop-pct 1.5 " + TINY, "--crop-pct 1.5 is out of range: it must be > 0 and <= 1"),
        ("validate {data} --std 0.2 0 0.2 " + TINY, "--std 0.2 0.0 0.2 is out of range: it must be > 0"),
        ("validate {data} --in-chans 1 " + TINY, "the input has 1 channels (--in-chans / --input-size) but images"),
        ("validate {data} --input-size 1 32 32 " + TINY, "the input has 1 channels (--in-chans / --input-size)"),
        ("predict {data}/val --input-size 3 32 4 " + TINY, "input 32x4 is smaller than the 8x8"),
        ("validate {data} --threads 0 " + TINY, "--threads 0 is out of range: it must be >= 1"),
        ("train {data} --in-chans 1 " + TINY, "--in-chans 1: training reads images as RGB"),
        ("train {data} --scale 0.9 0.1 " + TINY, "--scale 0.9 0.1: the first value must be <= the second"),
        ("train {data} --cutmix-minmax 0.5 0.5 " + TINY, "--cutmix-minmax 0.5 0.5: the first value must be <"),
        ("train {data} --ratio 0 1 " + TINY, "--ratio 0.0 1.0 is out of range: it must be > 0"),
        ("robustness {data} --limit 0 " + TINY, "--limit 0 is out of range"),
        ("robustness {data} --alexnet-errors {tmp}/no.json " + TINY, "--alexnet-errors {tmp}/no.json: file not found"),
        ("erf --num-images 0 " + TINY, "--num-images 0 is out of range"),
        ("average {tmp} -n 0 -o {tmp}/avg.pth", "-n/--num 0 is out of range"),
        ("variants " + TINY, "name ROOT, the folder holding the datasets, or their folders with --imagenet-val"),
    ],
)
def test_bad_values_of_any_command_end_in_one_line_before_any_work(
    run_cli, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, words: str, message: str
) -> None:
    command = words.split()[0]
    assert run_cli(words.format(data=data, tmp=tmp_path), "--output", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sequencer {command}: error: ") and len(error.strip().splitlines()) == 1
    assert message.format(tmp=tmp_path) in error
    assert list(tmp_path.iterdir()) == []


def test_config_values_are_checked_like_the_command_line(
    run_cli, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "args.yaml").write_text("epochs: 0\n")
    assert run_cli(f"train {data} {TINY} -c {tmp_path / 'args.yaml'} --output {tmp_path / 'out'}") == 2
    assert "--epochs 0 is out of range: it must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("words", ["predict x.png --interpolation nearestx", "train --remode nosuch"])
def test_unknown_choices_are_refused_by_the_parser(run_cli, words: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli(words)
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice" in error and error.count("\n") == 1  # no usage block


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
    run_cli, tmp_path: Path, capsys: pytest.CaptureFixture, words: str, message: str
) -> None:
    (tmp_path / "blocker").write_text("a file where a folder would have to be")
    with pytest.raises(SystemExit) as exited:
        run_cli(words.format(tmp=tmp_path))
    error = capsys.readouterr().err
    assert exited.value.code == 2 and message.format(tmp=tmp_path) in error
    assert error.startswith(f"sequencer {words.split()[0]}: error: argument -o/--output") and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.parametrize("command", ["train {data}", "validate {data}", "predict {data}/val", "bench --resolutions 32"])
def test_an_amp_dtype_the_device_cannot_run_is_one_line_naming_what_runs(
    run_cli, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setattr(runtime, "_autocast_runs", lambda device, dtype: dtype == torch.bfloat16)  # a CPU without fp16
    words = f"{command.format(data=data)} {TINY} --amp --amp-dtype float16 --output {tmp_path / 'out'}"
    assert run_cli(words) == 2
    error = capsys.readouterr().err
    assert error.strip() == (
        f"sequencer {command.split()[0]}: error: --amp in float16 cannot run on cpu: autocast there runs bfloat16 "
        "(pass --amp-dtype bfloat16)"
    )
    assert list(tmp_path.iterdir()) == []


def test_autocast_probe_tells_a_dtype_autocast_switches_off_from_one_it_runs() -> None:
    cpu = torch.device("cpu")
    assert runtime._autocast_runs(cpu, torch.bfloat16)  # CPU autocast computes bfloat16 on every torch we support
    assert not runtime._autocast_runs(cpu, torch.float64)  # autocast warns and disables itself for a non-half type
