"""The seq2seq family (tiny random T5): prompt on the encoder only, label scoring and teacher forcing through the
decoder checked against the model's own forward, distillation over encoder and decoder, export + runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import SPECS, synthetic_rows, synthetic_task, tiny_t5_backbone
from mpt_edge import stages
from mpt_edge.batching import collate, encode_tasks, eos_id
from mpt_edge.bundle_source import bundle_source
from mpt_edge.evaluate import evaluate_trained, evaluate_zero_shot
from mpt_edge.prompt import PromptConfig
from mpt_edge.scoring import verbalizer_ids
from mpt_edge.tasks import TaskSpec
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import ExportError, ExportOptions, write_bundle
from test_generate_training import naming_task
import mpt_edge_runtime as mer

CFG = TrainConfig(steps=4, batch_size=4, max_length=24, checkpoint_every=4)


def reference_logits(model, prompt, input_ids, attention_mask, decoder_ids):
    """The model's own forward with [prompt | input] as encoder embeddings: logits (B, m, V)."""
    embeds = torch.cat([prompt, model.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)
    return model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_label_logits_equal_the_models_first_decoder_step(tied):
    backbone = tiny_t5_backbone(tied)
    tasks = [synthetic_task("polarity", 6), synthetic_task("topic", 6)]
    encoded = encode_tasks(tasks, backbone.tokenizer, 24)
    batch = collate(encoded, [(0, 0), (1, 1), (0, 2), (1, 3)])   # mixed tasks, padded rows
    prompt = torch.randn(4, 3, 32)
    classifier = stages.classifier_for(backbone, [t.spec for t in tasks], None)
    logits, out = classifier(prompt, batch)
    start = torch.zeros((4, 1), dtype=torch.long)
    full = reference_logits(backbone.model, prompt, batch.input_ids, batch.attention_mask, start)[:, 0]
    for row, task in enumerate(batch.task_ids.tolist()):
        ids = verbalizer_ids(tasks[task].spec, backbone.tokenizer)
        torch.testing.assert_close(logits[row, :len(ids)], full[row, ids], rtol=1e-5, atol=1e-5)
    assert out.hidden.shape == (4, batch.input_ids.shape[1], 32) and out.decoder_hidden.shape == (4, 1, 32)


def test_generate_rows_train_the_decoder_on_the_target_only(t5):
    encoded = encode_tasks([naming_task(6), synthetic_task("polarity", 6)], t5.tokenizer, 24, eos_id(t5.model))
    batch = collate(encoded, [(0, 0), (1, 0), (0, 1)])
    prompt = torch.randn(3, 3, 32)
    classifier = stages.classifier_for(t5, [e.spec for e in encoded], None)
    _, out = classifier(prompt, batch)
    logits, tokens = classifier.answers(out, batch)
    for row in (0, 2):   # generate rows: the encoder sees only the input, the decoder [start | target[:-1]]
        target = batch.input_ids[row][batch.target_mask[row]]
        inputs = batch.input_ids[row:row + 1][:, batch.input_mask[row].bool()]
        decoder_ids = torch.cat([torch.zeros(1, dtype=torch.long), target[:-1]])[None]
        ref = reference_logits(t5.model, prompt[row:row + 1], inputs, torch.ones_like(inputs), decoder_ids)[0]
        first = 0 if row == 0 else len(encoded[0].targets[0])
        # logits reach ~27 here; padding changes float32 summation order (in float64 they agree to 1e-13)
        torch.testing.assert_close(logits[first:first + len(target)], ref, rtol=1e-4, atol=1e-3)
        assert tokens[first:first + len(target)].tolist() == target.tolist() and target[-1] == 3   # ends with eos
    assert len(tokens) == len(encoded[0].targets[0]) + len(encoded[0].targets[1])


def test_whole_sequence_verbalizers_sum_the_decoders_log_probabilities(t5):
    spec = TaskSpec("moods", ("sad", "happy"), template="{text} Mood :", verbalizers=("really sad", "very happy"),
                    verbalizer_tokens="all")
    from mpt_edge.tasks import Example, TaskData

    task = TaskData(spec, [Example({"text": r["text"]}, i % 2) for i, r in enumerate(synthetic_rows("mood", 3, 1))])
    encoded = encode_tasks([task], t5.tokenizer, 24)
    batch = collate(encoded, [(0, 0), (0, 1), (0, 2)])
    prompt = torch.randn(3, 3, 32)
    logits, _ = stages.classifier_for(t5, [spec], None)(prompt, batch)
    for c, words in enumerate(spec.label_words):
        label = torch.tensor(t5.tokenizer.encode(" " + words, add_special_tokens=False).ids)
        decoder_ids = torch.cat([torch.zeros(1, dtype=torch.long), label[:-1]])[None].expand(3, -1)
        ref = reference_logits(t5.model, prompt, batch.input_ids, batch.attention_mask, decoder_ids)
        expected = F.log_softmax(ref, -1).gather(-1, label[None, :, None].expand(3, -1, 1)).sum(dim=(1, 2))
        torch.testing.assert_close(logits[:, c], expected, rtol=1e-4, atol=1e-4)


def test_stages_train_and_distil_over_encoder_and_decoder(t5, tmp_path):
    names = ("polarity", "topic")
    tasks = [synthetic_task(n, 16) for n in names] + [naming_task(16)]
    encoded = encode_tasks(tasks, t5.tokenizer, 24, eos_id(t5.model))
    cfg = TrainConfig(steps=6, batch_size=6, max_length=24, checkpoint_every=6, lr_prompt=0.3)
    fit(stages.prompt_tuning("teachers", t5, encoded, cfg, PromptConfig(length=3)), encoded, cfg, tmp_path / "t",
        progress=False)
    plan = stages.source(t5, encoded, load_trained(tmp_path / "t"), cfg, rank=2)
    batch = collate(encoded, [(0, 0), (1, 0), (2, 0), (2, 1)])
    _, parts = plan.loss_fn(batch)
    assert parts["mse"] > 0 and parts["kl"] > 0
    index = fit(plan, encoded, cfg, tmp_path / "s", progress=False)
    assert np.isfinite(index["history"][-1]["loss"])
    target = encode_tasks([synthetic_task("mood", 16)], t5.tokenizer, 24)
    fit(stages.target(t5, target, load_trained(tmp_path / "s"), cfg, mode="factors"), target, cfg, tmp_path / "m",
        progress=False)
    scores = evaluate_trained(t5, load_trained(tmp_path / "m"), [synthetic_task("mood", 8, seed=3)], max_length=24)
    assert 0 <= scores["mood"]["accuracy"] <= 1
    assert set(evaluate_zero_shot(t5, [synthetic_task("mood", 8)], max_length=24)) == {"mood"}


def test_export_and_runtime_classify_like_pytorch(t5, tmp_path):
    tasks = [synthetic_task("polarity", 16), synthetic_task("topic", 16)]
    encoded = encode_tasks(tasks, t5.tokenizer, 24)
    fit(stages.prompt_tuning("pt", t5, encoded, CFG, PromptConfig(length=3)), encoded, CFG, tmp_path / "pt",
        progress=False)
    trained = load_trained(tmp_path / "pt")
    manifest = write_bundle(bundle_source(trained, t5), tmp_path / "bundle")
    assert manifest["family"] == "seq2seq" and manifest["graph"]["kind"] == "features"
    engine = mer.load(tmp_path / "bundle", device="cpu")
    for k, name in enumerate(("polarity", "topic")):
        texts = [r["text"] for r in synthetic_rows(name, 5, seed=7)]
        probabilities = np.array([[p.probabilities[label] for label in SPECS[name].labels]
                                  for p in engine.classify(name, texts)])
        batch = collate(encode_tasks([tasks[k].__class__(SPECS[name], [e for e in synthetic_task(name, 5, 7).examples])],
                                     t5.tokenizer, 24), [(0, i) for i in range(5)])
        logits, _ = stages.classifier_for(t5, [SPECS[name]], None)(trained.prompt.fold()[k].expand(5, -1, -1), batch)
        np.testing.assert_allclose(probabilities, torch.softmax(logits[:, :len(SPECS[name].labels)], -1).numpy(), atol=1e-4)


def test_generate_tasks_need_the_generation_graphs(t5, tmp_path):
    encoded = encode_tasks([naming_task(8)], t5.tokenizer, 24, eos_id(t5.model))
    fit(stages.prompt_tuning("pt", t5, encoded, CFG, PromptConfig(length=3)), encoded, CFG, tmp_path / "pt",
        progress=False)
    with pytest.raises(ExportError, match=r"\['naming'\] generate .* drop --no-kv-cache"):
        write_bundle(bundle_source(load_trained(tmp_path / "pt"), t5), tmp_path / "bundle", ExportOptions(kv_cache=False))
    assert not (tmp_path / "bundle").exists()


def test_a_local_t5_folder_trains_exports_and_runs_from_the_command_line(workspace, tmp_path):
    from test_cli import FAST, invoke

    folder = tmp_path / "tiny-t5"
    backbone = tiny_t5_backbone()
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save(str(folder / "tokenizer.json"))
    common = ["--backbone", folder, "--data", workspace / "data"]
    result = invoke("train", "target", "--method", "pt", "--tasks", "polarity", "--out", tmp_path / "pt", *common, *FAST)
    assert result.exit_code == 0, result.output
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "bundle", *common)
    assert result.exit_code == 0, result.output
    result = invoke("run", tmp_path / "bundle", "--task", "polarity", "the film was great")
    assert result.exit_code == 0 and result.output.split()[0] in ("negative", "positive"), result.output


