"""Classification: rows of any classify tasks → one Prediction each, in batches of similar lengths.

    predictions = classify_rows(model.runner, rows, batch_size=32)   # rows: [Row(task, ids), ...], in order

Each row's logits are its task's head over the graph's features (B, d) → (C,); with whole-sequence verbalizers
the summed log-probabilities of every label's tokens, scored by the generation graph, replace them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mpt_edge_runtime.generation import label_log_probs
from mpt_edge_runtime.requests import Row
from mpt_edge_runtime.task_table import TaskEntry


@dataclass(frozen=True)
class Prediction:
    """The predicted label of one text, its probability, and every label's probability."""

    task: str
    label: str
    score: float
    probabilities: dict[str, float] = field(repr=False)


def classify_rows(runner, rows: Sequence[Row], batch_size: int) -> list[Prediction]:
    """Predictions for `rows` in their order; rows are sorted by length so that similar lengths share a batch.
    runner: a model runner (`features(rows)`; generation runners also score whole-sequence labels)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))
    results: list[Prediction | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, prediction in zip(chunk, _forward(runner, [rows[i] for i in chunk])):
            results[i] = prediction
    return results


def _forward(runner, rows: list[Row]) -> list[Prediction]:
    """One batch: features (B, d) from each task's prefix (the prompt KV, with a generation graph: the prompt does
    not run again), then each task's head."""
    features = runner.features([(entry.prefix, ids) for entry, ids in rows])
    predictions = [predict(entry, row) for (entry, _), row in zip(rows, features)]
    whole = [i for i, (entry, _) in enumerate(rows) if entry.label_tokens]
    if whole:  # whole-sequence verbalizers: label log-probabilities replace the head's logits
        scores = label_log_probs(runner, [(rows[i].task.prefix, rows[i].ids, rows[i].task.label_tokens) for i in whole])
        for i, logits in zip(whole, scores):
            predictions[i] = from_logits(rows[i].task, logits)
    return predictions


def predict(entry: TaskEntry, features: np.ndarray) -> Prediction:
    """features (d,) → the task's Prediction through its head."""
    return from_logits(entry, entry.head_weight @ features + entry.head_bias)


def from_logits(entry: TaskEntry, logits: np.ndarray) -> Prediction:
    """logits (C,) → softmax → the most likely label, its probability and every label's."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(np.argmax(probs))
    return Prediction(entry.name, entry.labels[best], float(probs[best]),
                      {label: float(p) for label, p in zip(entry.labels, probs)})
