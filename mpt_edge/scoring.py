"""From a frozen backbone plus a prompt to per-task label logits (both families).

Causal backbones score each label's verbalizer token with the output embedding rows; encoder backbones
put pooled features through per-task heads (`mpt_edge.heads.TaskHeads`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import nn

from mpt_edge.batching import Batch
from mpt_edge.tasks import TaskError, TaskSpec
from mpt_edge_export.families.base import PromptedOutput

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # features (B, d), task_ids (B,) → (B, C_max)


def verbalizer_ids(spec: TaskSpec, tokenizer: Tokenizer) -> list[int]:
    """First token id of " <word>" for each label word; distinct within the task, or a TaskError."""
    ids = []
    for word in spec.label_words:
        tokens = tokenizer.encode(" " + word.strip(), add_special_tokens=False).ids
        if not tokens:
            raise TaskError(f"task {spec.name!r}: verbalizer {word!r} encodes to no token")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        clash = [w for w, i in zip(spec.label_words, ids) if ids.count(i) > 1]
        raise TaskError(
            f"task {spec.name!r}: verbalizers {clash} start with the same token, so they cannot be told apart; "
            "choose label words whose first token differs"
        )
    return ids


@dataclass(frozen=True)
class VerbalizerScorer:
    """Scores label words for a causal backbone: token ids and validity per task, (T, C_max)."""

    adapter: object
    model: nn.Module
    token_ids: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, adapter, model: nn.Module, specs: Sequence[TaskSpec], tokenizer: Tokenizer) -> "VerbalizerScorer":
        rows = [verbalizer_ids(s, tokenizer) for s in specs]   # generate tasks: no label slots
        width = max(1, max(len(r) for r in rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for k, row in enumerate(rows):
            ids[k, : len(row)] = torch.tensor(row)
            valid[k, : len(row)] = True
        return cls(adapter, model, ids, valid)

    def __call__(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.label_logits(self.model, features, self.token_ids[task_ids], self.valid[task_ids])


@dataclass(frozen=True)
class Classifier:
    """A frozen backbone, its family adapter and a scorer: prompts + batch → label logits."""

    model: nn.Module
    adapter: object
    scorer: Scorer

    def __call__(self, prompts: torch.Tensor | None, batch: Batch) -> tuple[torch.Tensor, PromptedOutput]:
        """prompts (B, l, d) or None → logits (B, C_max) and the family output (features, hidden).
        Generate rows get only masked label slots; their scores come from `answers`."""
        out = self.adapter.forward(self.model, prompts, batch.input_ids, batch.attention_mask)
        return self.scorer(out.features, batch.task_ids), out

    def answers(self, out: PromptedOutput, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate rows: logits (N, V) at the positions that predict their N target tokens, and the tokens (N,)."""
        return self.adapter.answer_logits(self.model, out.hidden, batch.input_ids, batch.target_mask)
