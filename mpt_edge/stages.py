"""The MPT stages and the baselines by name, with keyword options: each builds its method's typed config and
plan (`mpt_edge.methods`). Callers that already hold a config call the method's `plan` directly.

- `prompt_tuning`: vanilla PT, one prompt per task (stage 1 `teachers`; baselines `pt` and `spot`).
- `source`: stage 2, one shared P* and rank-r factors per source task, distilled from the teachers.
- `target`: stage 3 from a source checkpoint, modes `full`, `factors`, `group`.
- `head_only`: the baseline without a prompt, for families that classify with heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpt_edge.batching import EncodedTask
from mpt_edge.losses import DistillConfig
from mpt_edge.methods import head_only as _head_only, prompt_tuning as _prompt_tuning, source as _source, \
    target as _target
from mpt_edge.methods.building_blocks import classifier_for, new_heads, supervised_loss
from mpt_edge.methods.source import SharedInit, SourceConfig, distilled_loss
from mpt_edge.methods.target import TargetConfig, TargetMode
from mpt_edge.prompt import PromptConfig
from mpt_edge.trained import Trained
from mpt_edge.training_loop import Plan, TrainConfig

TARGET_MODES = tuple(m.value for m in TargetMode)
SHARED_INITS = tuple(m.value for m in SharedInit)

__all__ = ["TARGET_MODES", "SHARED_INITS", "classifier_for", "distilled_loss", "head_only", "new_heads",
           "prompt_tuning", "source", "supervised_loss", "target"]


def prompt_tuning(stage: str, backbone, encoded: Sequence[EncodedTask], config: TrainConfig,
                  prompt_config: PromptConfig, init: str = "vocab", init_text: str = "",
                  initial: torch.Tensor | None = None, pooling: str = "mean") -> Plan:
    """Vanilla PT: task k trains its own prompt P_k (l, d); factors stay at ones. `initial` (T, l, d) overrides init."""
    return _prompt_tuning.plan(stage, backbone, encoded, config, prompt_config,
                               _prompt_tuning.PromptTuningConfig(init, init_text), initial, pooling)


def head_only(backbone, encoded: Sequence[EncodedTask], config: TrainConfig, pooling: str = "mean") -> Plan:
    """No prompt: only the per-task heads train (families that classify with heads)."""
    return _head_only.plan(backbone, encoded, config, pooling)


def source(backbone, encoded: Sequence[EncodedTask], teachers: Trained, config: TrainConfig, rank: int = 1,
           distill: DistillConfig = DistillConfig(), shared_init: str = "teachers", init_text: str = "",
           pooling: str = "mean") -> Plan:
    """Stage 2: shared P* + per-task rank-r factors, task loss + λ (KL + hidden MSE) against the teachers.
    U, V's rate is `config.lr_factors`; None: the paper's 0.4 (`SOURCE_LR_FACTORS`)."""
    return _source.plan(backbone, encoded, teachers, config, SourceConfig(rank, shared_init, init_text, distill), pooling)


def target(backbone, encoded: Sequence[EncodedTask], source_run: Trained, config: TrainConfig, mode: str = "full",
           factor_init: str | None = None, pooling: str = "mean", factor_rank: int | None = None,
           factor_growth: str = "extend") -> Plan:
    """Stage 3: P* from the source; U, V by `factor_init` ("mean" [paper], a source task's name, "shared-only"),
    of rank `factor_rank` (0: the source's; None: at least 2 in factors mode, the source's otherwise; higher grown
    by `factor_growth`). U, V's rate is `config.lr_factors`; None: `methods.target.LR_FACTORS[mode]`."""
    return _target.plan(backbone, encoded, source_run, config,
                        TargetConfig(mode, factor_init, factor_rank, factor_growth), pooling)
