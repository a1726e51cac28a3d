"""`sequencer train` whose worker of rank KILL_RANK kills itself with SIGKILL at its KILL_STEP-th training step
(counted over the run) on torchrun's first attempt only: a preempted or crashed worker, for test_train.py.

Run as `torchrun ... tests/preempted_train.py TRAIN-ARGS...`; without KILL_STEP it is plain `sequencer train`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from sequencer import train as train_module
from sequencer.cli import main


def kill_at_step(step: int) -> None:
    """Make this process SIGKILL itself when its training loop enters its `step`-th step."""
    autocast = train_module.autocast  # entered once per training step (evaluation has its own)
    steps = 0

    def counting_autocast(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        if steps == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return autocast(*args, **kwargs)

    train_module.autocast = counting_autocast


if __name__ == "__main__":
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
    if "KILL_STEP" in os.environ and first_attempt and os.environ["RANK"] == os.environ["KILL_RANK"]:
        kill_at_step(int(os.environ["KILL_STEP"]))
    sys.exit(main(["train", *sys.argv[1:]]))
