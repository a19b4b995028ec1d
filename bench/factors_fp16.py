"""Does storing a task's U, V in fp16 (`mpt-edge export --factors-dtype fp16`) change its predictions?

    python bench/factors_fp16.py builds/quality/transfer-factor-rank4/runs/reuters_r8-k64-s0-mpt-factors-lr0 \
        --task reuters_r8

Scores the checkpoint's test subset (the quality suites' fixed 300 examples) with its U, V as trained (fp32) and
rounded to fp16, as the bundle would store them; prints both accuracies and how many predictions differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mpt_edge.backbones import load_backbone
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.evaluate import predict, trained_scoring
from mpt_edge.trained import load_trained


def predictions(backbone, trained, test) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, gold) label indices of the checkpoint on its task's `test` split, with its factors as they are now."""
    classifier, prompts_for, encoded = trained_scoring(backbone, trained, test, max_length=trained.meta.max_length)
    return predict(classifier, prompts_for, encoded, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="single-task factors checkpoints")
    parser.add_argument("--task", required=True, help="the checkpoints' task (its test split is scored)")
    parser.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()
    test = load_split([args.task], default_data_dir(), "test", limit=args.limit, seed=0)
    backbone = None
    for folder in args.checkpoints:
        trained = load_trained(folder)
        backbone = backbone or load_backbone(trained.meta.backbone.name)
        full, gold = predictions(backbone, trained, test)
        with torch.no_grad():
            for factor in [*trained.prompt.u, *trained.prompt.v]:
                factor.copy_(factor.half().float())
        half, _ = predictions(backbone, trained, test)
        print(f"{folder.name}: test accuracy fp32 {100 * np.mean(full == gold):.2f}, fp16 factors "
              f"{100 * np.mean(half == gold):.2f}; {int(np.sum(full != half))} of {len(gold)} predictions differ")


if __name__ == "__main__":
    main()
