"""Seq2seq generation bundles (tiny random T5): encoder + step-0 graph and a KV-cache decoder step graph, checked
against PyTorch greedy decoding and label scoring, batched and with mixed tasks; trained → exported → served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import VOCAB, tiny_t5_backbone
from mpt_edge import stages
from mpt_edge.batching import encode_tasks, eos_id
from mpt_edge.bundle_source import backbone_facts, bundle_source
from mpt_edge.evaluate import evaluate_trained
from mpt_edge.prompt import PromptConfig
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import BundleSource, ExportOptions, ExportTask, write_bundle
from mpt_edge_export.families import adapter_for
from mpt_edge_runtime import load
from mpt_edge_runtime.text import encode_example
from test_generate_training import naming_task

PROMPT_LENGTH = 3
SEQUENCES = [[VOCAB.index("very"), VOCAB.index("sad")], [VOCAB.index("happy")]]   # " very sad" / " happy"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Two generate tasks, a first-token classify task and a whole-sequence classify task on one T5."""
    backbone = tiny_t5_backbone()
    dim = backbone.model.get_input_embeddings().embedding_dim
    shared = (torch.randn(PROMPT_LENGTH, dim, generator=torch.Generator().manual_seed(3)) * 0.5).numpy()
    head = backbone.model.get_output_embeddings().weight[[VOCAB.index("negative"), VOCAB.index("positive")]].numpy()

    def task(name, kind, seed, **extra):
        g = torch.Generator().manual_seed(seed)
        u, v = 1 + 0.3 * torch.randn(PROMPT_LENGTH, 1, generator=g), 1 + 0.3 * torch.randn(1, dim, generator=g)
        labels = ["negative", "positive"] if kind == "classify" else []
        spec = {"name": name, "kind": kind, "template": "{text} :", "group": 0, "max_length": 16, "labels": labels,
                "verbalizers": labels, **extra}
        weight = head if kind == "classify" else np.zeros((0, dim), np.float32)
        return ExportTask(spec, u.numpy(), v.numpy(), weight, np.zeros(len(weight), np.float32))

    tasks = [task("echo", "generate", 1), task("chat", "generate", 2), task("mood", "classify", 3),
             task("moods", "classify", 4, verbalizer_tokens="all", verbalizer_ids=SEQUENCES)]
    source = BundleSource("seq2seq", backbone_facts(backbone), backbone.model, adapter_for("seq2seq"),
                          backbone.tokenizer, [shared], tasks)
    out = tmp_path_factory.mktemp("bundle") / "t5"
    return backbone, out, write_bundle(source, out, ExportOptions(max_length=16))


def ids_of(backbone, text: str) -> list[int]:
    return encode_example(backbone.tokenizer, "{text} :", {"text": text}, 16)


def torch_greedy(model, prompt: torch.Tensor, ids: list[int], steps: int, eos: int = 3) -> list[int]:
    """Greedy decoding with the model's own forward on [prompt | input] embeddings, up to eos (excluded)."""
    embeds = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(ids))])[None]
    decoder = torch.zeros((1, 1), dtype=torch.long)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(inputs_embeds=embeds, decoder_input_ids=decoder).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            decoder = torch.cat([decoder, torch.tensor([[token]])], dim=1)
    return out


def test_export_writes_both_graphs_with_parity(bundle):
    _, out, manifest = bundle
    assert (out / "encoder.onnx").is_file() and (out / "decoder.onnx").is_file() and not (out / "model.onnx").exists()
    graph = manifest["graph"]
    assert graph["kind"] == "seq2seq" and graph["file"] == "encoder.onnx" and graph["decoder_file"] == "decoder.onnx"
    report = manifest["parity"]["fp32"]
    assert report["max_rel_diff"] <= 1e-3 and {c["graph"] for c in report["cases"]} == {"prefill", "step"}
    assert any(c["graph"] == "step" and c["batch"] > 1 and c["past"] > 1 for c in report["cases"])


