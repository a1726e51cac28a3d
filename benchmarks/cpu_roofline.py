"""How close CPU inference of a variant comes to the processor's float32 matmul peak, beside timm's port.

    .venv/bin/python benchmarks/cpu_roofline.py --threads 2 --batch-sizes 1,8 [--onnx s.onnx]

Counts the model's MACs (convolutions, linears and LSTMs: `sequencer.analysis.complexity.count_macs`), measures the
float32 matmul peak of this CPU with the same threads (a 2048x2048 product in PyTorch and in onnxruntime, the best
of both), then times timm's port (PyTorch) and our ONNX export in onnxruntime in round-robin rounds. For each batch
size it prints img/s, the arithmetic rate that means, its share of the peak, the ratio to timm's port, and the
ceiling: the img/s at which the whole network would run at the matmul peak, and that ceiling's ratio to timm.
A ratio to timm above the ceiling's cannot be reached in float32 on this processor.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import onnxruntime
import timm
import torch
from onnx import TensorProto, helper, save

import sequencer
from sequencer.analysis.complexity import count_macs
from sequencer.bench import processor_name, time_round_robin
from sequencer.deploy import load_onnx
from sequencer.runtime import cpu_flags

GEMM_SIZE = 2048
# The vector extensions that decide float32 and bfloat16 speed.
FEATURES = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def seconds_per_call(function: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls after one warm-up call."""
    return min(time_round_robin({"call": function}, torch.device("cpu"), warmup=1, repeats=repeats)["call"])


def matmul_peak(threads: int, folder: Path) -> dict[str, float]:
    """GFLOP/s of a float32 GEMM_SIZE-square product in PyTorch and in onnxruntime (MLAS)."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    flops = 2 * GEMM_SIZE**3
    rates = {"torch": flops / seconds_per_call(lambda: a @ b, 10) / 1e9}
    shape = [GEMM_SIZE, GEMM_SIZE]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)],
    )
    path = folder / "gemm.onnx"
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy(), "b": b.numpy()}
    rates["onnxruntime"] = flops / seconds_per_call(lambda: session.run(None, feed), 10) / 1e9
    return rates


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sequencer2d_s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--onnx", type=Path, help="our export of --model (--dynamic-batch); default: export it now")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = sequencer.create_model(args.model).eval()
    size = ours.pretrained_cfg["input_size"]
    gflop = 2 * count_macs(ours, tuple(size)) / 1e9
    theirs = timm.create_model(args.model, pretrained=False).eval()
    with tempfile.TemporaryDirectory() as folder:
        peak = matmul_peak(args.threads, Path(folder))
        path = args.onnx
        if path is None:
            path = Path(folder) / "model.onnx"
            sequencer.export(ours, path, dynamic_batch=True)
        exported = load_onnx(path, threads=args.threads)
        print(
            f"{processor_name(torch.device('cpu'))} ({', '.join(sorted((cpu_flags() or set()) & FEATURES))}), "
            f"{args.threads} threads, "
            f"torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, timm {timm.__version__}"
        )
        print(f"{args.model} at {size[1]} px: {gflop:.2f} GFLOP per image (MACs x 2, LSTMs counted)")
        print(
            f"float32 matmul peak ({GEMM_SIZE}^2): torch {peak['torch']:.0f} GFLOP/s, "
            f"onnxruntime {peak['onnxruntime']:.0f} GFLOP/s"
        )
        best = max(peak.values())
        print("| batch | engine | img/s | GFLOP/s | of peak | vs timm |")
        print("|---|---|---|---|---|---|")
        for batch in map(int, args.batch_sizes.split(",")):
            x = torch.randn(batch, *size)
            engines = {"timm's port (PyTorch)": partial(theirs, x), "ours, onnxruntime": partial(exported, x)}
            with torch.inference_mode():
                times = time_round_robin(engines, torch.device("cpu"), warmup=2, repeats=args.rounds)
            timm_rate = batch / statistics.median(times["timm's port (PyTorch)"])
            for name, samples in times.items():
                rate = batch / statistics.median(samples)
                print(
                    f"| {batch} | {name} | {rate:.2f} | {rate * gflop:.0f} | {rate * gflop / best:.0%} | "
                    f"{rate / timm_rate:.2f}x |"
                )
            ceiling = best / gflop
            print(
                f"| {batch} | ceiling: every FLOP at the peak | {ceiling:.2f} | {best:.0f} | 100% | "
                f"{ceiling / timm_rate:.2f}x |"
            )


if __name__ == "__main__":
    main()
