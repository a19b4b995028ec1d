"""The training loop shared by every stage: sample, forward, loss, Adafactor step, checkpoint, resume.

A stage (see `mpt_edge.stages`) builds a `Plan`: the trainable prompt and heads, a sampler, a loss
function and metadata. `fit` runs it. Every step's batch is a pure function of (seed, step) and the
backbone runs in eval mode (no dropout), so a resumed run reaches the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from mpt_edge.batching import Batch, EncodedTask, collate
from mpt_edge.checkpoint import (CheckpointError, has_checkpoint, load_checkpoint, make_folder, optimizer_state,
                                 restore_optimizer, save_checkpoint)
from mpt_edge import distributed
from mpt_edge.errors import ConfigError
from mpt_edge.heads import TaskHeads
from mpt_edge.losses import Totals
from mpt_edge.precision import PRECISIONS, forward_precision
from mpt_edge.prompt import MultitaskPrompt
from mpt_edge.tasks import TaskSpec


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200             # optimizer steps (per task for the teachers stage)
    batch_size: int = 8
    max_length: int = 128        # input tokens per example, prompt not counted
    lr_prompt: float = 0.03      # P*: cap on Adafactor's relative step (paper: 0.3 absolute on T5, see README)
    lr_factors: float | None = None   # U, V: cap on Adafactor's relative step; None = the stage's (Plan.lr_factors:
                                      # the paper's 0.4 for sources, methods.target.LR_FACTORS[mode] for targets)
    lr_head: float = 0.1         # encoder heads
    checkpoint_every: int = 50   # steps between checkpoints (and the last step)
    seed: int = 0
    max_tasks: int = 4           # κ: stochastic task sampling draws K ∈ [2, κ] tasks per batch
    mixing_cap: int = 3000       # examples-proportional mixing cap
    eval_every: int = 0          # steps between dev evaluations (0 = none); the best-scoring tensors are kept
    patience: int = 0            # stop after this many dev evaluations without a new best (0 = spend every step)
    warmup: int = 0              # steps over which every learning rate rises linearly from lr/warmup to lr
    precision: str = "fp32"      # the training forward: fp32, or bf16 autocast (weights, optimizer, evals stay fp32)

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length", "checkpoint_every", "max_tasks", "mixing_cap"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"train option {name} must be an integer >= 1, got {value!r}")
        for name in ("lr_prompt", "lr_factors", "lr_head"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"train option {name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"train option eval_every must be an integer >= 0 (0 = no dev evaluation), got {self.eval_every!r}")
        for name in ("patience", "warmup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"train option {name} must be an integer >= 0 (0 = off), got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train option precision must be one of {', '.join(PRECISIONS)} (--precision also takes "
                              f"auto), got {self.precision!r}")
        if self.patience and not self.eval_every:
            raise ConfigError("train option patience needs eval_every > 0: early stopping counts dev evaluations")

    def warmup_factor(self, step: int) -> float:
        """Multiplier of every learning rate at 0-based `step`: (step + 1) / warmup during warmup, then 1."""
        return min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0


SOURCE_LR_FACTORS = 0.4          # stage 2 [paper]: factors start at ones and must specialise per source task
BASE_LR_FACTORS = 0.015          # the rest (stages that train no factors record it); U V at this rate move the prompt
                                 # about as far per step as lr_prompt moves P* (the paper's 0.4 moved it 64% in a step)

LossFn = Callable[[Batch, Totals], tuple[torch.Tensor, dict[str, float]]]   # a shard, the global batch's totals
Validate = Callable[[], "float | tuple[float, dict]"]   # dev score of the current tensors (higher is better),
                                                        # optionally with details (e.g. per-task accuracy) to record
BEST = "best."                   # prefix of the best tensors so far inside an unfinished checkpoint


@dataclass
class Plan:
    """One training run: what trains, on what, with which loss, and what to record with it."""

    stage: str
    prompt: MultitaskPrompt | None
    heads: TaskHeads | None
    sampler: object                       # has .batch(step) -> [(task, example)]
    loss_fn: LossFn
    total_steps: int
    meta: dict = field(default_factory=dict)
    lr_factors: float = BASE_LR_FACTORS   # U, V's rate where the config leaves it unset (the stage's default)

    def resolved(self, config: TrainConfig) -> TrainConfig:
        """`config` with this stage's factor rate where it has none: what trains, and what the checkpoint records."""
        return config if config.lr_factors is not None else replace(config, lr_factors=self.lr_factors)

    def param_groups(self, config: TrainConfig) -> list[dict]:
        config = self.resolved(config)
        groups = []
        if self.prompt is not None:
            groups.append({"params": [p for p in self.prompt.shared if p.requires_grad], "lr": config.lr_prompt})
            groups.append({"params": [p for p in [*self.prompt.u, *self.prompt.v] if p.requires_grad],
                           "lr": config.lr_factors})
        if self.heads is not None:
            groups.append({"params": [p for p in self.heads.parameters() if p.requires_grad], "lr": config.lr_head})
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError(f"stage {self.stage!r} has nothing to train")
        return groups

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.prompt is not None:
            out.update(self.prompt.tensors())
        if self.heads is not None:
            out.update(self.heads.tensors())
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            if self.prompt is not None:
                for dst, src in zip([*self.prompt.shared, *self.prompt.u, *self.prompt.v],
                                    [*tensors["prompt.shared"], *tensors["prompt.u"], *tensors["prompt.v"]]):
                    dst.copy_(src)
            if self.heads is not None:
                for k, (w, b) in enumerate(zip(self.heads.weight, self.heads.bias)):
                    w.copy_(tensors[f"heads.{k}.weight"])
                    b.copy_(tensors[f"heads.{k}.bias"])


