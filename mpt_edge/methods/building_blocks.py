"""What every method shares: the classifier for a backbone's family, fresh heads, the supervised loss, the
checkpoint metadata, and the check that turns a config value into one of its allowed choices."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from mpt_edge.batching import EncodedTask
from mpt_edge.errors import ConfigError
from mpt_edge.heads import TaskHeads
from mpt_edge.losses import Totals, batch_task_loss
from mpt_edge.prompt import MultitaskPrompt
from mpt_edge.scoring import Classifier, SequenceLabels, VerbalizerScorer
from mpt_edge.tasks import TaskError
from mpt_edge_export.families import FAMILIES


def choice(kind: type[Enum], value, what: str) -> Enum:
    """`value` as a member of the str-Enum `kind`, or a ConfigError naming `what` and the allowed values."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not supported; allowed: {', '.join(m.value for m in kind)}") from None


def classifier_for(backbone, specs, heads: TaskHeads | None, pooling: str = "mean") -> Classifier:
    """Backbone + its family's training adapter + the family's scorer (a head per task, or verbalizer tokens)."""
    family = backbone.family
    if not family.generates and any(s.kind == "generate" or s.verbalizer_tokens == "all" for s in specs):
        generating = " or ".join(f.name for f in FAMILIES.values() if f.generates)
        raise TaskError(f"generate tasks and whole-sequence verbalizers need a {generating} backbone; "
                        f"{backbone.name!r} is {family.name}")
    if family.uses_heads:
        if heads is None:
            raise ValueError(f"the {family.name} family needs task heads")
        return Classifier(backbone.model, family.adapter(pooling=pooling, training=True), heads)
    adapter = family.adapter(training=True)
    return Classifier(backbone.model, adapter, VerbalizerScorer.build(adapter, backbone.model, specs, backbone.tokenizer),
                      SequenceLabels.build(specs, backbone.tokenizer))


def new_heads(backbone, specs, generator) -> TaskHeads | None:
    """Fresh random heads, one per task (C_k × d), for families that use heads; None for verbalizer families."""
    if not backbone.family.uses_heads:
        return None
    return TaskHeads.random([len(s.labels) for s in specs], hidden(backbone), generator)


def supervised_loss(classifier: Classifier, prompt: MultitaskPrompt | None):
    """The task loss of a batch (cross-entropy over labels, or over answer tokens for generate tasks)."""
    def loss_fn(batch, totals: Totals | None = None):
        prompts = prompt.compose(batch.task_ids) if prompt is not None else None
        logits, out = classifier(prompts, batch)
        answers = classifier.answers(out, batch) if batch.target_mask is not None else None
        return batch_task_loss(logits, batch, answers, totals), {}

    return loss_fn


def hidden(backbone) -> int:
    return backbone.model.get_input_embeddings().embedding_dim


def sizes(encoded: Sequence[EncodedTask]) -> tuple[int, ...]:
    return tuple(len(e) for e in encoded)


def meta(backbone, specs, prompt: MultitaskPrompt | None, heads: TaskHeads | None, pooling: str, **extra) -> dict:
    """The checkpoint metadata of a plan: backbone, task specs, prompt shape, heads, pooling, method settings."""
    return {
        "backbone": {"name": backbone.name, "family": backbone.family.name, "hidden_size": hidden(backbone)},
        "tasks": [s.to_json() for s in specs],
        "prompt": None if prompt is None else {"length": prompt.length, "rank": prompt.rank,
                                               "groups": len(prompt.shared), "task_groups": prompt.task_groups.tolist()},
        "heads": heads is not None,
        "pooling": pooling if backbone.family.uses_heads else None,
        **extra,
    }
