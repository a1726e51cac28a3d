"""What onnxscript's whole optimizer buys a Sequencer's ONNX file: export time, size, speed and logits, side by side.

Exports one model (random weights, a random head so that the logits are not all zero) with a dynamic batch twice:
with torch's default, onnxscript's whole optimizer (folding plus its rewrite rules), as `sequencer export` does, and
with constant folding only, which halves the export. Then runs both files in onnxruntime in alternating rounds and
compares their logits with PyTorch's. The record of why the export keeps the whole optimizer: BENCHMARKS.md.

    PYTHONPATH=src .venv/bin/python benchmarks/onnx_export_time.py --model sequencer2d_s --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxscript.optimizer import fold_constants_ir, remove_unused_nodes

import sequencer
from sequencer.bench import processor_name, time_round_robin
from sequencer.model import route


def export(model: torch.nn.Module, path: Path, whole_optimizer: bool) -> float:
    """Export `model` to `path` with a dynamic batch; the seconds it took."""
    start = time.perf_counter()
    program = torch.onnx.export(
        model,
        (torch.randn(2, *model.pretrained_cfg["input_size"]),),
        dynamo=True,
        verbose=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        optimize=whole_optimizer,
    )
    if not whole_optimizer:
        fold_constants_ir(program.model)
        remove_unused_nodes(program.model)
    program.save(path, external_data=False)
    return time.perf_counter() - start


def run() -> None:
    """Print each export's time, size, median batch time and largest logit difference from PyTorch."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sequencer2d_s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sequencer.create_model(args.model).eval()
    route(model, rnn_impl="reference")  # what `sequencer export` traces
    torch.nn.init.normal_(model.head.fc.weight, std=0.02)
    images = torch.randn(args.batch_size, *model.pretrained_cfg["input_size"])
    with torch.inference_mode():
        reference = model(images).numpy()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    runs: dict[str, Callable[[], np.ndarray]] = {}
    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    print(f"{args.model}, {processor_name(torch.device('cpu'))}, {versions}")
    with tempfile.TemporaryDirectory() as folder:
        for label, whole in (("folding only", False), ("whole optimizer (sequencer export)", True)):
            path = Path(folder) / f"{whole}.onnx"
            seconds = export(model, path, whole)
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            runs[label] = lambda session=session: session.run(None, {"input": images.numpy()})[0]
            difference = np.abs(runs[label]() - reference).max()
            size = path.stat().st_size / 1e6
            print(f"{label}: export {seconds:.1f} s, {size:.1f} MB, max |logit diff| vs torch {difference:.2e}")
        times = time_round_robin(runs, torch.device("cpu"), warmup=1, repeats=args.repeats)
    medians = {label: statistics.median(seconds) for label, seconds in times.items()}
    folding, whole = medians.values()
    for label, median in medians.items():
        print(f"{label}: batch {args.batch_size} median {1000 * median:.0f} ms over {args.repeats} rounds")
    print(f"folding only / whole optimizer, batch time: {folding / whole:.3f}")


if __name__ == "__main__":
    run()
