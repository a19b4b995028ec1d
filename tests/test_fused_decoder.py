"""The fused causal generation graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, packed QKV) against
PyTorch on a tiny Llama with grouped KV heads: prompt prefill, ragged batches from cached prompt KV, mixed tasks,
greedy decoding token for token, quantized variants, and the bundle the exporter writes with it."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import tiny_gqa_llama
from mpt_edge.bundle_source import backbone_facts
from mpt_edge_export.bundle_writer import BundleSource, ExportOptions, ExportTask, write_bundle
from mpt_edge_export.families.causal.fused import export_fused_decoder, fusable, fused_parity_report
from mpt_edge_export.transform import op_counts
from mpt_edge_runtime import BundleError, SamplingParams, load
from mpt_edge_runtime.fused_decoder import HEADROOM, FusedDecoderSession
from mpt_edge_runtime.generation import decode, label_log_probs
from mpt_edge_runtime.session import BoundCall, GraphSession
from test_generation import TEXTS, ids_of, torch_greedy

PROMPT_LENGTH = 3


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    backbone = tiny_gqa_llama()
    path = tmp_path_factory.mktemp("fused") / "decoder.onnx"
    export_fused_decoder(backbone.model, path)
    steps = FusedDecoderSession.open(GraphSession.open(path, "cpu"), 64)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randn(PROMPT_LENGTH, 64, generator=generator) for _ in range(2)]
    return backbone, steps, prompts, path


def greedy(steps, rows, n: int) -> list[list[int]]:
    return np.stack(list(decode(steps, rows, SamplingParams(max_new_tokens=n))), axis=1).tolist()


def test_the_graph_is_made_of_the_fused_ops(fused):
    counts = op_counts(fused[3])
    assert counts["com.microsoft:GroupQueryAttention"] == 2 and counts["com.microsoft:SkipSimplifiedLayerNormalization"] == 4
    assert counts["MatMul"] == 2 * 4 and counts["Gemm"] == 1   # qkv, o, gate_up, down; the tied LM head is a Gemm
    assert counts["Split"] == 2   # gate / up
    assert "Softmax" not in counts and "Expand" not in counts


def test_parity_report_covers_prefill_ragged_batches_and_decode_steps(fused):
    backbone, _, _, path = fused
    report = fused_parity_report(backbone.model, path, PROMPT_LENGTH, 12)
    assert report["max_abs_diff"] < 1e-4, report
    assert {c["batch"] for c in report["cases"]} == {1, 3, 4} and any(c["decode_steps"] for c in report["cases"])


def test_greedy_equals_pytorch_token_for_token_batch_one_and_ragged_batches(fused):
    backbone, steps, prompts, _ = fused
    cache = steps.prefix(prompts[0].numpy())
    rows = [(cache, ids_of(backbone, t)) for t in TEXTS]
    expected = [torch_greedy(backbone.model, prompts[0], ids, 6) for _, ids in rows]
    assert greedy(steps, rows[:1], 6) == expected[:1]
    assert greedy(steps, rows, 6) == expected


def test_decoding_past_the_cache_headroom_regrows_the_buffers_and_still_equals_pytorch(fused):
    backbone, steps, prompts, _ = fused
    cache = steps.prefix(prompts[0].numpy())
    rows = [(cache, ids_of(backbone, t)) for t in TEXTS[:2]]
    n = HEADROOM + 8   # the KV buffers fill up and are doubled mid-generation: the decode call is bound anew
    assert greedy(steps, rows, n) == [torch_greedy(backbone.model, prompts[0], ids, n) for _, ids in rows]


def test_mixed_task_batch_equals_per_task_runs_and_pytorch(fused):
    backbone, steps, prompts, _ = fused
    caches = [steps.prefix(p.numpy()) for p in prompts]
    rows = [(caches[k % 2], ids_of(backbone, t)) for k, t in enumerate(TEXTS)]
    alone = [greedy(steps, [row], 5)[0] for row in rows]
    assert greedy(steps, rows, 5) == alone
    assert alone[1] == torch_greedy(backbone.model, prompts[1], rows[1][1], 5)


def test_whole_sequence_label_scores_equal_pytorch(fused):
    backbone, steps, prompts, _ = fused
    ids, labels = ids_of(backbone, TEXTS[2]), [[5, 6, 7], [8]]
    (scores,) = label_log_probs(steps, [(steps.prefix(prompts[0].numpy()), ids, labels)])
    with torch.no_grad():
        expected = []
        for label in labels:
            seq = ids + label
            embeds = torch.cat([prompts[0][None], backbone.model.get_input_embeddings()(torch.tensor([seq]))], dim=1)
            logp = torch.log_softmax(backbone.model(inputs_embeds=embeds).logits[0], dim=-1)
            start = PROMPT_LENGTH + len(ids) - 1
            expected.append(sum(float(logp[start + j, t]) for j, t in enumerate(label)))
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_models_without_a_fused_form_say_why():
    assert "multiple of 16" in fusable(tiny_gqa_llama(hidden_size=32, num_attention_heads=4).model)
    assert fusable(tiny_gqa_llama().model) is None


def _bundle(backbone, out, calibration: bool = False, **options):
    dim = 64
    g = torch.Generator().manual_seed(3)
    tasks = [ExportTask({"name": "echo", "kind": "generate", "labels": [], "template": "{text} :", "verbalizers": [],
                         "group": 0, "max_length": 16},
                        (1 + 0.3 * torch.randn(PROMPT_LENGTH, 2, generator=g)).numpy(),
                        (1 + 0.3 * torch.randn(2, dim, generator=g)).numpy(), np.zeros((0, dim), np.float32),
                        np.zeros((0,), np.float32))]
    source = BundleSource("causal", backbone_facts(backbone), backbone.model, backbone.family.adapter(),
                          backbone.tokenizer, [(torch.randn(PROMPT_LENGTH, dim, generator=g) * 0.5).numpy()], tasks,
                          calibration={"echo": [ids_of(backbone, t) for t in TEXTS]} if calibration else {})
    return write_bundle(source, out, ExportOptions(max_length=16, **options))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    backbone = tiny_gqa_llama()
    root = tmp_path_factory.mktemp("bundles")
    manifests = {name: _bundle(backbone, root / name, **options)
                 for name, options in {"fused": {}, "traced": {"fuse": False}, "int4": {"quantize": "int4"},
                                       "int8-mixed": {"quantize": "int8-mixed"},
                                       "int8-mixed-per-channel": {"quantize": "int8-mixed-per-channel"},
                                       "int8-smooth": {"quantize": "int8-smooth", "calibration": True}}.items()}
    return backbone, root, manifests


def test_export_writes_the_fused_graph_by_default_with_parity(bundles):
    _, root, manifests = bundles
    assert manifests["fused"]["format_version"] == 3
    assert manifests["fused"]["graph"]["kind"] == "decoder-fused" and manifests["traced"]["graph"]["kind"] == "decoder"
    assert manifests["fused"]["parity"]["fp32"]["max_rel_diff"] < 1e-4
    int4 = manifests["int4"]
    assert int4["graph"]["kind"] == "decoder-fused" and int4["graph"]["quantize"]["quantized"] == 2 * 4 + 1   # qkv, o, gate_up, down per layer + LM head
    assert "quantized" in int4["parity"]
    int8 = manifests["int8-mixed"]   # dynamic int8 through the contrib ops; the FFN output projections stay fp32
    assert int8["graph"]["kind"] == "decoder-fused" and int8["graph"]["quantize"]["kept_fp32"] == 2
    per_channel = manifests["int8-mixed-per-channel"]["graph"]["quantize"]
    assert per_channel["kept_fp32"] == 2 and per_channel["per_channel"] and not int8["graph"]["quantize"]["per_channel"]
    assert json.loads((root / "int4" / "manifest.json").read_text())["graph"]["kind"] == "decoder-fused"
    smooth = manifests["int8-smooth"]["graph"]["quantize"]   # per layer qkv, o, gate + up, down; and the LM head
    assert smooth["smoothed_inputs"] == 2 * 4 + 1 and smooth["per_channel"] and smooth["calibration_feeds"] == 1


def test_fused_and_traced_bundles_generate_the_same_text_and_stream_it(bundles):
    _, root, _ = bundles
    fused, traced = load(root / "fused", device="cpu", threads=1), load(root / "traced", device="cpu", threads=1)
    texts = ["the film was good", "bad", "a very dull story and it was bad"]
    assert fused.generate("echo", texts, max_new_tokens=6) == traced.generate("echo", texts, max_new_tokens=6)
    streamed = "".join(fused.stream("echo", texts[0], max_new_tokens=6))
    assert streamed == fused.generate("echo", texts[:1], max_new_tokens=6)[0]
    for recipe in ("int4", "int8-mixed", "int8-mixed-per-channel", "int8-smooth"):
        quantized = load(root / recipe, device="cpu", threads=1).generate("echo", texts, max_new_tokens=6)
        assert len(quantized) == 3 and all(isinstance(t, str) for t in quantized)


def test_concurrent_generations_on_one_engine_equal_serial_ones(bundles):
    _, root, _ = bundles
    engine = load(root / "fused", device="cpu", threads=1)
    texts = [" ".join(["good", "bad", "film", "story"][k % 4] for k in range(n)) for n in range(1, 9)]
    serial = [engine.generate("echo", [t], max_new_tokens=5)[0] for t in texts]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda t: engine.generate("echo", [t], max_new_tokens=5)[0], texts))
    assert concurrent == serial


def test_a_changed_byte_of_the_fused_graph_is_refused(bundles, tmp_path):
    _, root, _ = bundles
    copy = tmp_path / "bundle"
    shutil.copytree(root / "fused", copy)
    graph = copy / "decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx"):
        load(copy, device="cpu")


def test_the_copying_bound_call_that_cuda_takes_decodes_the_same_tokens(fused, monkeypatch):
    backbone, steps, prompts, _ = fused
    rows = [(steps.prefix(prompts[k % 2].numpy()), ids_of(backbone, t)) for k, t in enumerate(TEXTS)]
    bound = greedy(steps, rows, 40)   # past the first buffer's headroom: the buffers grow once
    monkeypatch.setattr(GraphSession, "bind", lambda self, buffers, aliases, outputs: BoundCall(self, buffers, aliases, outputs))
    assert greedy(steps, rows, 40) == bound
