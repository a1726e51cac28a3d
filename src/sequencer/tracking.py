"""Tracked runs, as timm users keep them: each epoch's summary row sent to Weights & Biases and/or TensorBoard.

The trainer's flags: --log-wandb logs the rows to W&B, as timm's train.py does (the run named after the run folder,
its config the run's arguments); --wandb-project names the W&B project (none: W&B's default); --wandb-tags tags the
run; --wandb-resume-id continues that W&B run (resume "must"). --log-tensorboard (timm has none) writes the rows as
TensorBoard scalars under RUN/tensorboard. Both count steps as summary.csv counts epochs, and both are optional
extras (`sequencer[wandb]`, `sequencer[tensorboard]`), imported only when asked for.

A run resumed in its folder continues the same tracked run: the W&B run id is kept in RUN/wandb-run-id.txt, and
TensorBoard drops the steps from the resumed epoch on, so an epoch replayed after a crash is counted once. W&B keeps
the steps it already has and ignores a replayed one (its values are the same: a resumed run replays bit for bit).
Only rank 0 tracks.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sequencer.errors import MissingDependencyError, UsageError
from sequencer.files import atomic_write

# The trainer's flags (dests) that `check_tracking` and `RunTracker.open` take, by name.
TRACKING_OPTIONS = ("log_wandb", "wandb_project", "wandb_tags", "wandb_resume_id", "log_tensorboard")
WANDB_ID_FILE = "wandb-run-id.txt"
TENSORBOARD_FOLDER = "tensorboard"


def check_tracking(
    log_wandb: bool = False,
    wandb_project: str | None = None,
    wandb_tags: Sequence[str] = (),
    wandb_resume_id: str | None = None,
    log_tensorboard: bool = False,
) -> None:
    """Refuse, before any work starts, tracking whose package is missing and W&B flags without --log-wandb."""
    if not log_wandb and (wandb_project or wandb_tags or wandb_resume_id):
        # timm ignores them; here a run the user meant to track would go untracked without a word.
        raise UsageError("--wandb-project, --wandb-tags and --wandb-resume-id need --log-wandb")
    for wanted, flag, package in (
        (log_wandb, "--log-wandb", "wandb"),
        (log_tensorboard, "--log-tensorboard", "tensorboard"),
    ):
        if wanted and importlib.util.find_spec(package) is None:
            raise MissingDependencyError(
                f'{flag} needs the {package} package, not installed: pip install "sequencer[{package}]"'
            )


class RunTracker:
    """The W&B run and/or TensorBoard writer of one run folder; `log_epoch` sends them each summary row."""

    def __init__(self, wandb_run: Any = None, writer: Any = None) -> None:
        self.wandb_run = wandb_run
        self.writer = writer

    @classmethod
    def open(
        cls,
        folder: str | Path,
        config: Mapping[str, Any],
        start_epoch: int = 0,
        log_wandb: bool = False,
        wandb_project: str | None = None,
        wandb_tags: Sequence[str] = (),
        wandb_resume_id: str | None = None,
        log_tensorboard: bool = False,
    ) -> RunTracker:
        """Start tracking the run in `folder` (which exists) from `start_epoch`, the first epoch this process trains;
        continues the folder's tracked run if it has one."""
        folder = Path(folder)
        wandb_run = writer = None
        if log_wandb:
            import wandb

            id_file = folder / WANDB_ID_FILE
            run_id = wandb_resume_id or (id_file.read_text().strip() if id_file.is_file() else None)
            wandb_run = wandb.init(
                project=wandb_project,
                name=folder.resolve().name,
                config=dict(config),
                tags=list(wandb_tags) or None,
                dir=folder,
                id=run_id,
                # timm's "must" for a named run (a wrong id fails at the start); "allow" for the folder's own run.
                resume="must" if wandb_resume_id else "allow" if run_id else None,
            )
            # Whole or not at all: a crash while writing must not leave an empty id, which starts a new run on resume.
            with atomic_write(id_file) as f:
                f.write(f"{wandb_run.id}\n".encode())
        if log_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or after the resumed epoch, left by the interrupted process, are dropped on read.
            writer = SummaryWriter(log_dir=str(folder / TENSORBOARD_FOLDER), purge_step=start_epoch)
        return cls(wandb_run, writer)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Send one summary.csv row (epoch, losses, top-1/5, lr ...) at the step of its epoch."""
        epoch = int(row["epoch"])
        if self.wandb_run is not None:
            self.wandb_run.log(dict(row), step=epoch)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, global_step=epoch)
            # Each epoch on disk at once: a live TensorBoard shows it, a killed run loses none.
            self.writer.flush()

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (failed when `exit_code` is not 0) and close the TensorBoard files."""
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        # A run stopped by an error (a non-finite loss, Ctrl-C) shows in W&B as failed, not finished.
        self.close(0 if kind is None else 1)
