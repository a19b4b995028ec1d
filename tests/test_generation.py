"""Generation on decoder-only backbones: the KV-cache graph and the runtime's loop against PyTorch (tiny Llama, GPT-2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import VOCAB, make_tokenizer, tiny_llama_backbone
from mpt_edge.backbones import Backbone
from mpt_edge.bundle_source import backbone_facts
from mpt_edge_export.bundle_writer import BundleSource, ExportOptions, ExportTask, write_bundle
from mpt_edge_export.families.causal.graphs import export_decoder
from mpt_edge_export.families import adapter_for
from mpt_edge_runtime import InputError, SamplingParams, load
from mpt_edge_runtime.generation import DecoderSession, decode, prefill, prompt_cache
from mpt_edge_runtime.session import GraphSession

PROMPT_LENGTH = 3


def tiny_gpt2_backbone() -> Backbone:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3,
                        eos_token_id=3, bos_token_id=3)
    return Backbone("tiny-gpt2", "causal", GPT2LMHeadModel(config).eval().requires_grad_(False),
                    make_tokenizer(bert=False), None)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    """A tiny backbone, its exported generation graph opened by the runtime, and two task prompts."""
    backbone = tiny_llama_backbone() if request.param == "llama" else tiny_gpt2_backbone()
    path = tmp_path_factory.mktemp(request.param) / "decoder.onnx"
    export_decoder(backbone.model, path)
    dim = backbone.model.get_input_embeddings().embedding_dim
    decoder = DecoderSession.open(GraphSession.open(path, "cpu"), dim)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randn(PROMPT_LENGTH, dim, generator=generator) for _ in range(2)]
    return backbone, decoder, prompts


def ids_of(backbone, text: str) -> list[int]:
    return backbone.tokenizer.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def torch_greedy(model, prompt: torch.Tensor, ids: list[int], steps: int) -> list[int]:
    """The reference: no cache, the whole [prompt | tokens | generated] sequence recomputed every step."""
    out = list(ids)
    for _ in range(steps):
        embeds = torch.cat([prompt[None], model.get_input_embeddings()(torch.tensor([out]))], dim=1)
        logits = model(inputs_embeds=embeds).logits[0, -1]
        out.append(int(logits.argmax()))
    return out[len(ids):]


def runtime_greedy(decoder, rows, steps: int) -> list[list[int]]:
    tokens = np.stack(list(decode(decoder, rows, SamplingParams(max_new_tokens=steps))), axis=1)
    return tokens.tolist()


TEXTS = ["the film was really good", "bad", "a story and it is quite dull and the plot"]


def test_greedy_equals_pytorch_token_for_token_batch_one_and_padded_batches(lm):
    backbone, decoder, prompts = lm
    caches = [prompt_cache(decoder, p.numpy()) for p in prompts]
    rows = [(caches[0], ids_of(backbone, t)) for t in TEXTS]
    expected = [torch_greedy(backbone.model, prompts[0], ids, 6) for _, ids in rows]
    assert runtime_greedy(decoder, rows[:1], 6) == expected[:1]
    assert runtime_greedy(decoder, rows, 6) == expected


def test_mixed_task_batch_equals_per_task_runs(lm):
    backbone, decoder, prompts = lm
    caches = [prompt_cache(decoder, p.numpy()) for p in prompts]
    rows = [(caches[k % 2], ids_of(backbone, t)) for k, t in enumerate(TEXTS)]
    alone = [runtime_greedy(decoder, [row], 5)[0] for row in rows]
    assert runtime_greedy(decoder, rows, 5) == alone
    assert alone[1] == torch_greedy(backbone.model, prompts[1], rows[1][1], 5)


def test_cached_prompt_kv_gives_the_logits_of_prompt_plus_input_from_scratch(lm):
    backbone, decoder, prompts = lm
    ids = np.array([ids_of(backbone, TEXTS[0])])
    length, n = PROMPT_LENGTH, ids.shape[1]
    cached_logits, cached_features, *_ = prefill(decoder, [(prompt_cache(decoder, prompts[0].numpy()), ids[0].tolist())])
    scratch_logits, scratch_features, _ = decoder.step(ids, np.ones((1, length + n), np.int64),
                                                       np.arange(length + n)[None], prompts[0].numpy()[None],
                                                       decoder.empty_past(1))
    np.testing.assert_allclose(cached_logits, scratch_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cached_features, scratch_features, atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_and_top_k_one_is_greedy(lm):
    backbone, decoder, prompts = lm
    rows = [(prompt_cache(decoder, prompts[0].numpy()), ids_of(backbone, t)) for t in TEXTS]
    sample = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=3)
    first = np.stack(list(decode(decoder, rows, sample)))
    assert np.array_equal(first, np.stack(list(decode(decoder, rows, sample))))
    top1 = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1, seed=1)
    assert np.stack(list(decode(decoder, rows, top1)), axis=1).tolist() == runtime_greedy(decoder, rows, 6)


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"stop": [""]}, "stop"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"top_k": 1.5}, "top_k"),
])
def test_bad_sampling_options_are_clear_errors(options, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**options)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A causal bundle with a generate task, a second generate task and a classify task, all with a KV cache."""
    backbone = tiny_llama_backbone()
    dim = backbone.model.get_input_embeddings().embedding_dim
    generator = torch.Generator().manual_seed(3)
    shared = (torch.randn(PROMPT_LENGTH, dim, generator=generator) * 0.5).numpy()
    head = backbone.model.get_output_embeddings().weight[[VOCAB.index("negative"), VOCAB.index("positive")]].numpy()

    def task(name, kind, seed):
        g = torch.Generator().manual_seed(seed)
        u, v = 1 + 0.3 * torch.randn(PROMPT_LENGTH, 1, generator=g), 1 + 0.3 * torch.randn(1, dim, generator=g)
        spec = {"name": name, "kind": kind, "template": "{text} :", "group": 0, "max_length": 16,
                "labels": ["negative", "positive"] if kind == "classify" else [],
                "verbalizers": ["negative", "positive"] if kind == "classify" else []}
        weight = head if kind == "classify" else np.zeros((0, dim), np.float32)
        return ExportTask(spec, u.numpy(), v.numpy(), weight, np.zeros(len(weight), np.float32))

    source = BundleSource("causal", {**backbone_facts(backbone)}, backbone.model, adapter_for("causal"),
                          backbone.tokenizer, [shared], [task("echo", "generate", 1), task("chat", "generate", 2),
                                                         task("mood", "classify", 3)])
    out = tmp_path_factory.mktemp("bundle") / "gen"
    manifest = write_bundle(source, out, ExportOptions(max_length=16))
    return backbone, out, manifest