def fit(plan: Plan, encoded: Sequence[EncodedTask], config: TrainConfig, out: Path, *,
        resume: bool = False, progress: bool = True, validate: Validate | None = None,
        goal: float | None = None) -> dict:
    """Run `plan` and checkpoint into `out`; returns the final checkpoint metadata.

    An existing checkpoint in `out` is continued with `resume=True` and refused otherwise, so nothing
    saved is overwritten by accident. With `validate` and `config.eval_every`, the dev score is taken
    before training, every `eval_every` steps and at the end; the final checkpoint holds the best-scoring
    tensors (early stopping by selection: every run spends the same step budget). With `config.patience`
    training stops after that many evaluations without a new best, and with `goal` as soon as the dev score
    reaches it; the checkpoint then records `stopped` (step and reason) and a resume returns it as it is.
    `config.warmup` scales every learning rate by `config.warmup_factor(step)`, a pure function of the step.

    Under `torchrun` (an initialised process group, see `mpt_edge.distributed`) every rank trains on its shard
    of each global batch with summed gradients; rank 0 validates, checkpoints and shows progress.
    """
    out = make_folder(out)   # probes that it takes a file, before any training (resumed runs too)
    config = plan.resolved(config)
    ranks = distributed.current()
    if config.batch_size < ranks.world:
        raise ConfigError(f"batch size {config.batch_size} is smaller than the {ranks.world} ranks; every rank needs "
                          "rows: raise --batch-size (it is the global batch) or start fewer processes")
    if selecting := validate is not None and config.eval_every > 0:
        validate = _on_main(validate, ranks)
    optimizer = torch.optim.Adafactor(plan.param_groups(config))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    meta = {**plan.meta, "stage": plan.stage, "train": asdict(config), "total_steps": plan.total_steps}
    start, history, best = 0, [], {}
    if has_checkpoint(out):
        if not resume:
            raise CheckpointError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
        index, tensors = load_checkpoint(out)
        _check_resumable(index, meta, out)
        if index.get("stopped"):
            return index
        start, history, best = _restore(plan, optimizer, index, tensors, selecting)
    if selecting and not best:
        best = _scored(plan, validate, start, {"step": start, "score": float("-inf"), "evals": []})
    bar = _progress(plan.stage, start, plan.total_steps, progress and ranks.main)
    tick, window = time.perf_counter(), []
    for step in range(start, plan.total_steps):
        batch = collate(encoded, plan.sampler.batch(step))
        with forward_precision(config.precision):
            loss, parts = plan.loss_fn(distributed.shard(batch, ranks), Totals.of(batch))
        loss = loss.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(params, ranks)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * config.warmup_factor(step)
        optimizer.step()
        logged = distributed.sum_values([loss.item(), *parts.values()], ranks)   # the global batch's loss
        window.append(dict(zip(["loss", *parts], logged)))
        done = step + 1
        stopped = None
        if selecting and (done % config.eval_every == 0 or done == plan.total_steps):
            best = _scored(plan, validate, done, best)
            stopped = _stop_reason(best, done, config, goal)
            if done == plan.total_steps or stopped:
                plan.load_tensors(best["tensors"])
        if done % config.checkpoint_every == 0 or done == plan.total_steps or stopped:
            now = time.perf_counter()
            means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            history.append({"step": done, **means, "steps_per_s": len(window) / max(now - tick, 1e-9)})
            tick, window = now, []
            if ranks.main:
                _save(out, plan, optimizer, {**meta, "history": history}, best if selecting else None, stopped, done)
            distributed.barrier(ranks)
        bar(done, logged[0], dict(zip(parts, logged[1:])))
        if stopped:
            break
    bar.close()
    distributed.barrier(ranks)
    index, _ = load_checkpoint(out)
    return index


