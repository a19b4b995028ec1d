"""MPT stage 3: adapt target tasks from a source's P* and factors.

full: each task trains its own copy of P* and its factors; factors: P* frozen and shared, only U, V train
(a few KB per task); group: the tasks share one trained P*, each with its own factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from mpt_edge.batching import EncodedTask
from mpt_edge.errors import ConfigError
from mpt_edge.methods.building_blocks import choice, classifier_for, meta, new_heads, sizes, supervised_loss
from mpt_edge.prompt import MultitaskPrompt
from mpt_edge.prompt_init import FACTOR_GROWTHS, factors_from_source, identity_factors
from mpt_edge.task_mixing import MixtureSampler, RoundRobinSampler
from mpt_edge.tasks import TaskError
from mpt_edge.trained import Trained
from mpt_edge.training_loop import BASE_LR_FACTORS, Plan, TrainConfig


class TargetMode(str, Enum):
    FULL = "full"
    FACTORS = "factors"
    GROUP = "group"


MEAN, SHARED_ONLY = "mean", "shared-only"   # factor inits besides a source task's name

# The defaults chosen on dev by the 5-seed SmolLM2 comparison (docs/results.md, "5-seed comparison"): `factors` mode
# moves P* only through U V, and a rank-1 pair only rescales P*'s rows and columns, so it gets a second direction
# and a larger relative step; `full` and `group` train P* itself and keep the source's rank and P*'s step scale.
FACTORS_MODE_RANK = 2
LR_FACTORS = {TargetMode.FULL: BASE_LR_FACTORS, TargetMode.FACTORS: 0.05,    # U, V's relative-step cap
              TargetMode.GROUP: BASE_LR_FACTORS}


@dataclass(frozen=True)
class TargetConfig:
    mode: TargetMode = TargetMode.FULL
    factor_init: str = MEAN   # "mean" of the source factors [paper], a source task's name (its exact pair), or
                              # "shared-only" (factors start at ones: only P* transfers)
    factor_rank: int | None = None   # rank of each target's U V; 0 = the source's; None = the mode's default
                                     # (target_rank). Higher: more to adapt in `factors` mode, 4 (l + d) bytes per
                                     # rank and task, starting from the same prompt
    factor_growth: str = "extend"   # how U V gain that rank: "extend" (new zero columns of U, random rows of V:
                                    # exactly the same product) or "split" (the first rank-2 ablation's init)

    def __post_init__(self):
        object.__setattr__(self, "mode", choice(TargetMode, self.mode, "target mode"))
        object.__setattr__(self, "factor_init", self.factor_init or MEAN)
        rank = self.factor_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ConfigError(f"factor rank must be an integer >= 0 (0 = the source's rank), got {rank!r}")
        if self.factor_growth not in FACTOR_GROWTHS:
            raise ConfigError(f"factor growth must be one of {', '.join(FACTOR_GROWTHS)}, got {self.factor_growth!r}")


def target_rank(method: TargetConfig, source_rank: int) -> int:
    """Each target's U V rank: the configured one (0 = the source's) or, unset, the mode's default: at least
    FACTORS_MODE_RANK in `factors` mode, the source's in the others."""
    if method.factor_rank is None:
        return max(source_rank, FACTORS_MODE_RANK) if method.mode is TargetMode.FACTORS else source_rank
    return method.factor_rank or source_rank


def plan(backbone, encoded: Sequence[EncodedTask], source_run: Trained, train: TrainConfig,
         method: TargetConfig = TargetConfig(), pooling: str = "mean") -> Plan:
    if source_run.prompt is None:
        raise TaskError("the source checkpoint holds no prompt; pass the output folder of `mpt-edge train source`")
    generator = torch.Generator().manual_seed(train.seed)
    specs, tasks, mode = [e.spec for e in encoded], len(encoded), method.mode
    src = source_run.prompt.tensors()
    shared0 = src["prompt.shared"][0]
    rank = target_rank(method, src["prompt.u"].shape[2])
    if method.factor_init == SHARED_ONLY:
        u, v = identity_factors(tasks, shared0.shape[0], rank, shared0.shape[1], generator)
    else:
        pick = None if method.factor_init == MEAN else source_run.index_of(method.factor_init)
        u, v = factors_from_source(src["prompt.u"], src["prompt.v"], tasks, pick)
        if rank < u.shape[2]:
            raise ConfigError(f"factor rank {rank} is below the source's rank {u.shape[2]}; pass "
                              f"{u.shape[2]} or more, or 0 to keep the source's")
        if rank > u.shape[2]:
            u, v = FACTOR_GROWTHS[method.factor_growth](u, v, rank, generator)
    if mode is TargetMode.FULL:
        prompt = MultitaskPrompt(shared0.expand(tasks, *shared0.shape), u, v, range(tasks))
    else:
        prompt = MultitaskPrompt(shared0[None], u, v, [0] * tasks).set_trainable(shared=mode is TargetMode.GROUP,
                                                                                 factors=True)
    heads = new_heads(backbone, specs, generator)
    classifier = classifier_for(backbone, specs, heads, pooling)
    if mode is TargetMode.GROUP:
        sampler = MixtureSampler(sizes(encoded), train.batch_size, train.seed, train.mixing_cap, train.max_tasks)
        total = train.steps
    else:
        sampler, total = RoundRobinSampler(sizes(encoded), train.batch_size, train.seed), train.steps * tasks
    info = meta(backbone, specs, prompt, heads, pooling, mode=mode.value, factor_init=method.factor_init,
                source_tasks=source_run.task_names)
    return Plan("target", prompt, heads, sampler, supervised_loss(classifier, prompt), total, info,
                lr_factors=LR_FACTORS[mode])
