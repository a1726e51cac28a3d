"""What int8 costs in accuracy: the digits demo's held-out top-1 in PyTorch, float32 ONNX and int8 ONNX.

Trains the demo (`sequencer train`, its digits defaults, one thread) into --run unless that folder already holds a
model_best.pth.tar, exports the best checkpoint with `export --dynamic-batch` as is and with `--quantize int8`
(each checked against PyTorch by the export), and scores the 360 held-out digits with each, every runtime with the
preprocessing it has (the checkpoint's; the one stored in each file). Accuracies only: nothing here is timed.

    PYTHONPATH=src .venv/bin/python benchmarks/onnx_int8_digits.py --run output/onnx-int8-digits
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import sequencer
from sequencer.builder import load_model
from sequencer.checkpoint import open_checkpoint
from sequencer.data import DigitsDataset, create_transform
from sequencer.deploy import load_onnx


def held_out_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], transform: Callable, img_size: int
) -> torch.Tensor:
    """Logits of the held-out digits (the fixed split `sequencer train` scores), in dataset order."""
    dataset = DigitsDataset("val", transform=transform, img_size=img_size)
    batches = []
    with torch.inference_mode():
        for start in range(0, len(dataset), 64):
            images = [dataset[i][0] for i in range(start, min(start + 64, len(dataset)))]
            batches.append(forward(torch.stack(images)).float())
    return torch.cat(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("output/onnx-int8-digits"), help="training run folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    best = args.run / "model_best.pth.tar"
    if not best.is_file():
        subprocess.run([sys.executable, "-m", "sequencer", "train", "--output", str(args.run)], check=True)
    checkpoint = open_checkpoint(best)
    name, img_size = checkpoint.record.model_name, checkpoint.record.input_size[-1]
    files = {"float32": args.run / "digits.onnx", "int8": args.run / "digits-int8.onnx"}
    for precision, path in files.items():
        quantize = "int8" if precision == "int8" else None
        result = sequencer.export(name, path, checkpoint=best, dynamic_batch=True, img_size=img_size, quantize=quantize)
        print(result.summary())

    model = load_model(name, checkpoint)
    logits = {"PyTorch float32": held_out_logits(model, create_transform(model, img_size=img_size), img_size)}
    for precision, path in files.items():
        exported = load_onnx(path, threads=1)
        logits[f"ONNX Runtime {precision}"] = held_out_logits(exported, create_transform(exported.config), img_size)
    targets = torch.tensor(DigitsDataset("val", img_size=img_size).targets)
    reference = logits["PyTorch float32"]
    print(f"\n{name} on the {len(targets)} held-out digits ({best}, input {img_size} px)\n")
    print("| runtime | file size | held-out top-1 | top-1 agreement with PyTorch | max abs logit diff vs PyTorch |")
    print("|---|---|---|---|---|")
    sizes = {
        "PyTorch float32": "-",
        **{f"ONNX Runtime {p}": f"{f.stat().st_size / 1e6:.2f} MB" for p, f in files.items()},
    }
    for label, found in logits.items():
        top1 = (found.argmax(1) == targets).float().mean().item()
        agree = (found.argmax(1) == reference.argmax(1)).sum().item()
        diff = (found - reference).abs().max().item()
        print(f"| {label} | {sizes[label]} | {top1:.2%} | {agree}/{len(targets)} | {diff:.2e} |")


if __name__ == "__main__":
    main()