def _restore(plan: Plan, optimizer, index: dict, tensors: dict, selecting: bool) -> tuple[int, list, dict]:
    """Load a checkpoint's tensors and optimizer state into `plan` → (step, history, best record or {})."""
    plan.load_tensors(tensors)
    restore_optimizer(optimizer, tensors, index["optimizer"])
    best = {}
    if selecting and "best" in index:
        best = {**index["best"], "tensors": {k[len(BEST):]: v for k, v in tensors.items() if k.startswith(BEST)}}
    return index["step"], index["history"], best


def _save(out: Path, plan: Plan, optimizer, meta: dict, best: dict | None, stopped: str | None, step: int) -> None:
    """Checkpoint the plan's tensors, the optimizer state and, when selecting, the best tensors so far."""
    opt_tensors, opt_info = optimizer_state(optimizer)
    extra_meta, extra_tensors = {}, {}
    if best is not None:
        extra_meta = {"best": {k: v for k, v in best.items() if k != "tensors"}}
        extra_tensors = {BEST + k: v for k, v in best["tensors"].items()}
    if stopped:
        extra_meta["stopped"] = {"step": step, "reason": stopped}
    save_checkpoint(out, {**meta, "optimizer": opt_info, **extra_meta}, {**plan.tensors(), **opt_tensors, **extra_tensors},
                    step)


def _on_main(validate: Validate, ranks: distributed.Ranks) -> Validate:
    """Validation runs on rank 0 only; every rank gets its score (they hold the same tensors), rank 0 its details."""
    def on_main():
        result = validate() if ranks.main else 0.0
        score, details = result if isinstance(result, tuple) else (result, None)
        return distributed.from_main(float(score), ranks), details

    return on_main


def _scored(plan: Plan, validate: Validate, step: int, best: dict) -> dict:
    """Score the plan's current tensors; the new best record (step, score, evals, tensors) or the old one."""
    result = validate()
    score, details = (float(result[0]), result[1]) if isinstance(result, tuple) else (float(result), None)
    evals = [*best["evals"], {"step": step, "score": score, **({"details": details} if details is not None else {})}]
    if score > best["score"]:
        return {"step": step, "score": score, "evals": evals,
                "tensors": {k: v.detach().clone() for k, v in plan.tensors().items()}}
    return {**best, "evals": evals}


def _stop_reason(best: dict, step: int, config: TrainConfig, goal: float | None) -> str | None:
    """Why training stops early after the evaluation at `step` ("goal" or "patience"), or None."""
    if goal is not None and best["score"] >= goal:
        return "goal"
    since_best = sum(1 for e in best["evals"] if e["step"] > best["step"])
    if config.patience and since_best >= config.patience:
        return "patience"
    return None


def _check_resumable(index: dict, meta: dict, out: Path) -> None:
    meta = json.loads(json.dumps(meta))  # compare as saved (tuples become lists)
    # options and task fields added in later versions read as their defaults in checkpoints written before them
    index = {**index, "train": {**asdict(TrainConfig()), **index.get("train", {})},
             "tasks": json.loads(json.dumps([TaskSpec.from_json(t).to_json() for t in index.get("tasks", [])]))}
    for key in ("stage", "tasks", "backbone", "prompt", "train", "total_steps"):
        if index.get(key) != meta.get(key):
            raise CheckpointError(
                f"{out} holds a {index.get('stage')} checkpoint whose {key!r} differs from this run's; resume with the "
                "same options, or choose another --out"
            )


class _progress:
    """A one-line progress display on stderr: step, loss, steps/s (tqdm when available)."""

    def __init__(self, stage: str, start: int, total: int, enabled: bool):
        self.enabled, self.start_time, self.start = enabled, time.perf_counter(), start
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, done: int, loss: float, parts: dict) -> None:
        if not self.enabled:
            return
        rate = (done - self.start) / max(time.perf_counter() - self.start_time, 1e-9)
        info = {"loss": f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in parts.items()}, "steps/s": f"{rate:.2f}"}
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(info, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
