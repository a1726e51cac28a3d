"""Train or fine-tune a Sequencer with timm's train.py flags and the paper's recipes, alone or under torchrun.

With no DATA it trains sequencer2d_tiny on scikit-learn's handwritten digits (built in, no download) and prints the
held-out top-1. Everything lands in --output: args.yaml, summary.csv, last.pth.tar (every epoch), model_best.pth.tar,
the --checkpoint-hist best checkpoint-EPOCH.pth.tar and training_curves.png; `--resume OUTPUT/last.pth.tar`
continues exactly where it stopped.
"""

from __future__ import annotations

from sequencer.train_config import add_arguments

__all__ = ["add_arguments"]
