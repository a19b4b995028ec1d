"""How far the first target steps move the transferred prompt, per learning-rate setting (not run by CI).

    python bench/target_steps.py SOURCE_CHECKPOINT --target rotten_tomatoes [--steps 8]

For each setting (lr_prompt, lr_factors, warmup) and MPT mode, trains `--steps` steps from the source on the
target's k-shot train split and prints the relative change of the composed prompt ‖P_t − P_0‖ / ‖P_0‖ after
each step, and of P* and U V separately. torch's Adafactor scales a step by the parameter's RMS and caps the
relative step at `lr`, and its first updates are near ±1 per element, so the first steps move each factor by
about lr of its size. Writes bench/results/target_steps.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.batching import collate, encode_tasks
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.losses import Totals
from mpt_edge.shipped import resolve_source
from mpt_edge.training_loop import TrainConfig

SETTINGS = {"lr_factors 0.4 (paper)": (0.03, 0.4, 0), "lr_factors 0.015": (0.03, 0.015, 0),
            "lr_factors 0.015 + warmup 6": (0.03, 0.015, 6), "lr_factors 0.4 + warmup 6": (0.03, 0.4, 6)}


def moves(backbone, encoded, source, mode: str, config: TrainConfig) -> list[dict]:
    plan = stages.target(backbone, encoded, source, config, mode=mode)
    optimizer = torch.optim.Adafactor(plan.param_groups(config))
    base = [g["lr"] for g in optimizer.param_groups]
    start = plan.prompt.fold().detach().clone()
    shared0 = plan.prompt.shared[0].detach().clone()
    factors0 = (plan.prompt.u[0] @ plan.prompt.v[0]).detach().clone()
    out = []
    for step in range(config.steps):
        batch = collate(encoded, plan.sampler.batch(step))
        loss, _ = plan.loss_fn(batch, Totals.of(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * config.warmup_factor(step)
        optimizer.step()
        with torch.no_grad():
            rel = lambda now, then: float((now - then).norm() / then.norm())
            out.append({"step": step + 1, "loss": round(loss.item(), 4),
                        "prompt": round(rel(plan.prompt.fold(), start), 4),
                        "shared": round(rel(plan.prompt.shared[0], shared0), 4),
                        "factors": round(rel(plan.prompt.u[0] @ plan.prompt.v[0], factors0), 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="shipped source name, shipped-format folder or `train source` checkpoint")
    parser.add_argument("--target", default="rotten_tomatoes")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    backbone = load_backbone(args.backbone)
    source = resolve_source(args.source)
    encoded = encode_tasks(load_split([args.target], default_data_dir(), "train", k_per_class=args.k, seed=0),
                           backbone.tokenizer, 64)
    report = {}
    for name, (lr_prompt, lr_factors, warmup) in SETTINGS.items():
        for mode in ("full", "factors"):
            config = TrainConfig(steps=args.steps, max_length=64, lr_prompt=lr_prompt, lr_factors=lr_factors,
                                 warmup=warmup)
            report[f"{name}, {mode}"] = rows = moves(backbone, encoded, source, mode, config)
            print(f"{name + ', ' + mode:<36} relative change of P after steps 1..{args.steps}: "
                  + " ".join(f"{r['prompt']:.3f}" for r in rows), flush=True)
    path = Path(__file__).parent / "results" / "target_steps.json"
    write_text_atomic(path, json.dumps({"source": str(args.source), "target": args.target, "k": args.k,
                                        "settings": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
