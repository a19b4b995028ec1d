"""From a frozen backbone plus a prompt to per-task label logits (every family).

Causal and seq2seq backbones score each label's verbalizer token with the output embedding rows; encoder
backbones put pooled features through per-task heads (`mpt_edge.heads.TaskHeads`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import nn

from mpt_edge.batching import Batch
from mpt_edge.tasks import TaskError, TaskSpec
from mpt_edge_export.families.base import MASKED_LOGIT, PromptedOutput

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


def verbalizer_sequences(spec: TaskSpec, tokenizer: Tokenizer) -> list[list[int]]:
    """Every token id of " <word>" for each label word; the sequences must differ, or a TaskError."""
    rows = [tokenizer.encode(" " + word.strip(), add_special_tokens=False).ids for word in spec.label_words]
    empty = [w for w, r in zip(spec.label_words, rows) if not r]
    if empty:
        raise TaskError(f"task {spec.name!r}: verbalizer(s) {empty} encode to no token")
    if len({tuple(r) for r in rows}) != len(rows):
        raise TaskError(f"task {spec.name!r}: two verbalizers encode to the same tokens; choose distinct label words")
    return rows


@dataclass(frozen=True)
class SequenceLabels:
    """Tasks whose labels are scored by their whole token sequence: ids (T, C, L), mask (T, C, L), and which
    tasks use it (T,). A label's logit is the summed log-probability of its tokens after the input."""

    ids: torch.Tensor
    mask: torch.Tensor
    tasks: torch.Tensor

    @classmethod
    def build(cls, specs: Sequence[TaskSpec], tokenizer: Tokenizer) -> "SequenceLabels | None":
        rows = [verbalizer_sequences(s, tokenizer) if s.verbalizer_tokens == "all" else [] for s in specs]
        if not any(rows):
            return None
        width, length = max(len(r) for r in rows), max(len(t) for r in rows for t in r)
        ids = torch.zeros((len(rows), width, length), dtype=torch.long)
        mask = torch.zeros((len(rows), width, length), dtype=torch.bool)
        for k, row in enumerate(rows):
            for c, tokens in enumerate(row):
                ids[k, c, :len(tokens)], mask[k, c, :len(tokens)] = torch.tensor(tokens), True
        return cls(ids, mask, torch.tensor([bool(r) for r in rows]))


@dataclass(frozen=True)
class VerbalizerScorer:
    """Scores label words for a causal backbone: token ids and validity per task, (T, C_max)."""

    adapter: object
    model: nn.Module
    token_ids: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, adapter, model: nn.Module, specs: Sequence[TaskSpec], tokenizer: Tokenizer) -> "VerbalizerScorer":
        # generate tasks: no label slots; whole-sequence tasks: placeholders that `SequenceLabels` fills
        rows = [verbalizer_ids(s, tokenizer) if s.verbalizer_tokens == "first" else [0] * len(s.labels) for s in specs]
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
    sequences: SequenceLabels | None = None

    def __call__(self, prompts: torch.Tensor | None, batch: Batch) -> tuple[torch.Tensor, PromptedOutput]:
        """prompts (B, l, d) or None → logits (B, C_max) and the family output (features, hidden).
        Generate rows get only masked label slots; their scores come from `answers`. Rows of tasks with
        whole-sequence verbalizers get summed label log-probabilities (one more forward, C rows per row)."""
        out = self.adapter.forward(self.model, prompts, batch.input_ids, batch.attention_mask, batch.target_mask)
        logits = self.scorer(out.features, batch.task_ids)
        if self.sequences is not None:
            rows = self.sequences.tasks[batch.task_ids].nonzero()[:, 0]
            if len(rows):
                tasks = batch.task_ids[rows]
                scores = self.adapter.sequence_log_probs(
                    self.model, prompts[rows] if prompts is not None else None, batch.input_ids[rows],
                    batch.attention_mask[rows], self.sequences.ids[tasks], self.sequences.mask[tasks])
                width = min(scores.shape[1], logits.shape[1])
                logits = logits.index_put((rows,), torch.cat(
                    [scores[:, :width], logits.new_full((len(rows), logits.shape[1] - width), MASKED_LOGIT)], 1))
        return logits, out

    def answers(self, out: PromptedOutput, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate rows: logits (N, V) at the positions that predict their N target tokens, and the tokens (N,)."""
        return self.adapter.answer_logits(self.model, out, batch.input_ids, batch.target_mask)