def test_peft_seq2seq_adapter_round_trips_and_predicts_like_peft(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT interop needs the peft package")
    from mpt_edge.peft_interop import import_peft, peft_prompt_from_trained, read_peft_adapter, write_peft_adapter
    from test_peft_interop import NAMES, peft_model

    model = peft_model(tiny_t5_backbone().model, task_type=peft.TaskType.SEQ_2_SEQ_LM, num_transformer_submodules=1)
    model.save_pretrained(tmp_path / "peft")
    t5 = tiny_t5_backbone()
    import_peft(read_peft_adapter(tmp_path / "peft"), t5, [SPECS[n] for n in NAMES], tmp_path / "ours", max_length=24)
    trained = load_trained(tmp_path / "ours")
    write_peft_adapter(peft_prompt_from_trained(trained, t5), tmp_path / "back")
    from safetensors.torch import load_file

    before, after = (load_file(f / "adapter_model.safetensors") for f in (tmp_path / "peft", tmp_path / "back"))
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    reloaded = peft.PeftModel.from_pretrained(tiny_t5_backbone().model, tmp_path / "back").eval()
    write_bundle(bundle_source(trained, t5), tmp_path / "bundle")
    engine = mer.load(tmp_path / "bundle", device="cpu")
    from mpt_edge_runtime.text import encode_example

    for task_id, name in enumerate(NAMES):
        text = synthetic_rows(name, 1, seed=4)[0]["text"]
        ids = torch.tensor([encode_example(t5.tokenizer, SPECS[name].template, {"text": text}, 24)])
        with torch.no_grad():
            # PEFT drops decoder_input_ids with one transformer submodule; labels make the decoder start at [start]
            logits = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([[3]]),
                              task_ids=torch.tensor([task_id])).logits[0, 0]
        expected = torch.softmax(logits[verbalizer_ids(SPECS[name], t5.tokenizer)], -1).numpy()
        (ours,) = engine.classify(name, [text])
        np.testing.assert_allclose([ours.probabilities[label] for label in SPECS[name].labels], expected, atol=1e-4)
