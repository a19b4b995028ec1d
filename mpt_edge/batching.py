"""Tokenize tasks once, then build right-padded batches that carry each row's task id."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from mpt_edge.tasks import TaskData, TaskSpec
from mpt_edge_runtime.text import encode_example, special_tokens


@dataclass(frozen=True)
class Batch:
    """input_ids, attention_mask (B, n) right-padded; labels (B,) label index in its task; task_ids (B,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class EncodedTask:
    """A task's examples as token ids (one list per example) and label indices."""

    spec: TaskSpec
    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def encode_tasks(tasks: Sequence[TaskData], tokenizer: Tokenizer, max_length: int) -> list[EncodedTask]:
    specials = special_tokens(tokenizer)
    return [
        EncodedTask(
            task.spec,
            [encode_example(tokenizer, task.spec.template, ex.fields, max_length, specials) for ex in task.examples],
            [ex.label for ex in task.examples],
        )
        for task in tasks
    ]


def collate(encoded: Sequence[EncodedTask], picks: Sequence[tuple[int, int]], pad_id: int = 0) -> Batch:
    """Batch of the examples `picks` = [(task index, example index), ...], right-padded with `pad_id`."""
    rows = [encoded[t].ids[i] for t, i in picks]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    labels = torch.tensor([encoded[t].labels[i] for t, i in picks], dtype=torch.long)
    task_ids = torch.tensor([t for t, _ in picks], dtype=torch.long)
    return Batch(input_ids, mask, labels, task_ids)


def sequential_batches(encoded: Sequence[EncodedTask], batch_size: int, task_index: int) -> Iterator[Batch]:
    """Every example of `encoded[task_index]` in order, in batches of `batch_size` (for evaluation).

    Rows are sorted by length inside the task so padding stays small; results are reordered by callers
    only through the returned labels, which travel with the rows.
    """
    order = sorted(range(len(encoded[task_index])), key=lambda i: len(encoded[task_index].ids[i]))
    for start in range(0, len(order), batch_size):
        yield collate(encoded, [(task_index, i) for i in order[start : start + batch_size]])
