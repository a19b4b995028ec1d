"""The quickstart: MPT on real data, small enough for 2 CPU cores.

With a shipped source prompt for the backbone (`mpt_edge/sources/<name>`), the target tweet_sentiment (held out
from that source) adapts from it directly: no teacher or source stage. Without one, sources rotten_tomatoes and
newsgroups20 → teachers (vanilla PT) → distilled shared prompt first (~10 minutes). The target trains on k
examples per class and is compared with zero-shot (encoders: a trained head alone) and vanilla PT (same prompt length) on the test split; then
the MPT checkpoint is exported to a bundle and the torch-free runtime classifies the same test texts.
Every stage resumes from its checkpoint, so running it again only redoes what is missing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mpt_edge_runtime as mer
from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import describe, fingerprint, load_backbone
from mpt_edge.batching import encode_tasks
from mpt_edge.bundle_source import bundle_source
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.errors import ConfigError
from mpt_edge.evaluate import evaluate_engine, evaluate_trained, evaluate_zero_shot
from mpt_edge.prompt import PromptConfig
from mpt_edge.shipped import resolve_source, shipped_names
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import ExportOptions, write_bundle


@dataclass(frozen=True)
class QuickstartConfig:
    out: Path = Path("runs/quickstart")
    backbone: str = "smollm2-135m"
    source: str | None = None     # shipped source name or folder; None: the backbone's shipped source, if any
    sources: tuple[str, ...] = ("rotten_tomatoes", "newsgroups20")   # trained only without a shipped source
    target: str = "tweet_sentiment"   # held out from the shipped sources
    steps: int = 20               # per stage and task (chosen on dev: bench/suites/quickstart-curve.toml)
    k_per_class: int = 64         # target training examples per class (few-shot, as in the paper's setting)
    source_k_per_class: int = 256
    test_limit: int = 300         # test examples scored per method
    prompt_length: int = 20
    rank: int = 1
    max_length: int = 64
    batch_size: int = 8
    seed: int = 0
    data: Path | None = None

    def __post_init__(self):
        if self.steps < 1 or self.test_limit < 1 or self.k_per_class < 1:
            raise ConfigError("quickstart steps, test_limit and k_per_class must be >= 1")


def run_quickstart(config: QuickstartConfig, *, fresh: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every stage (resuming what exists), evaluate, write `<out>/results.json`; returns the results."""
    out = Path(config.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    data = config.data or default_data_dir()
    train_cfg = TrainConfig(steps=config.steps, batch_size=config.batch_size, max_length=config.max_length,
                            seed=config.seed, checkpoint_every=10)
    started = time.perf_counter()
    log(f"loading backbone {config.backbone}")
    backbone = load_backbone(config.backbone)
    before = fingerprint(backbone.model)
    target_train = load_split([config.target], data, "train", k_per_class=config.k_per_class, seed=config.seed)
    target_test = load_split([config.target], data, "test", limit=config.test_limit, seed=config.seed)
    tgt_encoded = encode_tasks(target_train, backbone.tokenizer, config.max_length)
    prompt_cfg = PromptConfig(length=config.prompt_length, rank=config.rank)
    timings = {}

    @contextmanager
    def timed(name):
        tick = time.perf_counter()
        yield
        timings[name] = {"steps": 0, "seconds": round(time.perf_counter() - tick, 1)}

    def run(name, plan, encoded):
        log(f"[{name}] {plan.total_steps} steps")
        with timed(name):
            index = fit(plan, encoded, train_cfg, out / name, resume=True)
        timings[name].update(steps=index["step"], steps_per_s_last=round(index["history"][-1]["steps_per_s"], 3))
        return load_trained(out / name)

    source_name = config.source or (config.backbone if config.backbone in shipped_names() else None)
    if source_name is not None:
        source = resolve_source(source_name)
        source.check_backbone(backbone, source_name)
        prompt_cfg = PromptConfig(length=source.prompt.length, rank=source.prompt.rank)   # PT at the same l
        log(f"[source] shipped source {source_name!r} (l={source.prompt.length}, sources: "
            f"{', '.join(source.task_names)}): no teacher or source stage")
    else:
        log(f"[source] no shipped source for {config.backbone!r}: training teachers and a source first")
        sources = load_split(config.sources, data, "train", k_per_class=config.source_k_per_class, seed=config.seed)
        src_encoded = encode_tasks(sources, backbone.tokenizer, config.max_length)
        teachers = run("teachers", stages.prompt_tuning("teachers", backbone, src_encoded, train_cfg, prompt_cfg),
                       src_encoded)
        source = run("source", stages.source(backbone, src_encoded, teachers, train_cfg, rank=config.rank),
                     src_encoded)   # U, V at the source stage's rate, the paper's 0.4
    mpt = run("mpt", stages.target(backbone, tgt_encoded, source, train_cfg, mode="full"), tgt_encoded)
    pt = run("pt", stages.prompt_tuning("pt", backbone, tgt_encoded, train_cfg, prompt_cfg), tgt_encoded)

    log(f"[eval] {config.target} test, {config.test_limit} examples per method")

    def scored(name, evaluate, *trained):
        with timed(f"eval {name}"):
            return evaluate(backbone, *trained, target_test, max_length=config.max_length)[config.target]

    if backbone.family.uses_heads:  # no zero-shot without a trained head: the floor is the head alone
        head = run("head", stages.head_only(backbone, tgt_encoded, train_cfg), tgt_encoded)
        floor = {"head only": scored("head only", evaluate_trained, head)}
    else:
        floor = {"zero-shot": scored("zero-shot", evaluate_zero_shot)}
    scores = {**floor, "pt": scored("pt", evaluate_trained, pt), "mpt (full)": scored("mpt", evaluate_trained, mpt)}
    if fingerprint(backbone.model) != before:
        raise RuntimeError("the backbone changed during training; it must stay frozen")
    log("[export] MPT checkpoint → bundle, served by the torch-free runtime")
    # a backbone that generates gets the KV-cache graph: the runtime computes each task's prompt KV once
    options = ExportOptions(max_length=config.max_length, overwrite=True, kv_cache=backbone.family.generates or None)
    with timed("export"):
        write_bundle(bundle_source(mpt, backbone), out / "bundle", options)
    with timed("runtime"):
        served = _serve(out / "bundle", target_test[0])
    scores["mpt (runtime)"] = {k: served[k] for k in ("accuracy", "macro_f1", "n")}
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "backbone": describe(backbone) | {"path": str(backbone.path)},
        "scores": scores,
        "timings": timings,
        "runtime_examples": served["examples"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    results["table"] = _table(config, scores, timings) + "\n" + "\n".join(
        f"  runtime: {e['label']:<7} {e['score']:.3f}  {e['text']}" for e in served["examples"])
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _serve(bundle: Path, test) -> dict:
    """Classify the test texts with the runtime engine: accuracy and a few examples."""
    scores, predictions = evaluate_engine(mer.load(bundle, device="cpu"), test)
    return {**scores, "examples": [{"text": e.fields["text"][:70], "label": p.label, "score": round(p.score, 4)}
                                   for e, p in list(zip(test.examples, predictions))[:4]]}


def _table(config: QuickstartConfig, scores: dict, timings: dict) -> str:
    lines = [f"{config.target} test ({config.test_limit} examples), backbone {config.backbone}, "
             f"k={config.k_per_class}/class, {config.steps} steps per stage and task",
             f"{'method':<14} {'accuracy':>9} {'macro-F1':>9}"]
    lines += [f"{name:<14} {s['accuracy']:>9.4f} {s['macro_f1']:>9.4f}" for name, s in scores.items()]
    lines.append("timings: " + ", ".join(f"{k} {v['seconds']} s" for k, v in timings.items()))
    return "\n".join(lines)
