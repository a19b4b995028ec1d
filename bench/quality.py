"""Quality suite: does MPT transfer on real offline tasks? Every method, target, k and seed, resumable.

    python bench/quality.py bench/suites/small.toml [--work bench/results/work/quality]

Stages 1-2 (teachers, distilled source) run once per suite and are cached. Then every (target, k, seed,
method) run trains with the same step budget and is scored on a fixed test subset; each finished run is a
line in `<work>/<suite>/runs.jsonl` and is never recomputed. Writes `bench/results/quality-<suite>.json` and a
markdown table (mean ± std over seeds) to stdout. Methods: baseline (zero-shot for causal backbones, head-only
for encoders), pt, spot (PT from the source prompt that scores best on the target's dev split untrained),
mpt-full, mpt-factors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path

import torch

from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.batching import encode_tasks
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.evaluate import evaluate, evaluate_trained, evaluate_zero_shot
from mpt_edge.prompt import PromptConfig
from mpt_edge.tasks import first_n
from mpt_edge.train import TrainConfig, fit
from mpt_edge.trained import fixed_prompts, load_trained

HERE = Path(__file__).parent
METHODS = ("baseline", "pt", "spot", "mpt-full", "mpt-factors")


def source_stage(suite: dict, backbone, work: Path) -> tuple:
    """Teachers and the distilled source checkpoint, trained once per suite (resumed when interrupted)."""
    data = default_data_dir()
    train = load_split(suite["sources"], data, "train", k_per_class=suite["source_k"], seed=0)
    encoded = encode_tasks(train, backbone.tokenizer, suite["max_length"])
    teacher_cfg = TrainConfig(steps=suite["teacher_steps"], max_length=suite["max_length"], checkpoint_every=20)
    fit(stages.prompt_tuning("teachers", backbone, encoded, teacher_cfg, PromptConfig(length=suite["prompt_length"])),
        encoded, teacher_cfg, work / "teachers", resume=True)
    teachers = load_trained(work / "teachers")
    source_cfg = TrainConfig(steps=suite["source_steps"], max_length=suite["max_length"], checkpoint_every=20)
    fit(stages.source(backbone, encoded, teachers, source_cfg), encoded, source_cfg, work / "source", resume=True)
    return teachers, load_trained(work / "source")


def best_source_prompt(backbone, teachers, target: str, max_length: int) -> str:
    """SPoT's pick: the source task whose teacher prompt scores best on the target's dev split, untrained
    (causal backbones score any prompt with the target's verbalizers; encoders have no head yet: first source)."""
    if backbone.family != "causal":
        return teachers.task_names[0]
    dev = load_split([target], default_data_dir(), "dev", limit=100, seed=0)
    classifier = stages.classifier_for(backbone, [dev[0].spec], None)
    encoded = encode_tasks(dev, backbone.tokenizer, max_length)
    prompts = fixed_prompts(teachers)
    scores = {name: evaluate(classifier, lambda ids, k=k: prompts[k].expand(len(ids), -1, -1), encoded)[target]["accuracy"]
              for k, name in enumerate(teachers.task_names)}
    return max(scores, key=scores.get)


def one_run(suite: dict, backbone, teachers, source, target: str, k, seed: int, method: str, work: Path) -> dict:
    """Train one method on one target/k/seed and score it on the fixed test subset."""
    data = default_data_dir()
    if k == "full":
        train = [first_n(t, suite["full_cap"], seed) for t in load_split([target], data, "train", seed=seed)]
    else:
        train = load_split([target], data, "train", k_per_class=int(k), seed=seed)
    test = load_split([target], data, "test", limit=suite["test_limit"], seed=0)
    config = TrainConfig(steps=suite["steps"], max_length=suite["max_length"], seed=seed, checkpoint_every=10**6)
    encoded = encode_tasks(train, backbone.tokenizer, config.max_length)
    out = work / "runs" / f"{target}-k{k}-s{seed}-{method}"
    extra = {}
    if method == "baseline" and backbone.family == "causal":
        return {"scores": evaluate_zero_shot(backbone, test, max_length=config.max_length)[target], "extra": extra}
    if method == "baseline":
        plan = stages.head_only(backbone, encoded, config)
    elif method == "pt":
        plan = stages.prompt_tuning("pt", backbone, encoded, config, PromptConfig(length=suite["prompt_length"]))
    elif method == "spot":
        pick = best_source_prompt(backbone, teachers, target, config.max_length)
        initial = fixed_prompts(teachers)[teachers.index_of(pick)]
        plan = stages.prompt_tuning("spot", backbone, encoded, config, PromptConfig(length=initial.shape[0]),
                                    initial=initial[None])
        extra["spot_source"] = pick
    else:
        plan = stages.target(backbone, encoded, source, config, mode=method.removeprefix("mpt-"))
    fit(plan, encoded, config, out, resume=True, progress=False)
    return {"scores": evaluate_trained(backbone, load_trained(out), test, max_length=config.max_length)[target],
            "extra": extra}


def table(suite: dict, runs: list[dict]) -> str:
    """Markdown: one row per (target, k), one column per method, accuracy mean ± std over seeds."""
    lines = [f"| target | k | {' | '.join(suite['methods'])} |", "|" + " --- |" * (2 + len(suite["methods"]))]
    for target in suite["targets"]:
        for k in suite["k"]:
            cells = []
            for method in suite["methods"]:
                accs = [100 * r["scores"]["accuracy"] for r in runs
                        if (r["target"], str(r["k"]), r["method"]) == (target, str(k), method)]
                cells.append(f"{statistics.mean(accs):.1f} ± {statistics.pstdev(accs):.1f} (n={len(accs)})" if accs else "–")
            lines.append(f"| {target} | {k} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", type=Path)
    parser.add_argument("--work", type=Path, default=HERE / "results" / "work" / "quality")
    args = parser.parse_args()
    suite = tomllib.loads(args.suite.read_text())
    unknown = [m for m in suite["methods"] if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: {args.suite}: unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
    work = args.work / suite["name"]
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone = load_backbone(suite["backbone"])
    started = time.perf_counter()
    teachers, source = source_stage(suite, backbone, work)
    log = work / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["target"], str(r["k"]), r["seed"], r["method"]) for r in runs}
    for target in suite["targets"]:
        for k in suite["k"]:
            for seed in suite["seeds"]:
                for method in suite["methods"]:
                    if (target, str(k), seed, method) in done:
                        continue
                    tick = time.perf_counter()
                    result = one_run(suite, backbone, teachers, source, target, k, seed, method, work)
                    row = {"target": target, "k": k, "seed": seed, "method": method, **result,
                           "seconds": round(time.perf_counter() - tick, 1)}
                    with log.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    runs.append(row)
                    print(f"{target} k={k} seed={seed} {method}: {100 * result['scores']['accuracy']:.1f}", flush=True)
    markdown = table(suite, runs)
    report = {"suite": suite, "runs": runs, "table": markdown, "seconds_this_call": round(time.perf_counter() - started)}
    write_text_atomic(HERE / "results" / f"quality-{suite['name']}.json", json.dumps(report, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
