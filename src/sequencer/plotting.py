"""Training curves (loss, top-1/top-5, learning rate per epoch) as a PNG, rewritten after every epoch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sequencer.files import atomic_write


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Draw loss, accuracy and learning rate against epoch from summary rows and write them to `path` atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    epochs = [row["epoch"] for row in history]  # from 0, as the log, summary.csv and checkpoint-EPOCH count them
    ema = [row for row in history if "ema_eval_loss" in row]
    figure, (loss_axes, accuracy_axes, lr_axes) = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    loss_axes.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    loss_axes.plot(epochs, [row["eval_loss"] for row in history], "s-", label="held-out")
    if ema:
        loss_axes.plot([row["epoch"] for row in ema], [row["ema_eval_loss"] for row in ema], "^-", label="EMA held-out")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [row["eval_top1"] for row in history], "o-", label="top-1")
    accuracy_axes.plot(epochs, [row["eval_top5"] for row in history], "s-", label="top-5")
    if ema:
        accuracy_axes.plot(
            [row["epoch"] for row in ema], [row["ema_eval_top1"] for row in ema], "^-", label="EMA top-1"
        )
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
    try:
        with atomic_write(path) as f:
            figure.savefig(f, dpi=100, format="png")
    finally:
        plt.close(figure)
