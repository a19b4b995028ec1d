"""Family adapters: padding does not change a row's result, prompts matter, mixed batches are per row."""

from __future__ import annotations

import pytest
import torch

from conftest import SPECS, synthetic_task
from mpt_edge.batching import collate, encode_tasks
from mpt_edge.heads import TaskHeads
from mpt_edge.stages import classifier_for
from mpt_edge_export.families import UnsupportedBackboneError, adapter_for, family_for_model_type
from mpt_edge_export.families.base import MASKED_LOGIT


def classifier(backbone, specs):
    heads = TaskHeads.random([len(s.labels) for s in specs], 32, torch.Generator().manual_seed(0)) \
        if backbone.family.uses_heads else None
    return classifier_for(backbone, specs, heads)


@torch.no_grad()
def test_padding_does_not_change_a_rows_logits_or_hidden_states(backbone):
    specs = [SPECS["polarity"], SPECS["topic"]]
    encoded = encode_tasks([synthetic_task("polarity", 8), synthetic_task("topic", 8)], backbone.tokenizer, 32)
    clf = classifier(backbone, specs)
    picks = [(0, 0), (1, 3), (0, 5), (1, 1)]
    prompts = torch.randn(2, 3, 32)
    batch = collate(encoded, picks)
    assert (batch.attention_mask == 0).any(), "the test needs rows of different lengths"
    logits, out = clf(prompts[batch.task_ids], batch)
    for row, pick in enumerate(picks):
        alone = collate(encoded, [pick])
        single_logits, single_out = clf(prompts[alone.task_ids], alone)
        torch.testing.assert_close(logits[row], single_logits[0], atol=1e-5, rtol=1e-4)
        n = alone.input_ids.shape[1]
        torch.testing.assert_close(out.hidden[row, :n], single_out.hidden[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_prompt_changes_the_output_and_each_row_uses_its_own(backbone):
    specs = [SPECS["polarity"], SPECS["mood"]]
    encoded = encode_tasks([synthetic_task("polarity", 4), synthetic_task("mood", 4)], backbone.tokenizer, 32)
    clf = classifier(backbone, specs)
    batch = collate(encoded, [(0, 0), (1, 0), (0, 1), (1, 1)])
    prompts = torch.randn(2, 3, 32)
    mixed, _ = clf(prompts[batch.task_ids], batch)
    for task in (0, 1):
        rows = (batch.task_ids == task).nonzero().flatten()
        same_prompt, _ = clf(prompts[task].expand(len(batch), -1, -1), batch)
        torch.testing.assert_close(mixed[rows], same_prompt[rows], atol=1e-5, rtol=1e-4)
    other, _ = clf(prompts[1 - batch.task_ids], batch)
    assert not torch.allclose(mixed, other, atol=1e-4)
    no_prompt, _ = clf(None, batch)
    assert no_prompt.shape == mixed.shape and not torch.allclose(no_prompt, mixed, atol=1e-4)


@torch.no_grad()
def test_label_slots_beyond_a_tasks_labels_are_masked(backbone):
    specs = [SPECS["polarity"], SPECS["topic"]]  # 2 and 3 labels
    encoded = encode_tasks([synthetic_task("polarity", 4), synthetic_task("topic", 4)], backbone.tokenizer, 32)
    batch = collate(encoded, [(0, 0), (1, 0)])
    logits, _ = classifier(backbone, specs)(None, batch)
    assert logits.shape == (2, 3)
    assert logits[0, 2] == MASKED_LOGIT and (logits[1] > MASKED_LOGIT).all()


def test_causal_scores_the_verbalizer_tokens_with_the_output_embeddings(llama):
    encoded = encode_tasks([synthetic_task("polarity", 4)], llama.tokenizer, 32)
    batch = collate(encoded, [(0, 0), (0, 1)])
    clf = classifier(llama, [SPECS["polarity"]])
    with torch.no_grad():
        logits, _ = clf(None, batch)
        full = llama.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ids = [llama.tokenizer.token_to_id(w) for w in ("negative", "positive")]
    for row in range(2):
        last = int(batch.attention_mask[row].sum()) - 1
        torch.testing.assert_close(logits[row], full[row, last, ids], atol=1e-5, rtol=1e-4)


def test_family_lookup_and_errors():
    assert family_for_model_type("llama").name == "causal" and family_for_model_type("bert").name == "encoder"
    assert family_for_model_type("t5").name == "seq2seq"
    with pytest.raises(UnsupportedBackboneError, match="bart.*seq2seq \\['mt5', 't5'\\]"):
        family_for_model_type("bart")
    with pytest.raises(ValueError, match="pooling"):
        adapter_for("encoder", pooling="max")


@pytest.mark.parametrize("make", ["llama", "gpt2"])
def test_shared_prompt_prefix_gives_the_plain_forward_and_its_gradients(make):
    """Training runs each distinct prompt once and shares its KV across rows: same outputs and prompt gradients
    as prepending the prompt to every row (right padding, rows of two tasks interleaved)."""
    from conftest import tiny_llama_backbone
    from test_generation import tiny_gpt2_backbone

    backbone = tiny_llama_backbone() if make == "llama" else tiny_gpt2_backbone()
    encoded = encode_tasks([synthetic_task("polarity", 8), synthetic_task("topic", 8)], backbone.tokenizer, 32)
    batch = collate(encoded, [(0, 0), (1, 3), (0, 5), (1, 1), (0, 2)])
    assert (batch.attention_mask == 0).any(), "the test needs rows of different lengths"
    base = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for shared in (False, True):
        prompts = base.clone().requires_grad_(True)
        out = adapter_for("causal", shared_prefix=shared).forward(backbone.model, prompts[batch.task_ids],
                                                                  batch.input_ids, batch.attention_mask)
        real = batch.attention_mask.bool()
        (out.features.square().sum() + out.hidden[real].square().mean()).backward()
        results.append((out.features, out.hidden[real], prompts.grad))
    for plain, shared in zip(*results):
        torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    assert results[0][2].abs().sum() > 0
