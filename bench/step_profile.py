"""Where a training step's time goes: data, prompt composition, backbone forward + scoring, loss, backward,
optimizer (not run by CI).

    python bench/step_profile.py [--backbones smollm2-135m,minilm-l6] [--steps 10] [--prompt-length 100]

Times each phase of a vanilla-PT (teacher) step and an MPT target step on real data, after 2 warm-up steps;
for causal backbones also the PT step with the prompt prepended to every row (`pt-plain-prefix`, the forward
before training shared each prompt's positions across its rows), and both steps again under bf16 autocast
(`pt-bf16`, `mpt-full-bf16`: `--precision bf16`) with the cosine between the prompt gradients of both
precisions on the same batches, side by side in one run. Writes
bench/results/step_profile.json. Phases are timed with perf_counter around each call (torch on CPU runs
synchronously), so the shares add up to the step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
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
from mpt_edge.precision import forward_precision, resolve_precision
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
        with forward_precision(config.precision):
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


def gradient_cosines(plan, encoded, classifier, steps: int) -> list[float]:
    """Per batch: cosine between the prompt's gradient from an fp32 forward and from a bf16-autocast one."""
    cosines = []
    for step in range(steps):
        batch = collate(encoded, plan.sampler.batch(step))
        grads = []
        for precision in ("fp32", "bf16"):
            with forward_precision(precision):
                logits, _ = classifier(plan.prompt.compose(batch.task_ids), batch)
            loss = batch_task_loss(logits, batch, None, Totals.of(batch))
            grads.append(torch.autograd.grad(loss, plan.prompt.shared[0])[0].flatten())
        cosines.append(round(float(torch.nn.functional.cosine_similarity(*grads, dim=0)), 5))
    return cosines


def measure(name: str, steps: int, prompt_length: int, max_length: int, batch_size: int) -> tuple[dict, list[float]]:
    """Seconds per phase of every step kind, and the bf16-vs-fp32 prompt gradient cosines."""
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
    target_classifier = stages.classifier_for(backbone, [encoded[0].spec], target.heads)
    results["mpt-full"] = profile(target, encoded, config, target_classifier, steps)
    bf16 = replace(config, precision="bf16")   # the same steps under bf16 autocast (`--precision bf16`)
    results["pt-bf16"] = profile(plan, encoded, bf16, classifier, steps)
    results["mpt-full-bf16"] = profile(target, encoded, bf16, target_classifier, steps)
    phases = {stage: {"seconds": {p: round(s, 4) for p, s in r.items()}, "step": round(sum(r.values()), 4),
                      "share": {p: round(s / sum(r.values()), 3) for p, s in r.items()}} for stage, r in results.items()}
    return phases, gradient_cosines(plan, encoded, classifier, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="smollm2-135m,minilm-l6")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    report = {"machine": {**machine(), "native_bf16": resolve_precision("auto") == "bf16"},
              "batch_size": args.batch_size, "prompt_length": args.prompt_length, "max_length": args.max_length,
              "backbones": {}}
    for name in args.backbones.split(","):
        result, cosines = measure(name, args.steps, args.prompt_length, args.max_length, args.batch_size)
        report["backbones"][name] = {**result, "bf16_gradient_cosine": cosines}
        print(f"\n{name} (batch {args.batch_size}, l={args.prompt_length}, ≤{args.max_length} tokens), "
              f"median seconds per phase")
        print(f"{'stage':<16} " + " ".join(f"{p:>10}" for p in PHASES) + f" {'step':>8}")
        for stage, r in result.items():
            print(f"{stage:<16} " + " ".join(f"{r['seconds'][p]:>10.4f}" for p in PHASES) + f" {r['step']:>8.3f}")
        print(f"bf16 step: {result['pt']['step'] / result['pt-bf16']['step']:.2f}x fp32 (PT), "
              f"{result['mpt-full']['step'] / result['mpt-full-bf16']['step']:.2f}x (MPT full); prompt gradient "
              f"cosine bf16 vs fp32 per batch: min {min(cosines):.4f}, median {statistics.median(cosines):.4f}")
    out = Path(__file__).parent / "results" / "step_profile.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
