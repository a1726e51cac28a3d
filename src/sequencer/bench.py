"""Benchmarking: `bench()`, which times and measures the peak memory of a list of models (our Sequencers in their
implementations and runtimes, timm's twin of each, timm's other models: the subjects), and the tables, files and
plots of `sequencer bench`.

Every model is measured at each asked-for resolution, batch size and precision, in two modes: "infer" (a forward
pass under no_grad) and "train" (forward, cross-entropy, backward, AdamW step). Our Sequencer models run once per
`--impls` entry (rnn_impl), and timm's `sequencer2d_*` twin carries the same weights (its logits are checked
against ours before anything is timed). Other names are timm models, for memory and throughput against resolution
beside Sequencer's peers. A plot is written next to the JSON and CSV: against resolution when there are several,
else bars side by side. `--runtimes` adds other engines for our models' inference: torch.compile (inductor, per
impl) and, on the CPU, onnxruntime running the file `export --dynamic-batch` writes from the same weights (checked
against PyTorch), float32 or with int8 weights (`export --quantize int8`); onnxruntime has no bfloat16 CPU path, so
it sits out the amp settings.

Timing: the subjects of one setting are timed in the same process, one step of each per round, so that a load
change hits them alike; images/s comes from the median step. Peak memory: each (subject, setting) runs in a fresh
subprocess. On CUDA it is `torch.cuda.max_memory_allocated` above what was allocated before the first step. On the
CPU it is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs once the model, optimizer and
batch exist) above its resident set at that point, with glibc's mmap threshold fixed so that freed tensors leave
the resident set. Both count what the steps add to the weights: activations, gradients, optimizer state, scratch.
An onnxruntime subject's baseline is its loaded session, so its figure includes the arena its first run allocates.
A torch-compile subject takes one step before the baseline (it compiles then), so its figure leaves out what any
first step allocates once (oneDNN's caches, say), which the eager figures include.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from sequencer.builder import create_model
from sequencer.choices import BENCH_MODES, BENCH_PRECISIONS, BENCH_RUNTIMES, ONNX_RUNTIMES
from sequencer.config import flag_values
from sequencer.deploy import OnnxModel, export, load_onnx, quantize_onnx, require_onnx_packages
from sequencer.errors import UsageError
from sequencer.files import write_csv
from sequencer.model import list_models
from sequencer.plotting import new_figure, save_figure
from sequencer.runtime import autocast, compile_model, native_bfloat16_cpu, resolve_device, set_threads

# What a subject runs: a PyTorch module (compiled or not) or an exported file in onnxruntime.
Runner = nn.Module | OnnxModel
# Writing "5" here resets the process's peak resident set (Linux): how CPU peak memory is measured.
CLEAR_REFS = "/proc/self/clear_refs"
TWIN_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Setting:
    """Where a subject is measured."""

    mode: str
    precision: str
    resolution: int
    batch_size: int


@dataclass(frozen=True)
class Subject:
    """One thing to measure: our model with an rnn_impl (optionally checkpointed), or a timm model."""

    model: str
    source: str  # "ours" or "timm"
    rnn_impl: str | None = None
    grad_checkpointing: bool = False
    runtime: str = "torch"  # one of sequencer.choices.BENCH_RUNTIMES; timm models always run in eager torch

    @property
    def label(self) -> str:
        """How tables, files and plots name it."""
        if self.source == "timm":
            return "timm"
        if self.runtime in ONNX_RUNTIMES:
            return f"ours+{self.runtime}"
        return f"ours({self.rnn_impl}){'+compile' if self.compiled else ''}{'+ckpt' if self.grad_checkpointing else ''}"

    @property
    def compiled(self) -> bool:
        """Whether it runs through torch.compile (its first step compiles)."""
        return self.runtime == "torch-compile"

    def runs_in(self, setting: Setting) -> bool:
        """Whether this subject is measured in `setting`: checkpointing only trains, other runtimes only infer,
        and onnxruntime has no amp (bfloat16) path."""
        if setting.mode == "infer":
            return not self.grad_checkpointing and not (self.runtime in ONNX_RUNTIMES and setting.precision == "amp")
        return self.runtime == "torch"


def bench(
    *,
    models: Sequence[str] = ("sequencer2d_s",),
    resolutions: Sequence[int] = (224,),
    batch_sizes: Sequence[int] = (8,),
    precisions: Sequence[str] = ("float32",),
    modes: Sequence[str] = BENCH_MODES,
    impls: Sequence[str] = ("auto", "reference"),
    runtimes: Sequence[str] = ("torch",),
    grad_checkpointing: bool = False,
    timm_twin: bool = True,
    measure_memory: bool = True,
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
    amp_dtype: str | None = None,
    threads: int | None = None,
    report: Callable[[Setting, list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """One record per subject and setting: images/s (median step), step times, peak memory, ratios to timm's twin
    and to our reference path.

    The arguments are `sequencer bench`'s flags (`precisions`: "float32" and/or "amp", autocast in `amp_dtype`;
    `timm_twin`, `measure_memory`: the opposites of --no-timm-twin, --no-memory). `threads` sets the memory
    subprocesses' and onnxruntime's threads (this process's: `torch.set_num_threads`). `report` is called with each
    setting's records as soon as they are measured (the command prints a table).
    """
    named = (
        ("--modes", modes, BENCH_MODES),
        ("--precisions", precisions, BENCH_PRECISIONS),
        ("--runtimes", runtimes, BENCH_RUNTIMES),
    )
    for flag, names, known in named:
        if not names or set(names) - set(known):
            raise UsageError(f"{flag} {','.join(names)}: expected some of {', '.join(known)}")
    device = resolve_device(device)
    if measure_memory and device.type == "cpu" and not os.access(CLEAR_REFS, os.W_OK):
        raise UsageError(
            f"peak CPU memory is read by resetting {CLEAR_REFS}, which this system lacks: pass --no-memory"
        )
    subjects = plan_subjects(models, impls, grad_checkpointing, timm_twin, runtimes)
    check_resolutions(subjects, resolutions)
    settings = [Setting(*values) for values in itertools.product(modes, precisions, resolutions, batch_sizes)]
    if not any(subject.runs_in(setting) for subject in subjects for setting in settings):
        raise UsageError(
            f"nothing to measure: no subject (--models, --impls, --runtimes {','.join(runtimes)}) runs in --modes "
            f"{','.join(modes)} at --precisions {','.join(precisions)}"
        )
    if set(runtimes) & set(ONNX_RUNTIMES):
        if device.type != "cpu":
            raise UsageError("--runtimes onnxruntime* run on the CPU (onnxruntime's CPU provider): pass --device cpu")
        require_onnx_packages(purpose="--runtimes onnxruntime (an ONNX export run by onnxruntime)")
    records = []
    with tempfile.TemporaryDirectory(prefix="sequencer-bench-") as name:
        workdir = Path(name)
        for resolution in resolutions:
            built = build_models(subjects, resolution, device, workdir, threads)
            for mode, precision, batch_size in itertools.product(modes, precisions, batch_sizes):
                setting = Setting(mode, precision, resolution, batch_size)
                chosen = [subject for subject in subjects if subject.runs_in(setting)]
                if not chosen:
                    continue
                found = measure_setting(
                    chosen,
                    built,
                    setting,
                    device,
                    workdir,
                    amp_dtype=amp_dtype,
                    warmup=warmup,
                    repeats=repeats,
                    measure_memory=measure_memory,
                    threads=threads,
                )
                add_ratios(found)
                if report is not None:
                    report(setting, found)
                records += found
            del built
            gc.collect()
    return records


def run(args: argparse.Namespace) -> int:
    """`bench` with the flags: prints a table per setting and writes OUTPUT.json, OUTPUT.csv and OUTPUT.png."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    precisions = args.precisions or (["amp"] if args.amp else ["float32"])
    if "amp" in precisions and device.type == "cpu" and native_bfloat16_cpu() is False:
        print("note: this CPU has no AVX512-BF16 or AMX: the amp (bfloat16) settings time its emulation")
    records = bench(
        **flag_values(
            bench,
            args,
            batch_sizes=args.batch_sizes or [args.batch_size],
            precisions=precisions,
            timm_twin=not args.no_timm_twin,
            measure_memory=not args.no_memory,
            report=print_table,
        )
    )
    write_outputs(records, args.output, device)
    return 0


def plan_subjects(
    models: list[str], impls: list[str], checkpointing: bool, twins: bool, runtimes: Sequence[str] = ("torch",)
) -> list[Subject]:
    """Ours once per impl and runtime (and checkpointed), once per onnxruntime runtime, timm's twin for
    sequencer2d_s/m/l, peers as timm models."""
    ours = set(list_models())
    subjects = []
    for name in models:
        if name in ours:
            if twins and timm.is_model(name):
                subjects.append(Subject(name, "timm"))
            for runtime in runtimes:
                if runtime in ONNX_RUNTIMES:  # the export always takes the reference path: one file per model
                    subjects.append(Subject(name, "ours", runtime=runtime))
                else:
                    subjects += [Subject(name, "ours", impl, runtime=runtime) for impl in impls]
            if checkpointing:
                subjects += [Subject(name, "ours", impl, True) for impl in impls]
        elif timm.is_model(name):
            subjects.append(Subject(name, "timm"))
        else:
            raise UsageError(f"unknown model {name!r}: neither one of ours (see `sequencer summary`) nor in timm")
    return subjects


def check_resolutions(subjects: list[Subject], resolutions: list[int]) -> None:
    """Raise UsageError when one of our models cannot take the smallest resolution."""
    for name in dict.fromkeys(subject.model for subject in subjects if subject.source == "ours"):
        with torch.device("meta"):  # shapes only: no weights allocated
            smallest = create_model(name).min_input_size
        if min(resolutions) < smallest:
            raise UsageError(f"--resolutions {min(resolutions)} is below the {smallest} px that {name} needs")


def build_models(
    subjects: list[Subject], resolution: int, device: torch.device, workdir: Path, threads: int | None = None
) -> dict[Subject, Runner]:
    """Build every subject: ours of a name and timm's twin carry the weights of one fresh model (the twin checked
    on logits), and the onnxruntime subjects run its export, written into `workdir`: `export --dynamic-batch`
    (checked against it), and that file with int8 weights."""
    names = dict.fromkeys(subject.model for subject in subjects if subject.source == "ours")
    references = {name: build_subject_model(Subject(name, "ours", "reference"), resolution) for name in names}
    for name, reference in references.items():
        runtimes = {subject.runtime for subject in subjects if subject.model == name}
        if runtimes & set(ONNX_RUNTIMES):
            float_path = onnx_file(workdir, Subject(name, "ours", runtime="onnxruntime"), resolution)
            export(reference, float_path, dynamic_batch=True, img_size=resolution)
            if "onnxruntime-int8" in runtimes:
                int8_path = onnx_file(workdir, Subject(name, "ours", runtime="onnxruntime-int8"), resolution)
                quantize_onnx(float_path, int8_path)
    models: dict[Subject, Runner] = {}
    for subject in subjects:
        reference = references.get(subject.model)
        weights = reference.state_dict() if reference is not None else None
        models[subject] = build_runner(subject, resolution, device, workdir, threads, weights)
        if subject.source == "timm" and reference is not None:
            check_twin(reference.to(device), models[subject], subject.model, resolution, device)
    return models


def onnx_file(workdir: Path, subject: Subject, resolution: int) -> Path:
    """Where a run keeps the ONNX file an onnxruntime subject runs."""
    return workdir / f"{subject.model}-{resolution}-{subject.runtime}.onnx"


def build_runner(
    subject: Subject,
    resolution: int,
    device: torch.device,
    workdir: Path | None,
    threads: int | None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Runner:
    """What a subject runs: its model on `device` with `weights` (compiled for torch-compile), or an onnxruntime
    session of its file in `workdir` (`threads` intra-op threads)."""
    if subject.runtime in ONNX_RUNTIMES:
        return load_onnx(onnx_file(workdir, subject, resolution), threads)
    model = build_subject_model(subject, resolution)
    if weights is not None:
        model.load_state_dict(weights)
    model = model.to(device)
    return compile_model(model, "inductor") if subject.runtime == "torch-compile" else model


def build_subject_model(subject: Subject, resolution: int, seed: int = 0) -> nn.Module:
    """A fresh model: ours with a random (not zero) head so that logits can be compared, or timm's."""
    torch.manual_seed(seed)
    if subject.source == "ours":
        model = create_model(subject.model, rnn_impl=subject.rnn_impl)
        nn.init.normal_(model.head.fc.weight, std=0.02)
        model.set_grad_checkpointing(subject.grad_checkpointing)
        return model
    model = timm.create_model(subject.model)
    if hasattr(model, "set_input_size") and model.pretrained_cfg["input_size"][-1] != resolution:
        model.set_input_size(img_size=(resolution, resolution))  # ViTs and Swins fix their grid at build time
    return model


def check_twin(ours: nn.Module, twin: nn.Module, name: str, resolution: int, device: torch.device) -> None:
    """Raise if timm's model, carrying our weights, does not give our logits."""
    x = torch.randn(2, 3, resolution, resolution, device=device)
    ours.eval()
    twin.eval()
    with torch.no_grad():
        diff = (ours(x) - twin(x)).abs().max().item()
    if diff > TWIN_TOLERANCE:
        raise RuntimeError(f"timm's {name} with our weights differs from ours by {diff:.2e} in the logits")


def make_step(
    model: Runner, setting: Setting, device: torch.device, amp_dtype: str | None, warm: bool = False
) -> Callable[[], None]:
    """One inference or training step on a fixed random batch; `warm` takes one first (torch.compile compiles then,
    out of the timings and the memory baseline)."""
    x = torch.randn(setting.batch_size, 3, setting.resolution, setting.resolution, device=device)
    amp = setting.precision == "amp"
    if setting.mode == "infer":
        if isinstance(model, nn.Module):  # an onnxruntime session has no modes
            model.eval()

        def step() -> None:
            with torch.no_grad(), autocast(device, amp, amp_dtype):
                model(x)

    else:
        model.train()
        optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
        target = torch.randint(0, 1000, (setting.batch_size,), device=device)
        scaler = torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None

        def step() -> None:
            with autocast(device, amp, amp_dtype):
                loss = F.cross_entropy(model(x), target)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if warm:
        step()
    return step


def measure_setting(
    subjects: list[Subject],
    models: dict[Subject, Runner],
    setting: Setting,
    device: torch.device,
    workdir: Path,
    *,
    amp_dtype: str | None,
    warmup: int,
    repeats: int,
    measure_memory: bool,
    threads: int | None,
) -> list[dict[str, Any]]:
    """Round-robin timing of the subjects in one setting, then (when `measure_memory`) their peak memory."""
    steps = {subject: make_step(models[subject], setting, device, amp_dtype, subject.compiled) for subject in subjects}
    times = time_round_robin(steps, device, warmup, repeats)
    records = []
    for subject in subjects:
        median = statistics.median(times[subject])
        peak = measure_peak_memory(subject, setting, device, threads, amp_dtype, workdir) if measure_memory else None
        # What ran, not what the setting asked of PyTorch: the int8 file computes with int8 weights.
        ran = dict(asdict(setting), precision="int8" if subject.runtime == "onnxruntime-int8" else setting.precision)
        records.append(
            dict(
                implementation=subject.label,
                **asdict(subject),
                **ran,
                images_per_s=setting.batch_size / median,
                step_ms=1000 * median,
                step_ms_all=[1000 * t for t in times[subject]],
                peak_memory_mib=peak,
            )
        )
    del steps
    gc.collect()
    return records


def time_round_robin(
    steps: dict[Any, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[Any, list[float]]:
    """Seconds per call of each step, timed in rounds of one call each so that load changes hit all alike."""
    times: dict[Any, list[float]] = {key: [] for key in steps}
    for round_index in range(warmup + repeats):
        for key, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            if round_index >= warmup:
                times[key].append(time.perf_counter() - start)
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Ours against timm's twin (not checkpointed) and against our reference path, for speed and memory."""
    by_label = {(r["model"], r["implementation"]): r for r in records}
    for record in records:
        if record["source"] != "ours":
            continue
        for key, peer in (("timm", "timm"), ("reference", "ours(reference)")):
            other = by_label.get((record["model"], peer))
            record[f"speed_vs_{key}"] = record["images_per_s"] / other["images_per_s"] if other else None
            both = other and record["peak_memory_mib"] and other["peak_memory_mib"]
            record[f"memory_vs_{key}"] = record["peak_memory_mib"] / other["peak_memory_mib"] if both else None


def print_table(setting: Setting, records: list[dict[str, Any]]) -> None:
    """One block per setting: images/s, peak memory and the ratios."""
    print(f"\n{setting.mode} {setting.precision} {setting.resolution}px batch {setting.batch_size}")
    width = max(len(r["model"]) for r in records)
    print(
        f"  {'model':<{width}} {'implementation':<24} {'img/s':>9} {'vs timm':>8} {'vs ref':>7} {'peak MiB':>9} "
        f"{'vs timm':>8} {'vs ref':>7}"
    )

    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value else "-"

    for r in records:
        peak = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] else "-"
        # A row computed in another precision than the block's (the int8 file) says so.
        implementation = r["implementation"]
        if r["precision"] != setting.precision:
            implementation += f" ({r['precision']})"
        print(
            f"  {r['model']:<{width}} {implementation:<24} {r['images_per_s']:>9.2f} "
            f"{ratio(r.get('speed_vs_timm')):>8} {ratio(r.get('speed_vs_reference')):>7} {peak:>9} "
            f"{ratio(r.get('memory_vs_timm')):>8} {ratio(r.get('memory_vs_reference')):>7}"
        )


def write_outputs(records: list[dict[str, Any]], output: str | os.PathLike, device: torch.device) -> None:
    """OUTPUT.json (everything, with the environment), OUTPUT.csv (one row per measurement), OUTPUT.png."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnxruntime_version = None
    if any(r["runtime"] in ONNX_RUNTIMES for r in records):
        import onnxruntime

        onnxruntime_version = onnxruntime.__version__
    environment = dict(
        command=" ".join(sys.argv),
        device=str(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        timm=timm.__version__,
        python=platform.python_version(),
        processor=processor_name(device),
        cpu_native_bfloat16=native_bfloat16_cpu() if device.type == "cpu" else None,
        onnxruntime=onnxruntime_version,
    )
    # OUTPUT is a stem: "bench_torch2.7" must not lose its ".7" to with_suffix.
    json_file, csv_file, png_file = (output.parent / f"{output.name}{suffix}" for suffix in (".json", ".csv", ".png"))
    json_file.write_text(json.dumps(dict(environment=environment, results=records), indent=1))
    # Every record's keys: timm's rows, which come first, have no ratio columns.
    columns = list(dict.fromkeys(key for record in records for key in record if key != "step_ms_all"))
    write_csv(records, csv_file, columns)
    several_sizes = len({r["resolution"] for r in records}) > 1
    (plot_against_resolution if several_sizes else plot_side_by_side)(records, png_file)
    print(f"\nwrote {json_file}, {csv_file}, {png_file}")


def _curve_label(record: dict[str, Any]) -> str:
    """How a plot names the measurements of one subject at one batch size and precision."""
    name = f"timm {record['model']}" if record["source"] == "timm" else f"{record['model']} {record['implementation']}"
    return f"{name}, batch {record['batch_size']}, {record['precision']}"


def plot_side_by_side(records: list[dict[str, Any]], path: Path) -> None:
    """Peak memory (when measured) and images/s of every subject at the one resolution, as bars."""
    modes = sorted({r["mode"] for r in records}, key=BENCH_MODES.index)
    panels = [("images_per_s", "images / s")]
    if any(r["peak_memory_mib"] for r in records):
        panels.insert(0, ("peak_memory_mib", "peak memory (MiB)"))
    rows = max(sum(r["mode"] == mode for r in records) for mode in modes)
    figure, axes = new_figure(len(modes), len(panels), size=(6 * len(panels) + 3, (0.4 * rows + 1.2) * len(modes)))
    for row, mode in enumerate(modes):
        points = [r for r in records if r["mode"] == mode]
        labels = [_curve_label(r) for r in points]
        for column, (key, xlabel) in enumerate(panels):
            ax = axes[row][column]
            values = [r[key] or 0 for r in points]
            bars = ax.barh(labels, values, color=[f"C{i % 10}" for i in range(len(points))])
            ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=7)
            ax.set(
                xlabel=xlabel, title=f"{mode} at {points[0]['resolution']} px: {xlabel}", xlim=(0, max(values) * 1.15)
            )
            ax.invert_yaxis()  # in the order measured, first on top
            ax.grid(alpha=0.3, axis="x")
            if column:
                ax.set_yticklabels([])
    save_figure(figure, path)


def plot_against_resolution(records: list[dict[str, Any]], path: Path) -> None:
    """Peak memory and images/s against input size, one line per subject (the paper's memory figure)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    modes = sorted({r["mode"] for r in records}, key=BENCH_MODES.index)
    resolutions = sorted({r["resolution"] for r in records})
    figure, axes = new_figure(len(modes), 2, size=(11, 3.6 * len(modes) + 1.2))
    for row, mode in enumerate(modes):
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["mode"] == mode:
                lines.setdefault(_curve_label(r), []).append(r)
        for index, (label, points) in enumerate(lines.items()):
            points.sort(key=lambda r: r["resolution"])
            sizes = [r["resolution"] for r in points]
            style = dict(marker="os^vD<>"[index % 7], color=f"C{index % 10}", label=label)
            if all(r["peak_memory_mib"] for r in points):
                axes[row][0].plot(sizes, [r["peak_memory_mib"] for r in points], **style)
            axes[row][1].plot(sizes, [r["images_per_s"] for r in points], **style)
        for column, ylabel in enumerate(("peak memory (MiB)", "images / s")):
            ax = axes[row][column]
            ax.set(xlabel="input resolution (px)", ylabel=ylabel, title=f"{mode}: {ylabel}", xscale="log", yscale="log")
            ax.set_xticks(resolutions, [str(s) for s in resolutions])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][1].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    save_figure(figure, path)


def processor_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's as /proc/cpuinfo gives it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------------------------------------------
# Peak memory, one fresh process per measurement
# ----------------------------------------------------------------------------------------------------------------


def measure_peak_memory(
    subject: Subject,
    setting: Setting,
    device: torch.device,
    threads: int | None,
    amp_dtype: str | None,
    workdir: Path | None = None,
) -> float:
    """Peak memory (MiB) that two steps of `subject` add to the built model (or loaded onnxruntime session, whose
    file is in `workdir`), measured in a fresh subprocess."""
    spec = dict(
        subject=asdict(subject),
        setting=asdict(setting),
        device=str(device),
        threads=threads,
        amp_dtype=amp_dtype,
        workdir=str(workdir) if workdir else None,
    )
    # A fixed threshold stops glibc from raising it as tensors are freed, so freed tensors go back to the kernel
    # and the resident set tracks live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    code = "import sys; from sequencer.bench import memory_probe; memory_probe(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {subject.label} {setting} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_probe(spec_json: str) -> None:
    """Subprocess entry point: build, take two steps, print {"peak_mib": ...} as the last line."""
    spec = json.loads(spec_json)
    set_threads(spec["threads"])
    device = torch.device(spec["device"])
    subject, setting = Subject(**spec["subject"]), Setting(**spec["setting"])
    workdir = Path(spec["workdir"]) if spec["workdir"] else None
    model = build_runner(subject, setting.resolution, device, workdir, spec["threads"])
    step = make_step(model, setting, device, spec["amp_dtype"], subject.compiled)
    if device.type == "cuda":
        peak_mib = cuda_peak_mib(step, device)
    else:
        gc.collect()
        baseline = reset_peak_resident()
        step()
        step()
        peak_mib = (_status_kib("VmHWM") * 1024 - baseline) / 2**20
    print(json.dumps(dict(peak_mib=peak_mib)))


def cuda_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """What two steps allocate on the GPU above what was allocated before them, in MiB."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    step()
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def reset_peak_resident() -> int:
    """Reset this process's peak resident set (VmHWM) to the current one and return it in bytes."""
    try:
        Path(CLEAR_REFS).write_text("5")
    except OSError as error:
        raise RuntimeError(f"cannot reset the peak resident set through {CLEAR_REFS}: {error}") from error
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")
