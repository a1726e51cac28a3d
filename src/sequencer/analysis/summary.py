"""The model-zoo table behind `sequencer summary`: each variant's parameters and MACs (`summarize`), as a table,
CSV or figure."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

import torch

from sequencer.analysis.complexity import count_macs
from sequencer.builder import create_model
from sequencer.errors import UsageError
from sequencer.files import write_csv
from sequencer.model import ALIASES, VARIANTS, count_parameters, list_models
from sequencer.plotting import new_figure, save_figure
from sequencer.runtime import progress_bar

COLUMNS = ("model", "params_m", "gmacs", "img_size", "params", "macs")
_HEADERS = ("model", "params (M)", "MACs (G)", "input", "parameters", "MACs")  # the markdown table's, in that order


def variant_names(pattern: str = "*") -> list[str]:
    """Variants matching `pattern` in the registry's order; an alias only when the name it stands for is not listed."""
    names = list_models(pattern)
    if not names:
        raise UsageError(f"no model matches {pattern!r}; known models: {', '.join(list_models())}")
    order = [*VARIANTS, *ALIASES]
    return sorted((n for n in names if ALIASES.get(n) not in names), key=order.index)


def summarize(names: list[str], img_size: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """One row per variant: parameters and MACs of one image at `img_size` (default: the variant's own size)."""
    # Counting needs shapes only: the meta device allocates no weights and runs no kernels.
    with torch.device("meta"):
        models = {name: create_model(name) for name in names}
    sizes = {name: img_size or model.pretrained_cfg["input_size"][-1] for name, model in models.items()}
    for name, model in models.items():
        if sizes[name] < model.min_input_size:
            raise UsageError(f"--img-size {sizes[name]} is below the {model.min_input_size} px that {name} needs")
    rows = []
    for name, model in progress_bar(models.items(), show=progress, desc="counting", unit="model"):
        size = sizes[name]
        params, macs = count_parameters(model), count_macs(model, (3, size, size))
        rows.append(
            dict(
                model=name,
                params_m=round(params / 1e6, 2),
                gmacs=round(macs / 1e9, 2),
                img_size=size,
                params=params,
                macs=macs,
            )
        )
    return rows


def format_table(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    """The rows as a markdown table or as CSV text."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if fmt != "markdown":
        raise UsageError(f"unknown format {fmt!r}; expected 'markdown' or 'csv'")
    formats = {"params_m": "{:.2f}", "gmacs": "{:.2f}", "params": "{:,}", "macs": "{:,}"}
    cells = [list(_HEADERS)]
    cells += [[formats.get(c, "{}").format(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    # Numbers right-aligned (`---:`), names left-aligned.
    rule = ["-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    lines = []
    for line in [cells[0], rule, *cells[1:]]:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        lines.append("| " + " | ".join(padded) + " |\n")
    return "".join(lines)


def plot_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """Parameters and MACs side by side, one bar per variant, in the table's order."""
    fig, axes = new_figure(1, 2, size=(10, 1.2 + 0.32 * len(rows)), sharey=True)
    labels = [f"{r['model']} ({r['img_size']} px)" for r in rows]
    panels = (("params_m", "parameters (M)", "C0"), ("gmacs", "MACs (G, recurrences counted)", "C1"))
    for ax, (key, xlabel, color) in zip(axes[0], panels, strict=True):
        values = [r[key] for r in rows]
        bars = ax.barh(labels, values, color=color)
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7)
        ax.set(xlabel=xlabel, xlim=(0, max(values) * 1.2))
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].invert_yaxis()  # the first row of the table on top
    save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    """Count every matching variant: the table on stdout, summary.csv and summary.png in the output folder."""
    # The progress bar goes to stderr, so the table on stdout stays clean for redirection.
    rows = summarize(variant_names(args.models), args.img_size, progress=True)
    print(format_table(rows, args.format), end="")
    out = Path(args.output)
    write_csv(rows, out / "summary.csv")
    plot_summary(rows, out / "summary.png")
    print(f"wrote {out / 'summary.csv'}, {out / 'summary.png'}", file=sys.stderr)
    return 0