def test_greedy_generation_equals_pytorch_batch_one_and_padded(bundle):
    backbone, out, _ = bundle
    engine = load(out, "cpu")
    texts = ["the film was really good", "bad plot"]
    got = engine.generate("echo", texts, max_new_tokens=6)
    prompt = torch.from_numpy(engine.task("echo").prompt)
    expected = [backbone.tokenizer.decode(torch_greedy(backbone.model, prompt, ids_of(backbone, t), 6)) for t in texts]
    assert got == expected and any(expected)
    assert engine.generate("echo", texts[1:], max_new_tokens=6) == expected[1:]       # batch 1 agrees with padded
    assert "".join(engine.stream("echo", texts[0], max_new_tokens=6)) == got[0]


def test_mixed_task_batches_equal_per_task_runs(bundle):
    _, out, _ = bundle
    engine = load(out, "cpu")
    mixed = engine.generate_batch([("echo", "good film"), ("chat", "bad plot"), ("echo", "bad plot")], max_new_tokens=5)
    assert mixed == [engine.generate("echo", ["good film"], max_new_tokens=5)[0],
                     engine.generate("chat", ["bad plot"], max_new_tokens=5)[0],
                     engine.generate("echo", ["bad plot"], max_new_tokens=5)[0]]
    both = engine.run([("mood", "good film"), ("moods", "bad plot"), ("mood", "bad plot")])
    alone = [engine.classify("mood", ["good film"])[0], engine.classify("moods", ["bad plot"])[0],
             engine.classify("mood", ["bad plot"])[0]]
    for a, b in zip(both, alone):
        assert a.label == b.label and a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_label_scores_equal_pytorch(bundle):
    backbone, out, _ = bundle
    engine = load(out, "cpu")
    adapter = adapter_for("seq2seq")
    texts = ["good film", "the plot was awful and dull"]
    for name in ("mood", "moods"):
        prompt = torch.from_numpy(engine.task(name).prompt)
        for text in texts:
            ids = torch.tensor([ids_of(backbone, text)])
            with torch.no_grad():
                if name == "mood":
                    features = adapter.forward(backbone.model, prompt[None], ids, torch.ones_like(ids)).features
                    logits = adapter.label_logits(backbone.model, features, torch.tensor([[VOCAB.index("negative"),
                                                  VOCAB.index("positive")]]), torch.ones((1, 2), dtype=torch.bool))[0]
                else:
                    label_ids = torch.tensor([[SEQUENCES[0], [SEQUENCES[1][0], 0]]])
                    mask = torch.tensor([[[True, True], [True, False]]])
                    logits = adapter.sequence_log_probs(backbone.model, prompt[None], ids, torch.ones_like(ids),
                                                        label_ids, mask)[0]
            (prediction,) = engine.classify(name, [text])
            expected = torch.softmax(logits, -1).numpy()
            np.testing.assert_allclose([prediction.probabilities[l] for l in ("negative", "positive")], expected, atol=1e-5)


def test_prompt_tuned_t5_generates_in_the_runtime_what_eval_measures(tmp_path):
    t5 = tiny_t5_backbone()
    encoded = encode_tasks([naming_task(64)], t5.tokenizer, 32, eos_id(t5.model))
    cfg = TrainConfig(steps=200, batch_size=8, max_length=32, checkpoint_every=100, lr_prompt=0.3)
    index = fit(stages.prompt_tuning("pt", t5, encoded, cfg, PromptConfig(length=8)), encoded, cfg, tmp_path / "pt",
                progress=False)
    assert index["history"][-1]["loss"] < 0.5 * index["history"][0]["loss"]
    trained = load_trained(tmp_path / "pt")
    test = [naming_task(24, seed=9)]
    scores = evaluate_trained(t5, trained, test, max_length=32)["naming"]
    assert scores["exact_match"] > 0.3
    write_bundle(bundle_source(trained, t5), tmp_path / "bundle", ExportOptions(max_length=32))
    engine = load(tmp_path / "bundle", "cpu")
    answers = engine.generate("naming", [e.fields["text"] for e in test[0].examples], max_new_tokens=4)
    exact = sum(a.strip() == e.target for a, e in zip(answers, test[0].examples)) / len(answers)
    assert exact == pytest.approx(scores["exact_match"])   # teacher-forced EM is greedy EM
