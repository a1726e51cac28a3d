"""The way from `sequencer validate` to the logits: which of the package's functions run, in which modules.

    .venv/bin/python benchmarks/call_path.py

Runs `sequencer validate --model sequencer2d_tiny --checkpoint X` on the built-in digits (a checkpoint of random
weights written first) under a profiler hook, and lists every function of the `sequencer` package entered before
the model's first forward, in call order, with the count of distinct functions and modules, and of those outside
the model's own modules (its layers' constructors are the model, not the way to it). timm's validate.py
reaches its model through validate.py and the model file.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from sequencer import create_model, save_weights
from sequencer.cli import main

MODEL_MODULES = ("sequencer.model", "sequencer.recurrence")


class FirstForward(Exception):
    """Raised from the profiler hook when the model's forward is entered: nothing after it counts."""


def calls_before_logits(argv: list[str]) -> list[tuple[str, str]]:
    """(module, function) of every package function entered before the first `Sequencer.forward`, once each."""
    seen: list[tuple[str, str]] = []

    def hook(frame: FrameType, event: str, _: Any) -> None:
        if event != "call" or not frame.f_code.co_flags & inspect.CO_OPTIMIZED:  # class bodies run at import
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("sequencer") or module == "sequencer.__main__":
            return
        name = frame.f_code.co_qualname
        if name == "Sequencer.forward":
            raise FirstForward
        # Comprehensions and dataclass-generated methods are parts of the function that holds them.
        if (module, name) not in seen and "<" not in name:
            seen.append((module, name))

    sys.setprofile(hook)
    try:
        main(argv)
    except FirstForward:
        pass
    finally:
        sys.setprofile(None)
    return seen


def run() -> None:
    """Print the call path and its counts."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "tiny.pth"
        save_weights(create_model("sequencer2d_tiny", num_classes=10), checkpoint)
        argv = ["validate", "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint), "--device", "cpu"]
        calls = calls_before_logits([*argv, "-b", "8", "-j", "0"])
    for module, name in calls:
        print(f"{module}.{name}")
    modules = sorted({module for module, _ in calls})
    # The layers' own constructors are the model, not the way to it.
    way = [call for call in calls if call[0] not in MODEL_MODULES]
    print(f"{len(calls)} functions in {len(modules)} modules before the logits: {', '.join(modules)}")
    print(f"{len(way)} of them outside the model's own modules ({', '.join(MODEL_MODULES)})")


if __name__ == "__main__":
    run()
