"""Training `generate` tasks on a tiny causal backbone: targets, masks, losses, distillation, and the runtime."""

from __future__ import annotations

import json

import pytest

from conftest import synthetic_rows, synthetic_task
from mpt_edge import stages
from mpt_edge.batching import collate, encode_tasks, eos_id
from mpt_edge.bundle_source import bundle_source
from mpt_edge.evaluate import evaluate_trained
from mpt_edge.prompt import PromptConfig
from mpt_edge.tasks import Example, TaskData, TaskError, TaskSpec, load_examples
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import write_bundle
from mpt_edge_runtime import load

PROMPT = PromptConfig(length=4)
ANSWERS = {"negative": "sad gloomy", "positive": "happy joyful"}   # two-token answers (+ eos)
NAMING = TaskSpec("naming", (), kind="generate", template="Review : {text} Mood :")


def naming_task(count: int = 48, seed: int = 0) -> TaskData:
    """Generate the mood words that go with a review's polarity."""
    return TaskData(NAMING, [Example({"text": r["text"]}, -1, ANSWERS[r["label"]])
                             for r in synthetic_rows("polarity", count, seed)])


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 40, "batch_size": 8, "max_length": 32, "checkpoint_every": 20, "lr_prompt": 0.3,
                          **kw})


def test_generate_specs_and_jsonl(tmp_path):
    with pytest.raises(TaskError, match="no labels"):
        TaskSpec("x", ("a", "b"), kind="generate")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "good film", "target": "happy"}) + "\n")
    assert load_examples(path, NAMING)[0] == Example({"text": "good film"}, -1, "happy")
    path.write_text(json.dumps({"text": "good film", "label": "happy"}) + "\n")
    with pytest.raises(TaskError, match=r"train.jsonl:1: missing field\(s\) \['target'\]"):
        load_examples(path, NAMING)


def test_collate_puts_target_and_eos_after_the_input_and_masks_them(llama):
    encoded = encode_tasks([naming_task(4), synthetic_task("polarity", 4)], llama.tokenizer, 32, eos_id=3)
    batch = collate(encoded, [(0, 0), (1, 0)])
    row = encoded[0].ids[0]
    target = encoded[0].targets[0]
    assert target[-1] == 3 and len(target) == 3
    assert batch.input_ids[0, :len(row) + 3].tolist() == row + target
    assert batch.target_mask[0].nonzero()[:, 0].tolist() == list(range(len(row), len(row) + 3))
    assert not batch.target_mask[1].any() and batch.labels.tolist() == [-1, encoded[1].labels[0]]
    assert batch.input_mask[0].sum() == len(row)


def test_prompt_tuning_learns_to_generate_and_the_runtime_agrees(llama, tmp_path):
    train = [naming_task(64)]
    encoded = encode_tasks(train, llama.tokenizer, 32, eos_id(llama.model))
    cfg = config(steps=150, checkpoint_every=50)
    index = fit(stages.prompt_tuning("pt", llama, encoded, cfg, PromptConfig(length=8)), encoded, cfg, tmp_path / "pt",
                progress=False)
    assert index["history"][-1]["loss"] < 0.5 * index["history"][0]["loss"]
    trained = load_trained(tmp_path / "pt")
    test = [naming_task(24, seed=9)]
    scores = evaluate_trained(llama, trained, test, max_length=32)["naming"]
    assert scores["exact_match"] > 0.3 and scores["token_accuracy"] > scores["exact_match"]

    # teacher-forced exact match is greedy exact match: the runtime's greedy answers must score the same
    write_bundle(bundle_source(trained, llama), tmp_path / "bundle")
    engine = load(tmp_path / "bundle", "cpu")
    answers = engine.generate("naming", [e.fields["text"] for e in test[0].examples], max_new_tokens=4)
    exact = sum(a.strip() == e.target for a, e in zip(answers, test[0].examples)) / len(answers)
    assert exact == pytest.approx(scores["exact_match"])


def test_source_stage_distils_generate_and_classify_tasks_together(llama, tmp_path):
    src = encode_tasks([naming_task(), synthetic_task("topic")], llama.tokenizer, 32, eos_id(llama.model))
    cfg = config(steps=4)
    fit(stages.prompt_tuning("teachers", llama, src, cfg, PROMPT), src, cfg, tmp_path / "t", progress=False)
    teachers = load_trained(tmp_path / "t")
    plan = stages.source(llama, src, teachers, config(steps=10), rank=2)
    loss, parts = plan.loss_fn(collate(src, [(0, 0), (0, 1), (1, 0), (1, 1)]))
    loss.backward()
    assert parts["kl"] > 0 and parts["mse"] > 0 and parts["ce"] > 0
    assert plan.prompt.shared[0].grad is not None
    assert all(u.grad is not None and u.grad.abs().sum() > 0 for u in plan.prompt.u)   # both tasks' factors learn
    first, last = (lambda h: (h[0]["loss"], h[-1]["loss"]))(
        fit(plan, src, config(steps=10, checkpoint_every=5), tmp_path / "s", progress=False)["history"])
    assert last < first


def test_answer_distillation_is_zero_when_the_student_is_the_teacher(llama, tmp_path):
    src = encode_tasks([naming_task()], llama.tokenizer, 32, eos_id(llama.model))
    cfg = config(steps=3)
    fit(stages.prompt_tuning("teachers", llama, src, cfg, PROMPT), src, cfg, tmp_path / "t", progress=False)
    plan = stages.source(llama, src, load_trained(tmp_path / "t"), cfg, rank=1)  # one task: P* = its prompt
    _, parts = plan.loss_fn(collate(src, [(0, 0), (0, 1), (0, 2)]))
    assert parts["kl"] == pytest.approx(0, abs=1e-6) and parts["mse"] == pytest.approx(0, abs=1e-6)


def test_generate_tasks_need_a_causal_or_seq2seq_backbone(bert):
    encoded = encode_tasks([naming_task(8)], bert.tokenizer, 32)
    with pytest.raises(TaskError, match="need a causal or seq2seq backbone; .tiny-bert. is encoder"):
        stages.prompt_tuning("pt", bert, encoded, config(), PROMPT)
