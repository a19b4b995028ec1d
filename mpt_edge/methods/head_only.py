"""The no-prompt baseline of families that classify with heads: only the per-task heads train."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpt_edge.batching import EncodedTask
from mpt_edge.methods.building_blocks import classifier_for, meta, new_heads, sizes, supervised_loss
from mpt_edge.task_mixing import RoundRobinSampler
from mpt_edge.tasks import TaskError
from mpt_edge.training_loop import Plan, TrainConfig


def plan(backbone, encoded: Sequence[EncodedTask], train: TrainConfig, pooling: str = "mean") -> Plan:
    if not backbone.family.uses_heads:
        raise TaskError(f"the {backbone.family.name} family has no head to train; its no-prompt baseline is zero-shot: "
                        "`mpt-edge eval --zero-shot`")
    generator = torch.Generator().manual_seed(train.seed)
    specs = [e.spec for e in encoded]
    heads = new_heads(backbone, specs, generator)
    classifier = classifier_for(backbone, specs, heads, pooling)
    return Plan("head", None, heads, RoundRobinSampler(sizes(encoded), train.batch_size, train.seed),
                supervised_loss(classifier, None), train.steps * len(specs), meta(backbone, specs, None, heads, pooling))
