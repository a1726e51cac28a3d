"""`make gpu-check`: is the GPU path right, does it train, and how fast is it, in one run on one device.

Runs with whatever Python already has torch, torchvision and timm, from the checkout, with no install and no network:

    PYTHONPATH=src python3 benchmarks/gpu_check.py                  # quick: Sequencer2D-S, < 5 min on an H100/H200
    PYTHONPATH=src python3 benchmarks/gpu_check.py --mode full      # S/M/L, all cells, memory against resolution
    PYTHONPATH=src python3 benchmarks/gpu_check.py --mode tiny --device cpu --output /tmp/gpu_check  # the CPU test

Parts, each written to OUTPUT.json as soon as it is done (a run cut off by a time limit keeps what it measured):
1. implementations: every `rnn_impl` ("reference", which is cuDNN on CUDA; "fused") and the op that torch.compile
   runs ("compiled", through `torch.compile(backend="aot_eager")` so that only the op's kernels differ from eager)
   against nn.LSTM/GRU/RNN in float64 on the CPU, on the real stage shapes of Sequencer2D-S at 224 px (stage 1: a
   32x32 map, C 192, hidden 48; stages 2-4: 16x16, C 384, hidden 96), in float32 (TF32 off) and under float16 /
   bfloat16 autocast: outputs, input gradients and every parameter gradient, as max |error| / max |truth|.
2. training: a few hundred AMP steps of sequencer2d_tiny on one fixed, learnable batch, in float16 (with a
   GradScaler) and in bfloat16; the loss must fall to under a third of where it started.
3. throughput: images/s and peak GPU memory of an AMP (float16) training step at batch 128 and AMP inference at
   batch 256, 224 px: ours ("auto", "reference", "fused", "compiled" = torch.compile with inductor), timm's port
   with the same weights (its logits checked against ours with TF32 off), Swin-T and ConvNeXt-T.
4. candidate: on a square map the vertical and horizontal BiLSTMs are one LSTM of hidden 2D with block-diagonal
   weights (`block_diagonal_weights`, exact); one cuDNN call against the two of the reference, forward and
   forward+backward, on both stage shapes at batch 8 and 128. Measured, not shipped.
5. profile: one training step of ours (auto) under torch.profiler: the top kernels and host against device time.
6. (full mode) memory and images/s of AMP inference at batch 1 from 224 to 896 px (the paper's memory figure).

Exits 1 when a check fails or a measurement raised (listed under "errors"), 2 when the mode needs CUDA and there is
none. `--mode tiny` shrinks everything to sequencer2d_tiny, small maps and batches, float32 checks and timm's
test_vit / test_convnext as peers, so that a CPU test runs it end to end.
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
    Subject,
    build_subject_model,
    check_twin,
    cuda_peak_mib,
    make_step,
    processor_name,
    time_round_robin,
)
from sequencer.builder import create_model
from sequencer.model import BiLSTM2D, route
from sequencer.plotting import new_figure, save_figure
from sequencer.recurrence import recurrent_weights

CELLS = ("lstm", "gru", "rnn")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |error| / max |truth| allowed: float32 rounding over the sequence; half precision keeps 11 / 8 mantissa bits.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
IMPLEMENTATIONS = ("reference", "fused", "compiled")
LOSS_DROP = 1 / 3

# (batch, map side, channels, hidden) of Sequencer2D-S's mixers at 224 px: stage 1, then stages 2-4.
STAGE_SHAPES = ((32, 192, 48), (16, 384, 96))
QUICK = dict(
    models=("sequencer2d_s",),
    peers=("swin_tiny_patch4_window7_224", "convnext_tiny"),
    resolution=224,
    train_batch=128,
    infer_batch=256,
    memory_resolutions=(),
    train_steps=200,
    cells=("lstm",),
    dtypes=tuple(DTYPES),
    mixer_shapes=tuple((8, side, side, dim, hidden) for side, dim, hidden in STAGE_SHAPES),
    candidate_shapes=tuple((batch, *shape) for shape in STAGE_SHAPES for batch in (8, 128)),
    repeats=10,
)
FULL = dict(
    QUICK,
    models=("sequencer2d_s", "sequencer2d_m", "sequencer2d_l"),
    memory_resolutions=(224, 448, 672, 896),
    cells=CELLS,
)
TINY = dict(
    models=("sequencer2d_tiny",),
    peers=("test_vit", "test_convnext"),
    resolution=32,
    train_batch=4,
    infer_batch=8,
    memory_resolutions=(32, 48),
    train_steps=40,
    cells=CELLS,
    dtypes=("float32",),
    mixer_shapes=((2, 5, 6, 16, 8),),
    candidate_shapes=((2, 5, 16, 8),),
    repeats=2,
)
MODES = {"quick": QUICK, "full": FULL, "tiny": TINY}


class Report:
    """The run's results, rewritten to OUTPUT.json after every part."""

    def __init__(self, output: Path, **fields: Any) -> None:
        self.path = output.with_suffix(".json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = dict(fields, errors=[], ok=None)

    def add(self, part: str, value: Any) -> None:
        self.data[part] = value
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run the parts, saving after each; return 1 if a check failed, 2 for a mode this machine cannot run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=tuple(MODES), default="quick", help="quick and full need CUDA")
    parser.add_argument("--device", default=None, help="default: cuda (tiny mode: cuda when available, else cpu)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled' timing")
    parser.add_argument("--models", default=None, help="comma-separated, to time others (default: the mode's)")
    parser.add_argument("--output", default="benchmarks/results/gpu_check", help="writes OUTPUT.json, OUTPUT.png")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda, but torch sees no CUDA device; --mode tiny --device cpu runs here")
        return 2
    if args.mode != "tiny" and device.type != "cuda":
        available = "none" if not torch.cuda.is_available() else "cuda"
        print(
            f"gpu_check: error: --mode {args.mode} measures a CUDA GPU (available: {available}); --mode tiny runs here"
        )
        return 2
    config = dict(MODES[args.mode])
    if args.models:
        config["models"] = tuple(args.models.split(","))
    torch.manual_seed(0)
    report = Report(Path(args.output), environment=environment(device), mode=args.mode)
    errors: list[str] = report.data["errors"]

    checks = []
    for cell in config["cells"]:
        for shape in config["mixer_shapes"]:
            truth = float64_truth(cell, shape)
            for dtype in config["dtypes"]:
                for impl in IMPLEMENTATIONS:
                    row = check_implementation(impl, cell, dtype, device, shape, truth)
                    print(f"{cell:<5} {shape!s:<22} {dtype:<9} {impl:<10} {'ok' if row['ok'] else 'FAILED'}", row)
                    checks.append(row)
                    report.add("implementations", checks)
    training = [check_training(device, config["train_steps"], dtype) for dtype in training_dtypes(device)]
    for row in training:
        print("training:", {k: v for k, v in row.items() if k != "losses"})
    report.add("training", training)
    report.add("throughput", [])
    measure_throughput(config, device, args.compile_backend, report)
    report.add("candidate", [])
    with recorded_failure(errors, "block-diagonal candidate"):
        for shape in config["candidate_shapes"]:
            report.data["candidate"] += time_block_diagonal(shape, device, config["repeats"])
            report.save()
    with recorded_failure(errors, "profile"):
        report.add("profile", profile_training_step(config, device))
    report.add("memory_vs_resolution", [])
    measure_memory_against_resolution(config, device, report)

    ok = all(row["ok"] for row in checks) and all(row["ok"] for row in training) and not errors
    report.add("ok", ok)
    png = Path(args.output).with_suffix(".png")
    with recorded_failure(errors, "plot"):
        plot(report.data, png)
    report.save()
    print(f"wrote {report.path} and {png}; checks {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------------
# 1. Every implementation against nn.LSTM / GRU / RNN in float64
# ----------------------------------------------------------------------------------------------------------------


def routed_mixer(dim: int, hidden: int, cell: str = "lstm") -> BiLSTM2D:
    """One BiLSTM2D whose `rnn_impl` picks its path, starting on the reference."""
    mixer = BiLSTM2D(dim, hidden, cell=cell)
    route(mixer, rnn_impl="reference")
    return mixer


Runner = Callable[[BiLSTM2D, torch.Tensor], torch.Tensor]


def runner(impl: str) -> Runner:
    """How a mixer runs with `impl`: an rnn_impl, or "compiled" (the torch.compile op, aot_eager around it)."""

    def run(mixer: BiLSTM2D, x: torch.Tensor) -> torch.Tensor:
        mixer.rnn_impl = "auto" if impl == "compiled" else impl
        if impl == "compiled":
            torch._dynamo.reset()
            return torch.compile(mixer, backend="aot_eager", fullgraph=True)(x)
        return mixer(x)

    return run


Truth = tuple[BiLSTM2D, torch.Tensor, torch.Tensor, list[torch.Tensor]]


def float64_truth(cell: str, shape: tuple[int, ...]) -> Truth:
    """(mixer, input, upstream gradient, [output, input grad, parameter grads]) of nn.LSTM/GRU/RNN in float64."""
    batch, height, width, dim, hidden = shape
    torch.manual_seed(0)
    mixer = routed_mixer(dim, hidden, cell=cell).double()
    x = torch.randn(batch, height, width, dim, dtype=torch.float64)
    upstream = torch.randn(batch, height, width, dim, dtype=torch.float64)
    return mixer, x, upstream, outputs_and_grads(runner("reference"), mixer, x, upstream, None)


def check_implementation(
    impl: str | Runner,
    cell: str,
    dtype: str,
    device: torch.device,
    shape: tuple[int, ...],
    truth: Truth | None = None,
) -> dict[str, Any]:
    """Relative errors of one implementation's output and gradients in `dtype` against float64 nn.LSTM/GRU/RNN."""
    truth_mixer, x, upstream, expected = truth or float64_truth(cell, shape)
    mixer = copy.deepcopy(truth_mixer).float().to(device)
    run = runner(impl) if isinstance(impl, str) else impl
    row = dict(
        impl=impl if isinstance(impl, str) else "custom",
        cell=cell,
        shape=list(shape),
        dtype=dtype,
        tolerance=TOLERANCES[dtype],
    )
    try:
        with full_float32():
            got = outputs_and_grads(run, mixer, x.float().to(device), upstream.float().to(device), DTYPES[dtype])
    except Exception as error:  # a kernel that cannot launch is a failed check, reported beside the others
        return dict(row, output_error=None, gradient_error=None, ok=False, error=f"{type(error).__name__}: {error}")
    errors = relative_errors(got, expected)
    ok = all(e <= TOLERANCES[dtype] for e in errors)
    return dict(row, output_error=errors[0], gradient_error=max(errors[1:]), ok=ok, error=None)


def outputs_and_grads(
    run: Runner, mixer: BiLSTM2D, x: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype | None
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


def training_dtypes(device: torch.device) -> tuple[str, ...]:
    """float16 (with a GradScaler) and bfloat16 on CUDA; float32 elsewhere (CPU autocast speed varies by processor)."""
    return ("float16", "bfloat16") if device.type == "cuda" else ("float32",)


def check_training(
    device: torch.device, steps: int, dtype: str = "float32", classes: int = 10, batch: int = 32
) -> dict[str, Any]:
    """Train sequencer2d_tiny on one learnable batch: the loss must fall under LOSS_DROP of its start."""
    torch.manual_seed(0)
    model = create_model("sequencer2d_tiny", num_classes=classes).to(device).train()
    patterns = torch.randn(classes, 3, 32, 32)
    target = torch.arange(batch) % classes
    x = (patterns[target] + 0.5 * torch.randn(batch, 3, 32, 32)).to(device)
    target = target.to(device)
    amp = dtype != "float32"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=amp):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    window = max(1, steps // 10)
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    finite = all(math.isfinite(v) for v in losses)
    precision = f"amp {dtype}" if amp else "float32"
    return dict(
        steps=steps, precision=precision, first_loss=first, last_loss=last, ok=finite and last < LOSS_DROP * first,
        losses=losses,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# 3. Images/s and peak memory; 6. against resolution
# ----------------------------------------------------------------------------------------------------------------


def measure_throughput(config: dict[str, Any], device: torch.device, backend: str, report: Report) -> None:
    """AMP training and inference of every model's implementations at the config's resolution and batch sizes."""
    resolution = config["resolution"]
    for name in (*config["models"], *config["peers"]):
        with recorded_failure(report.data["errors"], f"{name} at {resolution} px"):
            models = build_implementations(name, name in config["models"], resolution, device, backend)
            for mode, batch in (("train", config["train_batch"]), ("infer", config["infer_batch"])):
                setting = Setting(mode, "amp", resolution, batch)
                report.data["throughput"] += measure(models, name, setting, device, config["repeats"])
                report.save()


def measure_memory_against_resolution(config: dict[str, Any], device: torch.device, report: Report) -> None:
    """AMP inference at batch 1 from the smallest to the largest resolution: ours (auto), timm's twin, the peers."""
    names = (config["models"][0], *config["peers"])
    for resolution in config["memory_resolutions"]:
        for name in names:
            with recorded_failure(report.data["errors"], f"{name} at {resolution} px, batch 1"):
                models = build_implementations(name, name in config["models"], resolution, device, None)
                if name in config["models"]:
                    models = {label: m for label, m in models.items() if label in ("ours(auto)", "timm")}
                setting = Setting("infer", "amp", resolution, 1)
                report.data["memory_vs_resolution"] += measure(models, name, setting, device, config["repeats"])
                report.save()


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


def build_implementations(
    name: str, ours: bool, resolution: int, device: torch.device, backend: str | None
) -> dict[str, nn.Module]:
    """Ours as auto/reference/fused (and compiled with `backend`) plus timm's twin on the same weights; or timm's."""
    if not ours:
        return {"timm": build_subject_model(Subject(name, "timm"), resolution).to(device)}
    auto = build_subject_model(Subject(name, "ours", "auto"), resolution).to(device)
    models: dict[str, nn.Module] = {"ours(auto)": auto}
    for impl in ("reference", "fused"):
        models[f"ours({impl})"] = copy.deepcopy(auto)
        route(models[f"ours({impl})"], rnn_impl=impl)
    if backend:
        models["ours(compiled)"] = torch.compile(copy.deepcopy(auto), backend=backend)
    if timm.is_model(name):
        twin = timm.create_model(name)
        twin.load_state_dict(auto.state_dict())
        models["timm"] = twin.to(device)
        with full_float32():  # TF32 on one side only moves the logits by ~2e-4, over the tolerance
            check_twin(auto, models["timm"], name, resolution, device)
    return models


def measure(
    models: dict[str, nn.Module], name: str, setting: Setting, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Round-robin images/s of the models in one setting (`sequencer.bench`), then each one's peak memory."""
    amp_dtype = "float16" if device.type == "cuda" else "bfloat16"
    if device.type != "cuda":
        setting = Setting(setting.mode, "float32", setting.resolution, setting.batch_size)  # see training_dtypes
    steps = {label: make_step(model, setting, device, amp_dtype) for label, model in models.items()}
    times = time_round_robin(steps, device, warmup=1, repeats=repeats)
    records = []
    for label, step in steps.items():
        median = statistics.median(times[label])
        records.append(
            dict(
                model=name, implementation=label, mode=setting.mode, precision=setting.precision, amp_dtype=amp_dtype,
                resolution=setting.resolution, batch_size=setting.batch_size,
                images_per_s=setting.batch_size / median, step_ms=1000 * median,
                peak_memory_mib=cuda_peak_mib(step, device) if device.type == "cuda" else None,
            )
        )  # fmt: skip
        speed = records[-1]["images_per_s"]
        print(f"{name:<30} {label:<16} {setting.mode:<5} batch {setting.batch_size:<4} {speed:9.1f} img/s")
    return records


# ----------------------------------------------------------------------------------------------------------------
# 4. The block-diagonal candidate: both axes' BiLSTMs as one LSTM on a square map
# ----------------------------------------------------------------------------------------------------------------


def block_diagonal_weights(rnn_v: nn.LSTM, rnn_h: nn.LSTM) -> list[torch.Tensor]:
    """The weights of one bidirectional LSTM (2C inputs, hidden 2D) that is `rnn_v` on the first C inputs and D
    hidden units and `rnn_h` on the others: per gate, block-diagonal input and recurrent matrices, stacked biases.

    Built from the two nets' parameters with differentiable ops, so gradients reach them.
    """
    v, h = recurrent_weights([rnn_v]), recurrent_weights([rnn_h])  # per direction [W_ih, W_hh, b_ih, b_hh]
    combined = []
    for v_tensor, h_tensor in zip(v, h, strict=True):
        gates_v, gates_h = v_tensor.chunk(4), h_tensor.chunk(4)  # LSTM gates i, f, g, o, each (D, ...) or (D,)
        if v_tensor.dim() == 2:
            combined.append(torch.cat([torch.block_diag(a, b) for a, b in zip(gates_v, gates_h, strict=True)]))
        else:
            combined.append(torch.cat([torch.cat([a, b]) for a, b in zip(gates_v, gates_h, strict=True)]))
    return combined


def block_diagonal_lstm(weights: list[torch.Tensor], train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bidirectional LSTM of `block_diagonal_weights` as a function of (N, L, 2C) sequences -> (N, L, 4D)."""

    def lstm(sequences: torch.Tensor) -> torch.Tensor:
        state = sequences.new_zeros(2, sequences.shape[0], weights[1].shape[1])
        return torch._VF.lstm(sequences, (state, state), weights, True, 1, 0.0, train, True, True)[0]

    return lstm


def block_diagonal_module(mixer: BiLSTM2D) -> nn.LSTM:
    """An nn.LSTM (flat cuDNN weights, as the reference's modules have) holding `block_diagonal_weights(mixer)`."""
    dim, hidden = mixer.rnn_v.input_size, mixer.rnn_v.hidden_size
    module = nn.LSTM(2 * dim, 2 * hidden, batch_first=True, bidirectional=True).to(mixer.rnn_v.weight_ih_l0.device)
    with torch.no_grad():
        for parameter, value in zip(
            module._flat_weights, block_diagonal_weights(mixer.rnn_v, mixer.rnn_h), strict=True
        ):
            parameter.copy_(value)
    return module


def block_diagonal_rnn2d(x: torch.Tensor, lstm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x (B, L, L, C) -> (B, L, L, 4D) in `library_rnn2d`'s channel order with one LSTM call, `lstm` being the
    block-diagonal net: column i and row i of every image run side by side as one sequence of 2C channels."""
    B, L, _, C = x.shape
    # column i as a sequence down the rows beside row i as a sequence along the columns: (B*L, L, 2C)
    paired = torch.cat([x.transpose(1, 2).reshape(B * L, L, C), x.reshape(B * L, L, C)], dim=-1)
    out = lstm(paired)  # (B*L, L, 4D): [forward v, forward h, backward v, backward h]
    fwd_v, fwd_h, bwd_v, bwd_h = out.chunk(4, dim=-1)
    # vertical (B*L, L, 2D) -> (B, W, H, 2D) -> (B, H, W, 2D); horizontal (B*L, L, 2D) -> (B, H, W, 2D)
    vertical = torch.cat([fwd_v, bwd_v], dim=-1).reshape(B, L, L, -1).transpose(1, 2)
    horizontal = torch.cat([fwd_h, bwd_h], dim=-1).reshape(B, L, L, -1)
    return torch.cat([vertical, horizontal], dim=-1)


def time_block_diagonal(shape: tuple[int, int, int, int], device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Forward and forward+backward of the reference's two nn.LSTM calls against one block-diagonal nn.LSTM call.

    Both sides are modules whose weights were laid out once (a shipped version would keep the block matrices), so
    each step is two or one cuDNN RNN calls; float32 (TF32 as configured) and float16 autocast on CUDA.
    """
    batch, side, dim, hidden = shape
    torch.manual_seed(0)
    mixer = BiLSTM2D(dim, hidden).to(device)
    mixer.fc = nn.Identity()  # the paper's forward up to the concatenated axes, as the candidate returns them
    candidate = block_diagonal_module(mixer)
    x = torch.randn(batch, side, side, dim, device=device, requires_grad=True)
    runs = {
        "two calls (reference)": lambda: mixer(x),
        "one block-diagonal call": lambda: block_diagonal_rnn2d(x, lambda z: candidate(z)[0]),
    }
    records = []
    for dtype in ("float32", "float16") if device.type == "cuda" else ("float32",):
        for backward in (False, True):
            for module in (mixer, candidate):
                module.train(backward)  # cuDNN's backward needs a training-mode forward

            def step_of(run: Callable[[], torch.Tensor], backward: bool = backward, dtype: str = dtype) -> Callable:
                def step() -> None:
                    with (
                        torch.set_grad_enabled(backward),
                        torch.autocast(device.type, DTYPES[dtype], dtype != "float32"),
                    ):
                        out = run()
                    if backward:
                        out.float().sum().backward()

                return step

            times = time_round_robin({label: step_of(run) for label, run in runs.items()}, device, 2, repeats)
            medians = {label: statistics.median(t) for label, t in times.items()}
            for label, median in medians.items():
                records.append(
                    dict(
                        batch=batch, side=side, channels=dim, hidden=hidden, dtype=dtype, implementation=label,
                        passes="forward+backward" if backward else "forward", step_ms=1000 * median,
                        speedup=medians["two calls (reference)"] / median,
                    )
                )  # fmt: skip
                print(f"candidate {shape} {dtype:<8} {records[-1]['passes']:<17} {label:<24} {1000 * median:8.3f} ms")
    return records


# ----------------------------------------------------------------------------------------------------------------
# 5. Profile of one training step
# ----------------------------------------------------------------------------------------------------------------


def profile_training_step(config: dict[str, Any], device: torch.device, top: int = 15) -> dict[str, Any]:
    """One AMP training step of ours (auto) under torch.profiler: top kernels by device time, host and device time."""
    from torch.profiler import ProfilerActivity, profile

    name = config["models"][0]
    model = build_subject_model(Subject(name, "ours", "auto"), config["resolution"]).to(device)
    setting = Setting(
        "train", "amp" if device.type == "cuda" else "float32", config["resolution"], config["train_batch"]
    )
    step = make_step(model, setting, device, "float16")
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()

    def device_us(event: Any) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    kernels = sorted((e for e in events if device_us(e) > 0), key=device_us, reverse=True)
    host_us = sum(e.self_cpu_time_total for e in events)
    return dict(
        model=name, batch_size=setting.batch_size, precision=setting.precision,
        host_ms=host_us / 1000, device_ms=sum(device_us(e) for e in kernels) / 1000,
        top_kernels=[dict(name=e.key, calls=e.count, device_ms=device_us(e) / 1000) for e in kernels[:top]],
        top_host_ops=[
            dict(name=e.key, calls=e.count, host_ms=e.self_cpu_time_total / 1000)
            for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        ],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Environment and figure
# ----------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Where the figures come from."""
    return dict(
        command=" ".join(sys.argv),
        device=str(device),
        device_name=processor_name(device),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        timm=timm.__version__,
        python=platform.python_version(),
    )


def plot(report: dict[str, Any], path: Path) -> None:
    """Training and inference images/s per model and implementation, training peak memory, memory against resolution."""
    figure, axes = new_figure(2, 2, size=(13, 9))
    panels = [
        (axes[0][0], "train", "images_per_s", "training step, images / s"),
        (axes[0][1], "infer", "images_per_s", "inference, images / s"),
        (axes[1][0], "train", "peak_memory_mib", "training step, peak GPU memory (MiB)"),
    ]
    for ax, mode, key, title in panels:
        rows = [r for r in report.get("throughput", []) if r["mode"] == mode]
        labels = [f"{r['model']}\n{r['implementation']}" for r in rows]
        values = [r[key] or 0 for r in rows]
        ax.barh(range(len(rows)), values, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        batch = rows[0]["batch_size"] if rows else ""
        ax.set(title=f"{title}, batch {batch}, {rows[0]['precision'] if rows else ''}")
        ax.grid(alpha=0.3, axis="x")
    ax = axes[1][1]
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in report.get("memory_vs_resolution", []):
        lines.setdefault(f"{r['model']} {r['implementation']}", []).append(r)
    for index, (label, points) in enumerate(lines.items()):
        key = "peak_memory_mib" if all(p["peak_memory_mib"] for p in points) else "images_per_s"
        ax.plot([p["resolution"] for p in points], [p[key] for p in points], marker="os^vD"[index % 5], label=label)
    memory = any(r["peak_memory_mib"] for r in report.get("memory_vs_resolution", []))
    ax.set(
        title=f"inference, batch 1: {'peak memory (MiB)' if memory else 'img/s'} against resolution",
        xlabel="input resolution (px)",
        yscale="log" if lines else "linear",
    )
    if lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    name = report["environment"]["device_name"]
    figure.suptitle(f"gpu_check ({report['mode']}) on {name} ({'passed' if report['ok'] else 'FAILED'})")
    save_figure(figure, path)


if __name__ == "__main__":
    sys.exit(main())
