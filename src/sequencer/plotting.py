"""Every figure the package draws: built without pyplot (no GUI backend, no global state), written whole as a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sequencer.files import atomic_write

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

DPI = 150  # one resolution for every PNG: training curves, bench's plots and the analyses' figures


def new_figure(
    rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.4, 4.8), **kwargs: Any
) -> tuple[Figure, np.ndarray]:
    """A Figure with constrained layout and its `rows` x `cols` grid of axes (always 2-D); `kwargs` go to subplots."""
    from matplotlib.figure import Figure  # matplotlib loads only when a figure is drawn: commands start faster

    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False, **kwargs)


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` to `path` as a PNG, creating its folder; a crash never leaves half a file."""
    with atomic_write(path) as f:
        figure.savefig(f, dpi=DPI, format="png")
    return Path(path)


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Draw loss, accuracy and learning rate against epoch from summary rows and write them to `path`."""
    from matplotlib.ticker import FormatStrFormatter

    epochs = [row["epoch"] for row in history]  # from 0, as the log, summary.csv and checkpoint-EPOCH count them
    ema = [row for row in history if "ema_eval_loss" in row]
    ema_epochs = [row["epoch"] for row in ema]
    figure, [[loss_axes, accuracy_axes, lr_axes]] = new_figure(1, 3, size=(13, 3.6))
    loss_axes.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    loss_axes.plot(epochs, [row["eval_loss"] for row in history], "s-", label="held-out")
    if ema:
        loss_axes.plot(ema_epochs, [row["ema_eval_loss"] for row in ema], "^-", label="EMA held-out")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [row["eval_top1"] for row in history], "o-", label="top-1")
    accuracy_axes.plot(epochs, [row["eval_top5"] for row in history], "s-", label="top-5")
    if ema:
        accuracy_axes.plot(ema_epochs, [row["ema_eval_top1"] for row in ema], "^-", label="EMA top-1")
    best = max(history, key=lambda row: row["eval_top1"])
    accuracy_axes.annotate(
        f"best {best['eval_top1']:.2f}",
        (best["epoch"], best["eval_top1"]),
        textcoords="offset points",
        xytext=(0, -14),
        ha="center",
    )
    accuracy_axes.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="held-out accuracy")
    accuracy_axes.legend(loc="lower right")
    lr_axes.plot(epochs, [row["lr"] for row in history], "o-")
    lr_axes.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    lr_axes.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    for axes in (loss_axes, accuracy_axes, lr_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    save_figure(figure, path)
