"""Multi-token verbalizers (`verbalizer_tokens = "all"`): a label scores the log-probability of its whole word."""

from __future__ import annotations

import pytest
import torch

from conftest import synthetic_rows
from mpt_edge import stages
from mpt_edge.batching import collate, encode_tasks
from mpt_edge.bundle_source import bundle_source
from mpt_edge.prompt import PromptConfig
from mpt_edge.tasks import Example, TaskData, TaskError, TaskSpec
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import fixed_prompts, load_trained
from mpt_edge_export.bundle_writer import write_bundle
from mpt_edge_runtime import load

SPEC = TaskSpec("shades", ("negative", "positive"), template="Review : {text} Sentiment :",
                verbalizers=("very bad", "very good really"), verbalizer_tokens="all")


def shades_task(count: int = 48, seed: int = 0) -> TaskData:
    return TaskData(SPEC, [Example({"text": r["text"]}, SPEC.labels.index(r["label"]))
                           for r in synthetic_rows("polarity", count, seed)])


def ids_of(backbone, text: str) -> list[int]:
    return backbone.tokenizer.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def brute_force(model, prompt: torch.Tensor, ids: list[int], label: list[int]) -> float:
    """Σ log p(label token j | prompt, input, label tokens < j), from one unpadded forward."""
    sequence = torch.tensor([ids + label])
    embeds = torch.cat([prompt[None], model.get_input_embeddings()(sequence)], dim=1)
    log_probs = torch.log_softmax(model(inputs_embeds=embeds).logits[0], dim=-1)
    start = prompt.shape[0] + len(ids) - 1
    return float(sum(log_probs[start + j, token] for j, token in enumerate(label)))


def test_first_token_scoring_refuses_labels_that_share_a_first_token(llama):
    first = TaskSpec("shades", SPEC.labels, template=SPEC.template, verbalizers=SPEC.verbalizers)
    with pytest.raises(TaskError, match="start with the same token"):
        stages.classifier_for(llama, [first], None)
    with pytest.raises(TaskError, match="verbalizer_tokens"):
        TaskSpec("x", ("a", "b"), verbalizer_tokens="some")


def test_sequence_scores_equal_a_brute_force_forward_on_padded_batches(llama):
    encoded = encode_tasks([shades_task(6)], llama.tokenizer, 32)
    batch = collate(encoded, [(0, i) for i in range(6)])        # rows of different lengths, right-padded
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    classifier = stages.classifier_for(llama, [SPEC], None)
    logits, _ = classifier(prompt.expand(6, -1, -1), batch)
    labels = [ids_of(llama, " " + w) for w in SPEC.verbalizers]
    assert [len(t) for t in labels] == [2, 3]
    for row in range(6):
        for c, label in enumerate(labels):
            expected = brute_force(llama.model, prompt, encoded[0].ids[row], label)
            assert float(logits[row, c]) == pytest.approx(expected, abs=1e-4)


def test_training_and_the_runtime_agree_on_whole_sequence_labels(llama, tmp_path):
    train = encode_tasks([shades_task(48)], llama.tokenizer, 32)
    cfg = TrainConfig(steps=20, batch_size=8, max_length=32, checkpoint_every=10, lr_prompt=0.3)
    index = fit(stages.prompt_tuning("pt", llama, train, cfg, PromptConfig(length=4)), train, cfg, tmp_path / "pt",
                progress=False)
    assert index["history"][-1]["loss"] < index["history"][0]["loss"]
    trained = load_trained(tmp_path / "pt")
    manifest = write_bundle(bundle_source(trained, llama), tmp_path / "bundle")
    assert manifest["graph"]["kind"] == "decoder"   # whole-sequence labels are scored with the generation graph
    engine = load(tmp_path / "bundle", "cpu")
    test = shades_task(8, seed=4)
    predictions = engine.classify("shades", [e.fields["text"] for e in test.examples])
    encoded = encode_tasks([test], llama.tokenizer, 32)
    batch = collate(encoded, [(0, i) for i in range(8)])
    prompt = fixed_prompts(trained)[0]
    with torch.no_grad():
        expected = torch.softmax(stages.classifier_for(llama, [SPEC], None)(prompt.expand(8, -1, -1), batch)[0], -1)
    for p, row in zip(predictions, expected):
        assert p.probabilities["positive"] == pytest.approx(float(row[1]), abs=1e-4)


def test_encoders_refuse_whole_sequence_verbalizers(bert):
    with pytest.raises(TaskError, match="causal or seq2seq backbone"):
        stages.classifier_for(bert, [SPEC], None)