def composed(backbone, out, name) -> torch.Tensor:
    return torch.from_numpy(load(out, "cpu").task(name).prompt)


def test_export_writes_the_generation_graph_with_parity(bundle):
    _, out, manifest = bundle
    assert (out / "decoder.onnx").is_file() and not (out / "model.onnx").exists()   # one graph serves all tasks
    assert manifest["graph"]["kind"] == "decoder" and manifest["graph"]["file"] == "decoder.onnx"
    report = manifest["parity"]["fp32"]
    assert report["max_rel_diff"] <= 1e-3 and {c["prompt"] for c in report["cases"]} == {0, PROMPT_LENGTH}
    assert any(c["batch"] > 1 and c["sequence"] == 1 for c in report["cases"])  # batched decode steps


def test_engine_generate_equals_pytorch_greedy_and_streams_the_same_text(bundle):
    backbone, out, _ = bundle
    engine = load(out, "cpu")
    texts = ["the film was good", "bad plot"]
    five = SamplingParams(max_new_tokens=5)
    got = engine.generate("echo", texts, five)
    prompt = composed(backbone, out, "echo")
    for text, answer in zip(texts, got):
        ids = ids_of(backbone, f"{text} :")
        assert answer == backbone.tokenizer.decode(torch_greedy(backbone.model, prompt, ids, 5))
    assert "".join(engine.stream("echo", texts[0], five)) == got[0]
    mixed = engine.generate_batch([("echo", texts[0]), ("chat", texts[1]), ("echo", texts[1])], five)
    assert mixed == [got[0], engine.generate("chat", [texts[1]], five)[0], got[1]]
    assert engine.generate("echo", texts, max_new_tokens=5) == got   # the options as keywords: the same call


def test_engine_stop_strings_end_the_text_before_them(bundle):
    _, out, _ = bundle
    engine = load(out, "cpu")
    full = engine.generate("echo", ["the film"], max_new_tokens=6)[0]
    words = full.split()
    assert len(words) >= 3, full
    stopped = engine.generate("echo", ["the film"], max_new_tokens=6, stop=[words[2]])[0]
    assert stopped == full[:full.index(words[2])]
    assert "".join(engine.stream("echo", "the film", max_new_tokens=6, stop=words[2])) == stopped


def test_engine_classifies_from_the_cached_prompt_like_the_features_graph(bundle, tmp_path):
    backbone, out, _ = bundle
    engine = load(out, "cpu")
    assert engine.model.generates and engine.task("mood").prefix
    texts = ["the film was good", "awful", "a very dull story"]
    predictions = engine.classify("mood", texts)
    prompt = composed(backbone, out, "mood")
    head = backbone.model.get_output_embeddings().weight[[VOCAB.index("negative"), VOCAB.index("positive")]]
    for text, prediction in zip(texts, predictions):
        embeds = torch.cat([prompt[None], backbone.model.get_input_embeddings()(torch.tensor([ids_of(backbone, f"{text} :")]))], 1)
        with torch.no_grad():
            probs = torch.softmax(backbone.model.base_model(inputs_embeds=embeds).last_hidden_state[0, -1] @ head.T, -1)
        assert prediction.probabilities["positive"] == pytest.approx(float(probs[1]), abs=1e-4)


def test_engine_bad_generation_input_is_one_clear_error(bundle):
    _, out, _ = bundle
    engine = load(out, "cpu")
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.generate("echo", ["x"], max_new_tokens=0)
    with pytest.raises(InputError, match="exceed the backbone's 128 positions"):
        engine.generate("echo", ["the film"], max_new_tokens=200)
    with pytest.raises(InputError, match="classify task"):
        engine.generate("mood", ["the film"])
    with pytest.raises(InputError, match="generate task"):
        engine.classify("echo", ["the film"])
    with pytest.raises(InputError, match="list of strings"):
        engine.generate("echo", "the film")
    long = " ".join(["film"] * 500)  # truncated to the task's max_length (16 tokens), as documented
    assert isinstance(engine.generate("echo", [long], max_new_tokens=2)[0], str)
