"""The way from `sequencer validate` to the logits: the package's calls between the command and the model.

    .venv/bin/python benchmarks/call_path.py

Runs `sequencer validate --model sequencer2d_tiny --checkpoint X` on the built-in digits (a checkpoint of random
weights written first) under a profiler hook, from the subcommand's `run` to the model's first forward, and counts
the calls into the package on the way: every call (a repeated one each time), the distinct functions and their
modules. Not counted: the network's own layers (methods of nn.Modules and all they call: the model, not the way to
it) and the data pipeline (`sequencer.data`, the images' way). timm's validate.py reaches its model through validate.py
and the model file.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from sequencer import create_model, save_weights
from sequencer.cli import main


class FirstForward(Exception):
    """Raised from the profiler hook when the model's forward is entered: nothing after it counts."""


def calls_to_the_model(argv: list[str]) -> list[str]:
    """`module.function` of every package call from the command's `run` to the model's first forward, in order."""
    calls: list[str] = []
    started = False
    inside_layers: list[FrameType] = []  # frames of nn.Module methods now running: what they call is the model

    def hook(frame: FrameType, event: str, _: Any) -> None:
        nonlocal started
        if event == "return" and inside_layers and inside_layers[-1] is frame:
            inside_layers.pop()
        if event != "call" or not frame.f_code.co_flags & inspect.CO_OPTIMIZED:  # class bodies run at import
            return
        if isinstance(frame.f_locals.get("self"), nn.Module):
            inside_layers.append(frame)
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("sequencer."):
            return
        name = frame.f_code.co_qualname
        if name == "Sequencer.forward":
            raise FirstForward
        started = started or name == "run"
        # Comprehensions and dataclass-generated methods are parts of the function that holds them.
        if started and "<" not in name and not inside_layers and module != "sequencer.data":
            calls.append(f"{module}.{name}")

    sys.setprofile(hook)
    try:
        main(argv)
    except FirstForward:
        pass
    finally:
        sys.setprofile(None)
    return calls


def run() -> None:
    """Print each function on the way with how often it is called, and the totals."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "tiny.pth"
        save_weights(create_model("sequencer2d_tiny", num_classes=10), checkpoint)
        argv = ["validate", "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint), "--device", "cpu"]
        calls = calls_to_the_model([*argv, "-b", "8", "-j", "0"])
    counts = Counter(calls)
    for function, count in counts.items():
        print(f"{count:3d}  {function}")
    modules = sorted({function.rsplit(".", 1)[0].removesuffix(".Checkpoint") for function in counts})
    modules = sorted({".".join(m.split(".")[:2]) for m in modules})
    print(f"{len(calls)} calls to {len(counts)} functions in {len(modules)} modules: {', '.join(modules)}")


if __name__ == "__main__":
    run()
