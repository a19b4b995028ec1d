"""Training speed of every stage on the named backbones, on real data (not run by CI).

    python bench/stage_speed.py [--backbones smollm2-135m,minilm-l6] [--steps 12] [--prompt-length 20]

Prints steps/s and seconds/step per stage and writes bench/results/stage_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.batching import encode_tasks
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.prompt import PromptConfig
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained


def timed_fit(plan, encoded, config, out: Path) -> float:
    """Seconds per step over the whole run (one checkpoint at the end; includes the first, slower step)."""
    index = fit(plan, encoded, config, out, progress=False)
    return 1.0 / index["history"][-1]["steps_per_s"]


def measure(name: str, steps: int, prompt_length: int, max_length: int, batch: int) -> dict:
    backbone = load_backbone(name)
    data = default_data_dir()
    config = TrainConfig(steps=steps, batch_size=batch, max_length=max_length, checkpoint_every=10**6)
    sources = encode_tasks(load_split(["tweet_sentiment", "reuters_r8"], data, "train", k_per_class=64),
                           backbone.tokenizer, max_length)
    target = encode_tasks(load_split(["rotten_tomatoes"], data, "train", k_per_class=64), backbone.tokenizer, max_length)
    prompt = PromptConfig(length=prompt_length)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = TrainConfig(**{**config.__dict__, "steps": steps // 2})  # teachers: steps per task, 2 tasks
        results["teachers"] = timed_fit(stages.prompt_tuning("teachers", backbone, sources, one, prompt), sources, one,
                                        tmp / "teachers")
        teachers = load_trained(tmp / "teachers")
        results["source"] = timed_fit(stages.source(backbone, sources, teachers, config), sources, config,
                                      tmp / "source")
        source = load_trained(tmp / "source")
        for mode in stages.TARGET_MODES:
            results[f"target-{mode}"] = timed_fit(stages.target(backbone, target, source, config, mode=mode), target,
                                                  config, tmp / f"target-{mode}")
        results["pt"] = timed_fit(stages.prompt_tuning("pt", backbone, target, config, prompt), target, config,
                                  tmp / "pt")
        if backbone.family.uses_heads:
            results["head"] = timed_fit(stages.head_only(backbone, target, config), target, config, tmp / "head")
    return {stage: {"s_per_step": round(s, 3), "steps_per_s": round(1 / s, 3)} for stage, s in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="smollm2-135m,minilm-l6")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "batch_size": args.batch_size, "prompt_length": args.prompt_length, "max_length": args.max_length,
              "backbones": {}}
    for name in args.backbones.split(","):
        report["backbones"][name] = measure(name, args.steps, args.prompt_length, args.max_length,
                                            args.batch_size)
        print(f"\n{name} (batch {args.batch_size}, l={args.prompt_length}, ≤{args.max_length} tokens)")
        print(f"{'stage':<16} {'steps/s':>8} {'s/step':>8}")
        for stage, r in report["backbones"][name].items():
            print(f"{stage:<16} {r['steps_per_s']:>8.3f} {r['s_per_step']:>8.3f}")
    out = Path(__file__).parent / "results" / "stage_speed.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
