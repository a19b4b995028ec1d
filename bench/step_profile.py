"""Where a training step's time goes: data, prompt composition, backbone forward + scoring, loss, backward,
optimizer (not run by CI).

    python bench/step_profile.py [--backbones smollm2-135m,minilm-l6] [--steps 10] [--prompt-length 100]

Times each phase of a vanilla-PT (teacher) step and an MPT target step on real data, after 2 warm-up steps;
for causal backbones also the PT step with the prompt prepended to every row (`pt-plain-prefix`, the forward
before training shared each prompt's positions across its rows), side by side in one run. Writes bench/results/step_profile.json. Phases are timed with perf_counter around each call (torch on
CPU runs synchronously), so the shares add up to the step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.batching import collate, encode_tasks
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.losses import Totals, batch_task_loss
from mpt_edge.prompt import PromptConfig
from mpt_edge.scoring import Classifier
from mpt_edge.source_build import machine
from mpt_edge.training_loop import TrainConfig
from mpt_edge.trained import Trained

PHASES = ("data", "compose", "forward", "loss", "backward", "optimizer")


def profile(plan, encoded, config: TrainConfig, classifier, steps: int) -> dict[str, float]:
    """Median seconds per phase over `steps` steps (after 2 warm-up steps)."""
    optimizer = torch.optim.Adafactor(plan.param_groups(config))
    times = {p: [] for p in PHASES}
    for step in range(steps + 2):
        marks = [time.perf_counter()]
        batch = collate(encoded, plan.sampler.batch(step))
        marks.append(time.perf_counter())
        prompts = plan.prompt.compose(batch.task_ids)
        marks.append(time.perf_counter())
        logits, _ = classifier(prompts, batch)
        marks.append(time.perf_counter())
        loss = batch_task_loss(logits, batch, None, Totals.of(batch))
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if step >= 2:
            for phase, a, b in zip(PHASES, marks, marks[1:]):
                times[phase].append(b - a)
    return {p: statistics.median(v) for p, v in times.items()}


def measure(name: str, steps: int, prompt_length: int, max_length: int, batch_size: int) -> dict:
    backbone = load_backbone(name)
    config = TrainConfig(steps=steps, batch_size=batch_size, max_length=max_length)
    encoded = encode_tasks(load_split(["tweet_sentiment"], default_data_dir(), "train", k_per_class=64),
                           backbone.tokenizer, max_length)
    plan = stages.prompt_tuning("pt", backbone, encoded, config, PromptConfig(length=prompt_length))
    classifier = stages.classifier_for(backbone, [encoded[0].spec], plan.heads)
    results = {"pt": profile(plan, encoded, config, classifier, steps)}
    if backbone.family.training_options:   # the same step with the family's plain adapter (causal: no shared prefix)
        plain = Classifier(backbone.model, backbone.family.adapter(), classifier.scorer, classifier.sequences)
        results["pt-plain-prefix"] = profile(plan, encoded, config, plain, steps)
    source = Trained({**plan.meta, "stage": "source"}, [encoded[0].spec], plan.prompt, plan.heads)
    target = stages.target(backbone, encoded, source, config, mode="full")
    results["mpt-full"] = profile(target, encoded, config, stages.classifier_for(backbone, [encoded[0].spec],
                                                                                  target.heads), steps)
    return {stage: {"seconds": {p: round(s, 4) for p, s in r.items()}, "step": round(sum(r.values()), 4),
                    "share": {p: round(s / sum(r.values()), 3) for p, s in r.items()}} for stage, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="smollm2-135m,minilm-l6")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    report = {"machine": machine(), "batch_size": args.batch_size, "prompt_length": args.prompt_length,
              "max_length": args.max_length, "backbones": {}}
    for name in args.backbones.split(","):
        report["backbones"][name] = result = measure(name, args.steps, args.prompt_length, args.max_length,
                                                     args.batch_size)
        print(f"\n{name} (batch {args.batch_size}, l={args.prompt_length}, ≤{args.max_length} tokens), "
              f"median seconds per phase")
        print(f"{'stage':<16} " + " ".join(f"{p:>10}" for p in PHASES) + f" {'step':>8}")
        for stage, r in result.items():
            print(f"{stage:<16} " + " ".join(f"{r['seconds'][p]:>10.4f}" for p in PHASES) + f" {r['step']:>8.3f}")
    out = Path(__file__).parent / "results" / "step_profile.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
