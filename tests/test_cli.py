"""The `sequencer` command line: light parsers, each subcommand's flags beside the module doing its work."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import sequencer
from sequencer import cli
from sequencer.analysis.robustness import CORRUPTIONS
from sequencer.analysis.variants import VARIANTS
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
    assert all(folder in variants_help for variant in VARIANTS for folder in variant.folders)
    assert set(DATASET_FLAGS) == {variant.key for variant in VARIANTS} - {"imagenet"}


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
