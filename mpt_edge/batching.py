"""Tokenize tasks once, then build right-padded batches that carry each row's task id.

Rows of generate tasks hold [input | target + eos] and mark the target positions in `target_mask`; the
backbone learns to predict each target token from the position before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from mpt_edge.tasks import TaskData, TaskSpec
from mpt_edge_runtime.text import encode_example, special_tokens


@dataclass(frozen=True)
class Batch:
    """input_ids, attention_mask (B, n) right-padded; labels (B,) label index in its task (-1: generate row);
    task_ids (B,); target_mask (B, n) True at the target tokens of generate rows (all False otherwise)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    target_mask: torch.Tensor | None = None

    @property
    def input_mask(self) -> torch.Tensor:
        """(B, n) the real input positions: attended and not part of a target."""
        if self.target_mask is None:
            return self.attention_mask
        return self.attention_mask * (~self.target_mask).long()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class EncodedTask:
    """A task's examples as token ids (one list per example), label indices and, for generate tasks, the
    target ids (ending with eos when the backbone has one)."""

    spec: TaskSpec
    ids: list[list[int]]
    labels: list[int]
    targets: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def encode_tasks(tasks: Sequence[TaskData], tokenizer: Tokenizer, max_length: int,
                 eos_id: int | None = None) -> list[EncodedTask]:
    """Token ids of every example; targets of generate tasks are tokenized as written, cut to `max_length`
    tokens, and end with `eos_id` (so the backbone learns where an answer stops)."""
    specials = special_tokens(tokenizer)
    encoded = []
    for task in tasks:
        ids = [encode_example(tokenizer, task.spec.template, ex.fields, max_length, specials) for ex in task.examples]
        targets = None
        if task.spec.kind == "generate":
            end = [eos_id] if eos_id is not None else []
            targets = [tokenizer.encode(ex.target, add_special_tokens=False).ids[:max_length] + end
                       for ex in task.examples]
        encoded.append(EncodedTask(task.spec, ids, [ex.label for ex in task.examples], targets))
    return encoded


def eos_id(model) -> int | None:
    """The first end-of-sequence id of a transformers model (its generation config first), or None."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) and eos else eos


def collate(encoded: Sequence[EncodedTask], picks: Sequence[tuple[int, int]], pad_id: int = 0) -> Batch:
    """Batch of the examples `picks` = [(task index, example index), ...], right-padded with `pad_id`."""
    inputs = [encoded[t].ids[i] for t, i in picks]
    targets = [encoded[t].targets[i] if encoded[t].targets is not None else [] for t, i in picks]
    width = max(len(a) + len(b) for a, b in zip(inputs, targets))
    input_ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    target_mask = torch.zeros((len(inputs), width), dtype=torch.bool)
    for b, (row, target) in enumerate(zip(inputs, targets)):
        input_ids[b, : len(row) + len(target)] = torch.tensor(row + target, dtype=torch.long)
        mask[b, : len(row) + len(target)] = 1
        target_mask[b, len(row): len(row) + len(target)] = True
    labels = torch.tensor([encoded[t].labels[i] for t, i in picks], dtype=torch.long)
    task_ids = torch.tensor([t for t, _ in picks], dtype=torch.long)
    return Batch(input_ids, mask, labels, task_ids, target_mask if target_mask.any() else None)


def sequential_batches(encoded: Sequence[EncodedTask], batch_size: int, task_index: int) -> Iterator[Batch]:
    """Every example of `encoded[task_index]` in order, in batches of `batch_size` (for evaluation).

    Rows are sorted by length inside the task so padding stays small; results are reordered by callers
    only through the returned labels, which travel with the rows.
    """
    order = sorted(range(len(encoded[task_index])), key=lambda i: len(encoded[task_index].ids[i]))
    for start in range(0, len(order), batch_size):
        yield collate(encoded, [(task_index, i) for i in order[start : start + batch_size]])
