"""`make gpu-check`: is the GPU path right, does it train, and how fast is it, in one run on one device.

    .venv/bin/python benchmarks/gpu_check.py --output benchmarks/results/gpu_check
    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu --output /tmp/gpu_check   # the CPU test's run

1. Implementations: every `rnn_impl` ("reference", which is cuDNN on CUDA; "fused") and the op that torch.compile
   runs ("compiled", through `torch.compile(backend="aot_eager")` so that only the op's kernels differ from
   eager) against nn.LSTM/GRU/RNN in float64 on the CPU, for lstm/gru/rnn in float32 (TF32 off) and under float16 /
   bfloat16 autocast: outputs, input gradients and every parameter gradient, as max |error| / max |truth|.
2. Training: a few hundred AMP steps of sequencer2d_tiny on one fixed batch whose classes are learnable (each image
   is its class's pattern plus noise); the loss must fall to under a third of where it started.
3. Speed and memory (not checked, recorded): images/s and peak GPU memory for Sequencer2D-S/M/L as ours ("auto",
   "reference", "fused", "compiled" = torch.compile with inductor), timm's `sequencer2d_*` with the same weights,
   Swin-T and ConvNeXt-T: an AMP training step at batch 128 and AMP inference at batch 256 at 224 px, and AMP
   inference at batch 1 at 224-896 px (the paper's memory figure). Peak memory is `max_memory_allocated` above
   what was allocated before the steps (CUDA only; null on the CPU).

Writes OUTPUT.json and OUTPUT.png and exits 1 when a check fails or a measurement raised (listed under "errors").
`--tiny` shrinks everything to sequencer2d_tiny, 32-48 px, small batches, float32 checks and timm's test_vit /
test_convnext as peers, so that a CPU test runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from sequencer.bench import (
    Setting,
    Variant,
    _processor_name,
    build_model,
    check_twin,
    cuda_peak_mib,
    make_step,
    time_round_robin,
)
from sequencer.model import RNN2D, create_model
from sequencer.runtime import resolve_device

CELLS = ("lstm", "gru", "rnn")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |error| / max |truth| allowed: float32 rounding over the sequence; half precision keeps 11 / 8 mantissa bits.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
IMPLEMENTATIONS = ("reference", "fused", "compiled")
LOSS_DROP = 1 / 3

FULL = dict(
    models=("sequencer2d_s", "sequencer2d_m", "sequencer2d_l"),
    peers=("swin_tiny_patch4_window7_224", "convnext_tiny"),
    resolution=224,
    train_batch=128,
    infer_batch=256,
    memory_resolutions=(224, 448, 672, 896),
    train_steps=300,
    dtypes=tuple(DTYPES),
    mixer_shape=(8, 14, 14, 96, 48),  # batch, map side x2, channels, hidden: a Sequencer2D-S stage-1 mixer
    repeats=10,
)
TINY = dict(
    models=("sequencer2d_tiny",),
    peers=("test_vit", "test_convnext"),
    resolution=32,
    train_batch=4,
    infer_batch=8,
    memory_resolutions=(32, 48),
    train_steps=40,
    dtypes=("float32",),
    mixer_shape=(2, 5, 6, 16, 8),
    repeats=2,
)


def main(argv: list[str] | None = None) -> int:
    """Run the three parts, write the files, return 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes, float32 checks (CPU test)")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled' timing")
    parser.add_argument("--models", default=None, help="comma-separated, to time fewer (default: S, M, L)")
    parser.add_argument("--output", default="benchmarks/results/gpu_check", help="writes OUTPUT.json, OUTPUT.png")
    args = parser.parse_args(argv)
    config = dict(TINY if args.tiny else FULL)
    if args.models:
        config["models"] = tuple(args.models.split(","))
    device = resolve_device(args.device)
    torch.manual_seed(0)

    checks = [check_implementation(impl, cell, dtype, device, config["mixer_shape"]) for cell in CELLS
              for dtype in config["dtypes"] for impl in IMPLEMENTATIONS]  # fmt: skip
    for row in checks:
        print(f"{row['cell']:<5} {row['dtype']:<9} {row['impl']:<10} " + ("ok" if row["ok"] else "FAILED"), row)
    training = check_training(device, config["train_steps"])
    print("training:", {k: v for k, v in training.items() if k != "losses"})
    errors: list[str] = []
    throughput = measure_throughput(config, device, args.compile_backend, errors)
    memory = measure_memory_against_resolution(config, device, errors)
    ok = all(row["ok"] for row in checks) and training["ok"] and not errors
    report = dict(
        environment=environment(device), tiny=args.tiny, ok=ok, implementations=checks, training=training,
        throughput=throughput, memory_vs_resolution=memory, errors=errors,
    )  # fmt: skip
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, output.with_suffix(".png"))
    print(
        f"wrote {output.with_suffix('.json')} and {output.with_suffix('.png')}; checks {'passed' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------------
# 1. Every implementation against nn.LSTM / GRU / RNN
# ----------------------------------------------------------------------------------------------------------------

Runner = Callable[[RNN2D, torch.Tensor], torch.Tensor]


def runner(impl: str) -> Runner:
    """How a mixer runs with `impl`: an rnn_impl, or "compiled" (the torch.compile op, aot_eager around it)."""

    def run(mixer: RNN2D, x: torch.Tensor) -> torch.Tensor:
        mixer.rnn_impl = "auto" if impl == "compiled" else impl
        if impl == "compiled":
            torch._dynamo.reset()
            return torch.compile(mixer, backend="aot_eager", fullgraph=True)(x)
        return mixer(x)

    return run


def check_implementation(
    impl: str | Runner, cell: str, dtype: str, device: torch.device, shape: tuple[int, ...]
) -> dict[str, Any]:
    """Relative errors of one implementation's output and gradients in `dtype` against float64 nn.LSTM/GRU/RNN."""
    batch, height, width, dim, hidden = shape
    torch.manual_seed(0)
    truth_mixer = RNN2D(dim, hidden, cell=cell, rnn_impl="reference").double()
    x = torch.randn(batch, height, width, dim, dtype=torch.float64)
    upstream = torch.randn(batch, height, width, dim, dtype=torch.float64)
    truth = outputs_and_grads(runner("reference"), truth_mixer, x, upstream, None)
    mixer = copy.deepcopy(truth_mixer).float().to(device)
    run = runner(impl) if isinstance(impl, str) else impl
    row = dict(impl=impl if isinstance(impl, str) else "custom", cell=cell, dtype=dtype, tolerance=TOLERANCES[dtype])
    try:
        with full_float32():
            got = outputs_and_grads(run, mixer, x.float().to(device), upstream.float().to(device), DTYPES[dtype])
    except Exception as error:  # a kernel that cannot launch is a failed check, reported beside the others
        return dict(row, output_error=None, gradient_error=None, ok=False, error=f"{type(error).__name__}: {error}")
    errors = relative_errors(got, truth)
    ok = all(e <= TOLERANCES[dtype] for e in errors)
    return dict(row, output_error=errors[0], gradient_error=max(errors[1:]), ok=ok, error=None)


def outputs_and_grads(
    run: Runner, mixer: RNN2D, x: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """[output, input grad, every parameter grad], under autocast to `dtype` when it is a half type."""
    x = x.detach().requires_grad_()
    amp = dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(x.device.type, dtype=dtype if amp else None, enabled=amp):
        y = run(mixer, x)
    grads = torch.autograd.grad(y.float(), [x, *mixer.parameters()], upstream.to(x.dtype))
    return [y.detach(), *grads]


def relative_errors(got: list[torch.Tensor], truth: list[torch.Tensor]) -> list[float]:
    """Per tensor, max |got - truth| / max |truth| (inf for a non-finite result)."""
    errors = []
    for g, t in zip(got, truth, strict=True):
        g = g.detach().double().cpu()
        error = (g - t).abs().max().item() / max(t.abs().max().item(), 1e-12)
        errors.append(error if math.isfinite(error) else math.inf)
    return errors


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 matmuls and cuDNN RNNs without TF32 (cudnn.flags() would also switch cuDNN off), restored after."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


# ----------------------------------------------------------------------------------------------------------------
# 2. AMP training on a fixed batch
# ----------------------------------------------------------------------------------------------------------------


def check_training(device: torch.device, steps: int, classes: int = 10, batch: int = 32) -> dict[str, Any]:
    """Train sequencer2d_tiny (rnn_impl auto) on one learnable batch; the loss must fall below LOSS_DROP of its start.

    AMP (float16 with a GradScaler) on CUDA; float32 elsewhere, where autocast would pick bfloat16 oneDNN kernels
    that not every CPU has.
    """
    torch.manual_seed(0)
    model = create_model("sequencer2d_tiny", num_classes=classes).to(device).train()
    patterns = torch.randn(classes, 3, 32, 32)
    target = torch.arange(batch) % classes
    x = (patterns[target] + 0.5 * torch.randn(batch, 3, 32, 32)).to(device)
    target = target.to(device)
    amp = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    window = max(1, steps // 10)
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    finite = all(math.isfinite(v) for v in losses)
    return dict(
        steps=steps,
        precision="amp float16" if amp else "float32",
        first_loss=first,
        last_loss=last,
        ok=finite and last < LOSS_DROP * first,
        losses=losses,
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. Images/s and peak memory
# ----------------------------------------------------------------------------------------------------------------


def measure_throughput(
    config: dict[str, Any], device: torch.device, backend: str, errors: list[str]
) -> list[dict[str, Any]]:
    """AMP training and inference of every model's variants at the config's resolution and batch sizes."""
    records = []
    resolution = config["resolution"]
    for name in (*config["models"], *config["peers"]):
        with recorded_failure(errors, f"{name} at {resolution} px"):
            models = build_variants(name, name in config["models"], resolution, device, backend)
            for mode, batch in (("train", config["train_batch"]), ("infer", config["infer_batch"])):
                setting = Setting(mode, "amp", resolution, batch)
                records += measure(models, name, setting, device, config["repeats"])
    return records


def measure_memory_against_resolution(
    config: dict[str, Any], device: torch.device, errors: list[str]
) -> list[dict[str, Any]]:
    """AMP inference at batch 1 from the smallest to the largest resolution: ours (auto), timm's twin, the peers."""
    records = []
    names = (config["models"][0], *config["peers"])
    for resolution in config["memory_resolutions"]:
        for name in names:
            with recorded_failure(errors, f"{name} at {resolution} px, batch 1"):
                models = build_variants(name, name in config["models"], resolution, device, None)
                if name in config["models"]:
                    models = {label: m for label, m in models.items() if label in ("ours(auto)", "timm")}
                records += measure(models, name, Setting("infer", "amp", resolution, 1), device, config["repeats"])
    return records


@contextlib.contextmanager
def recorded_failure(errors: list[str], what: str) -> Iterator[None]:
    """Note an exception (out of memory, a failed compile) in `errors` and go on; free what it left behind."""
    try:
        yield
    except Exception as error:
        errors.append(f"{what}: {type(error).__name__}: {error}")
        print(f"FAILED {errors[-1]}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_variants(
    name: str, ours: bool, resolution: int, device: torch.device, backend: str | None
) -> dict[str, nn.Module]:
    """Ours as auto/reference/fused (and compiled with `backend`) plus timm's twin on the same weights; or timm's."""
    if not ours:
        return {"timm": build_model(Variant(name, "timm"), resolution).to(device)}
    auto = build_model(Variant(name, "ours", "auto"), resolution).to(device)
    models: dict[str, nn.Module] = {"ours(auto)": auto}
    for impl in ("reference", "fused"):
        models[f"ours({impl})"] = copy.deepcopy(auto)
        models[f"ours({impl})"].set_rnn_impl(impl)
    if backend:
        models["ours(compiled)"] = torch.compile(copy.deepcopy(auto), backend=backend)
    if timm.is_model(name):
        twin = timm.create_model(name)
        twin.load_state_dict(auto.state_dict())
        models["timm"] = twin.to(device)
        check_twin(auto, models["timm"], name, resolution, device)
    return models


def measure(
    models: dict[str, nn.Module], name: str, setting: Setting, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Round-robin images/s of the models in one setting (`sequencer.bench`), then each one's peak memory."""
    amp_dtype = "float16" if device.type == "cuda" else "bfloat16"
    if device.type != "cuda":
        setting = Setting(setting.mode, "float32", setting.resolution, setting.batch_size)  # see check_training
    steps = {label: make_step(model, setting, device, amp_dtype) for label, model in models.items()}
    times = time_round_robin(steps, device, warmup=1, repeats=repeats)
    records = []
    for label, step in steps.items():
        records.append(
            dict(
                model=name,
                variant=label,
                mode=setting.mode,
                precision=setting.precision,
                resolution=setting.resolution,
                batch_size=setting.batch_size,
                images_per_s=setting.batch_size / statistics.median(times[label]),
                peak_memory_mib=peak_memory_mib(step, device),
            )
        )
    return records


def peak_memory_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """What two steps allocate on the GPU above what was allocated before them (None off CUDA)."""
    return cuda_peak_mib(step, device) if device.type == "cuda" else None


def environment(device: torch.device) -> dict[str, Any]:
    """Where the figures come from."""
    return dict(
        command=" ".join(sys.argv),
        device=str(device),
        device_name=_processor_name(device),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        timm=timm.__version__,
        python=platform.python_version(),
    )


def plot(report: dict[str, Any], path: Path) -> None:
    """Training and inference images/s per model and variant, training peak memory, memory against resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
    panels = [
        (axes[0][0], "train", "images_per_s", "training step, images / s"),
        (axes[0][1], "infer", "images_per_s", "inference, images / s"),
        (axes[1][0], "train", "peak_memory_mib", "training step, peak GPU memory (MiB)"),
    ]
    for ax, mode, key, title in panels:
        rows = [r for r in report["throughput"] if r["mode"] == mode]
        labels = [f"{r['model']}\n{r['variant']}" for r in rows]
        values = [r[key] or 0 for r in rows]
        ax.barh(range(len(rows)), values, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        batch = rows[0]["batch_size"] if rows else ""
        ax.set(title=f"{title}, batch {batch}, {rows[0]['precision'] if rows else ''}")
        ax.grid(alpha=0.3, axis="x")
    ax = axes[1][1]
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in report["memory_vs_resolution"]:
        lines.setdefault(f"{r['model']} {r['variant']}", []).append(r)
    for index, (label, points) in enumerate(lines.items()):
        key = "peak_memory_mib" if all(p["peak_memory_mib"] for p in points) else "images_per_s"
        ax.plot([p["resolution"] for p in points], [p[key] for p in points], marker="os^vD"[index % 5], label=label)
    measured = "peak memory (MiB)" if any(r["peak_memory_mib"] for r in report["memory_vs_resolution"]) else "img/s"
    ax.set(title=f"inference, batch 1: {measured} against resolution", xlabel="input resolution (px)", yscale="log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    name = report["environment"]["device_name"]
    figure.suptitle(f"gpu_check on {name} ({'passed' if report['ok'] else 'FAILED'})")
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
