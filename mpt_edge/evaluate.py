"""Accuracy and macro-F1 per task on a held-out split."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from mpt_edge.batching import EncodedTask, encode_tasks, eos_id, sequential_batches
from mpt_edge.errors import ConfigError, DataError
from mpt_edge.scoring import Classifier
from mpt_edge.methods.building_blocks import classifier_for
from mpt_edge_export.families import FAMILIES


def macro_f1(predicted: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-label F1 over the labels present in gold or predictions."""
    scores = []
    for label in range(num_labels):
        tp = np.sum((predicted == label) & (gold == label))
        fp = np.sum((predicted == label) & (gold != label))
        fn = np.sum((predicted != label) & (gold == label))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def predict(classifier: Classifier, prompts_for: Callable[[torch.Tensor], torch.Tensor | None],
            encoded: Sequence[EncodedTask], task_index: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and gold label indices for every example of one task (in length order)."""
    predicted, gold = [], []
    for batch in sequential_batches(encoded, batch_size, task_index):
        logits, _ = classifier(prompts_for(batch.task_ids), batch)
        predicted.append(logits.argmax(dim=-1).numpy())
        gold.append(batch.labels.numpy())
    return np.concatenate(predicted), np.concatenate(gold)


@torch.no_grad()
def answer_scores(classifier: Classifier, prompts_for: Callable[[torch.Tensor], torch.Tensor | None],
                  encoded: Sequence[EncodedTask], task_index: int, batch_size: int = 32) -> dict[str, float]:
    """A generate task under teacher forcing: the share of target tokens that are the argmax, and exact match
    (every target token, eos included, is the argmax: exactly when greedy decoding reproduces the target).
    "accuracy" is the exact match, so tables treat both kinds alike."""
    exact = hits = tokens = rows = 0
    for batch in sequential_batches(encoded, batch_size, task_index):
        _, out = classifier(prompts_for(batch.task_ids), batch)
        logits, targets = classifier.answers(out, batch)
        right = logits.argmax(dim=-1) == targets
        owner = batch.target_mask[:, 1:].nonzero()[:, 0]              # the row of every target token
        wrong_rows = torch.zeros(len(batch), dtype=torch.long).index_add_(0, owner, (~right).long())
        exact += int((wrong_rows == 0).sum())
        hits, tokens, rows = hits + int(right.sum()), tokens + right.numel(), rows + len(batch)
    return {"accuracy": exact / rows, "exact_match": exact / rows, "token_accuracy": hits / max(tokens, 1), "n": rows}


def evaluate(classifier: Classifier, prompts_for: Callable[[torch.Tensor], torch.Tensor | None],
             encoded: Sequence[EncodedTask], batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{task: {"accuracy", "macro_f1", "n"}} for every task in `encoded`.

    `prompts_for(task_ids (B,)) -> (B, l, d) or None` supplies the prompts (None = no prompt, zero-shot).
    """
    results = {}
    for k, task in enumerate(encoded):
        if task.spec.kind == "generate":
            results[task.spec.name] = answer_scores(classifier, prompts_for, encoded, k, batch_size)
            continue
        predicted, gold = predict(classifier, prompts_for, encoded, k, batch_size)
        results[task.spec.name] = {
            "accuracy": float(np.mean(predicted == gold)),
            "macro_f1": macro_f1(predicted, gold, len(task.spec.labels)),
            "n": int(len(gold)),
        }
    return results


def dev_scorer(backbone, plan, dev_tasks, *, max_length: int, batch_size: int = 32) -> Callable[[], tuple]:
    """A `validate` for `fit`: mean dev accuracy over the plan's tasks with its current prompt and heads,
    and the accuracy of each task (recorded with every evaluation).

    `dev_tasks` (TaskData) are matched to the plan's tasks by name; every plan task needs one.
    """
    names = [t["name"] for t in plan.meta["tasks"]]
    by_name = {t.spec.name: t for t in dev_tasks}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"no dev split given for task(s) {missing}; early stopping scores every trained task")
    ordered = [by_name[n] for n in names]
    encoded = encode_tasks(ordered, backbone.tokenizer, max_length, eos_id(backbone.model))
    classifier = classifier_for(backbone, [t.spec for t in ordered], plan.heads, plan.meta.get("pooling") or "mean")
    prompt = plan.prompt

    def validate() -> tuple[float, dict[str, float]]:
        prompts_for = (lambda ids: prompt.compose(ids)) if prompt is not None else (lambda ids: None)
        with torch.no_grad():
            scores = evaluate(classifier, prompts_for, encoded, batch_size)
        accuracy = {name: s["accuracy"] for name, s in scores.items()}
        return float(np.mean(list(accuracy.values()))), accuracy

    return validate


def trained_scoring(backbone, trained, tasks, *, max_length: int) -> tuple[Classifier, Callable, list[EncodedTask]]:
    """A `Trained` checkpoint set up to score `tasks` (TaskData, names among its tasks): its classifier,
    `prompts_for` (its prompts as they are now) and the encoded tasks, for `evaluate` or `predict`."""
    order = torch.tensor([trained.index_of(t.spec.name) for t in tasks])
    encoded = encode_tasks(tasks, backbone.tokenizer, max_length, eos_id(backbone.model))
    heads = trained.heads.select(order) if trained.heads is not None else None
    classifier = classifier_for(backbone, [t.spec for t in tasks], heads, trained.meta.pooling_or_default)
    prompts = trained.prompt.fold().detach()[order] if trained.prompt is not None else None
    return classifier, (lambda ids: prompts[ids]) if prompts is not None else (lambda ids: None), encoded


def evaluate_trained(backbone, trained, tasks, *, max_length: int, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Evaluate a `Trained` checkpoint on `tasks` (TaskData, names among the checkpoint's tasks)."""
    return evaluate(*trained_scoring(backbone, trained, tasks, max_length=max_length), batch_size)


def evaluate_zero_shot(backbone, tasks, *, max_length: int, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """A verbalizer family's backbone without any prompt: verbalizer scoring of the template alone."""
    if backbone.family.uses_heads:
        scoring = " or ".join(f.name for f in FAMILIES.values() if not f.uses_heads)
        raise ConfigError(f"zero-shot needs a {scoring} backbone (verbalizer scoring); {backbone.family.name} heads "
                          "must be trained: use `mpt-edge train target --method head`")
    classifier = classifier_for(backbone, [t.spec for t in tasks], None)
    return evaluate(classifier, lambda ids: None, encode_tasks(tasks, backbone.tokenizer, max_length, eos_id(backbone.model)),
                    batch_size)


def evaluate_engine(engine, task) -> tuple[dict[str, float], list]:
    """Score a runtime engine (`mpt_edge_runtime.Engine`) on a TaskData: ({"accuracy", "macro_f1", "n"}, predictions)."""
    predictions = engine.classify(task.spec.name, [e.fields["text"] for e in task.examples])
    predicted = np.array([task.spec.labels.index(p.label) for p in predictions])
    gold = np.array([e.label for e in task.examples])
    scores = {"accuracy": float(np.mean(predicted == gold)),
              "macro_f1": macro_f1(predicted, gold, len(task.spec.labels)), "n": int(len(gold))}
    return scores, predictions
