"""Full fine-tuning reference for the quality suite: every backbone weight trains (no prompt), same data,
step budget and dev selection as the prompt methods. A copy of the backbone trains, so the frozen one that
the other methods share is never touched. Bench-only: the kit itself never fine-tunes its backbone.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from mpt_edge import stages
from mpt_edge.batching import collate, encode_tasks
from mpt_edge.evaluate import evaluate
from mpt_edge.losses import batch_task_loss
from mpt_edge.task_mixing import RoundRobinSampler

LR = 2e-5   # AdamW, the usual fine-tuning rate for small transformers


def finetune_run(backbone, train, dev, test, *, steps: int, batch_size: int, max_length: int, eval_every: int,
                 seed: int) -> dict:
    """Fine-tune a copy of the backbone on `train` (one task), keep the weights that score best on `dev`,
    return the test scores {"accuracy", "macro_f1", "n"} and the dev evaluations."""
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone.model).train(False).requires_grad_(True)
    tuned = dataclasses.replace(backbone, model=model)
    specs = [t.spec for t in train]
    heads = stages.new_heads(tuned, specs, torch.Generator().manual_seed(seed))
    classifier = stages.classifier_for(tuned, specs, heads)
    params = [*model.parameters(), *(heads.parameters() if heads is not None else [])]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    encoded = encode_tasks(train, backbone.tokenizer, max_length)
    dev_encoded = encode_tasks(dev, backbone.tokenizer, max_length)
    sampler = RoundRobinSampler(tuple(len(e) for e in encoded), batch_size, seed)

    def dev_accuracy() -> float:
        return evaluate(classifier, lambda ids: None, dev_encoded)[dev[0].spec.name]["accuracy"]

    best_score, best_state, evals = dev_accuracy(), None, []
    evals.append({"step": 0, "score": best_score})
    for step in range(steps):
        batch = collate(encoded, sampler.batch(step))
        logits, _ = classifier(None, batch)
        loss = batch_task_loss(logits, batch, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % eval_every == 0 or done == steps:
            score = dev_accuracy()
            evals.append({"step": done, "score": score})
            if score > best_score:
                best_score = score
                best_state = {k: v.detach().clone() for k, v in classifier_state(model, heads).items()}
    if best_state is not None:
        load_classifier_state(model, heads, best_state)
    else:   # nothing beat the untrained backbone: score the untrained one
        model, heads = backbone.model, stages.new_heads(backbone, specs, torch.Generator().manual_seed(seed))
        classifier = stages.classifier_for(backbone, specs, heads)
    scores = evaluate(classifier, lambda ids: None, encode_tasks(test, backbone.tokenizer, max_length))
    return {"scores": scores[test[0].spec.name], "extra": {"best": max(evals, key=lambda e: e["score"]), "evals": evals}}


def classifier_state(model, heads) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if heads is not None:
        state.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    return state


def load_classifier_state(model, heads, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    if heads is not None:
        heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
