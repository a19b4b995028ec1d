"""Fused encoder export (issue 15, item 3): the fp32 features graph of an encoder is traced with eager attention and
rewritten by onnxruntime's transformer optimizer into Attention / SkipLayerNormalization / BiasGelu contrib ops. It
must give PyTorch's features and predictions (any attention mask, not only right padding), hold the fused ops the
family declares, leave the backbone's own attention as it was, and fall back to the traced graph (parity kept)
whenever the rewrite fails or misses parity. The runtime-side guarantees (mixed batches, threads, hot-loaded tasks)
run on fused encoder bundles in tests/test_export_runtime.py, which exports with the default options."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import tiny_bert_backbone
from mpt_edge.bundle_source import bundle_source
from mpt_edge_export import bundle_writer, transform
from mpt_edge_export.bundle_writer import ExportOptions, features_fusion, write_bundle
from mpt_edge_export.families.encoder import FUSION
from mpt_edge_export.graph import PromptedFeatures, traced_attention
from test_export_runtime import texts_for, torch_probabilities, trained_checkpoint
import mpt_edge_runtime as mer
from mpt_edge_runtime import format as fmt

LAYERS = 2                              # tiny BERT (conftest): 2 layers, 4 heads, d = 32
FUSED = {"Attention": LAYERS, "SkipLayerNormalization": 2 * LAYERS, "BiasGelu": LAYERS}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One tiny BERT checkpoint exported fused (the default) and with fuse=False: (backbone, trained, {kind: (folder,
    manifest)})."""
    folder = tmp_path_factory.mktemp("fused")
    backbone = tiny_bert_backbone()
    trained = trained_checkpoint(backbone, folder, names=("polarity", "topic"))
    source = bundle_source(trained, backbone)
    out = {}
    for kind, fuse in (("fused", True), ("plain", False)):
        out[kind] = (folder / kind, write_bundle(source, folder / kind, ExportOptions(max_length=24, fuse=fuse)))
    return backbone, trained, out


def graph_ops(folder) -> dict[str, int]:
    return dict(transform.op_counts(folder / fmt.GRAPH))


def test_fused_graph_holds_the_fused_ops_and_keeps_parity(bundles):
    backbone, _, out = bundles
    folder, manifest = out["fused"]
    fuse = manifest["graph"]["fuse"]
    assert fuse["applied"] and fuse["attention"] == "eager" and fuse["model_type"] == "bert"
    assert fuse["fused_ops"] == FUSED and fuse["nodes_after"] < fuse["nodes_before"] / 2
    ops = graph_ops(folder)
    assert {op: ops.get(f"com.microsoft:{op}", 0) for op in FUSED} == FUSED
    assert "Softmax" not in ops and "Erf" not in ops            # no attention or GELU left unfused
    parity = manifest["parity"]["fused"]
    assert parity["tolerance"] == 1e-3 and parity["max_rel_diff"] < 1e-3
    assert manifest["options"]["fuse"] is True
    assert backbone.model.config._attn_implementation == "sdpa"  # the model's own attention is back
    plain_folder, plain = out["plain"]
    assert "fuse" not in plain["graph"] and not any(op.startswith("com.microsoft:") for op in graph_ops(plain_folder))


def test_fused_bundle_predicts_like_pytorch_and_the_plain_graph(bundles):
    backbone, trained, out = bundles
    fused, plain = (mer.load(out[k][0], device="cpu", threads=1) for k in ("fused", "plain"))
    for task in ("polarity", "topic"):
        texts = texts_for(task, 9) + ["good"]                    # rows of different lengths: padded batch
        labels = trained.specs[trained.index_of(task)].labels
        expected = torch_probabilities(backbone, trained, task, texts)
        got = {name: np.array([[p.probabilities[label] for label in labels] for p in engine.classify(task, texts)])
               for name, engine in (("fused", fused), ("plain", plain))}
        np.testing.assert_allclose(got["fused"], expected, atol=1e-4)
        np.testing.assert_allclose(got["fused"], got["plain"], atol=1e-5)


def test_fused_graph_is_exact_for_any_attention_mask(bundles):
    """The raw 2D mask reaches each Attention op: left padding and holes give PyTorch's features too (onnxruntime's
    BERT default, one end index per row, would be right for right padding only)."""
    backbone, trained, out = bundles
    session = ort.InferenceSession(str(out["fused"][0] / fmt.GRAPH), providers=["CPUExecutionProvider"])
    wrapper = PromptedFeatures(backbone.model, backbone.family.adapter()).eval()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 30, (3, 9), generator=generator)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 1, 1, 0], [1] * 9])
    prompts = torch.randn(3, 3, 32, generator=generator) * 0.3
    with torch.no_grad():
        expected = wrapper(ids, mask, prompts).numpy()
    got = session.run([fmt.FEATURES], {fmt.INPUT_IDS: ids.numpy(), fmt.ATTENTION_MASK: mask.numpy(),
                                       fmt.PROMPT_EMBEDS: prompts.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_fused_and_optimized_bundle_keeps_parity(tmp_path):
    backbone = tiny_bert_backbone()
    trained = trained_checkpoint(backbone, tmp_path, names=("polarity",), rank=1)
    manifest = write_bundle(bundle_source(trained, backbone), tmp_path / "opt", ExportOptions(optimize=True, max_length=24))
    assert manifest["graph"]["fuse"]["applied"] and manifest["graph"]["optimize"] == "ORT_ENABLE_EXTENDED"
    assert manifest["parity"]["optimized"]["max_rel_diff"] < 1e-3
    expected = torch_probabilities(backbone, trained, "polarity", texts_for("polarity"))
    got = [[p.probabilities[label] for label in ("negative", "positive")]
           for p in mer.load(tmp_path / "opt", device="cpu").classify("polarity", texts_for("polarity"))]
    np.testing.assert_allclose(np.array(got), expected, atol=1e-4)


def test_which_exports_are_fused():
    """fp32 encoder features graphs only: int8 recipes and fp16 start from the plain traced graph (their MatMuls,
    which the recipes quantize by name), and a family without a `features_fusion` is never rewritten."""
    bert = bundle_writer.BundleSource("encoder", {}, None, None, None, [], [])
    llama = bundle_writer.BundleSource("causal", {}, None, None, None, [], [])
    assert FUSION.attn_implementation == "eager" and FUSION.ort_model_type == "bert"
    assert features_fusion(bert, ExportOptions()) == FUSION == features_fusion(bert, ExportOptions(optimize=True))
    for options in (ExportOptions(fuse=False), ExportOptions(quantize="int8"), ExportOptions(quantize="int8-mixed"),
                    ExportOptions(dtype="fp16")):
        assert features_fusion(bert, options) is None, options
    assert features_fusion(llama, ExportOptions()) is None


def test_int8_encoder_bundle_is_not_fused(tmp_path):
    backbone = tiny_bert_backbone()
    trained = trained_checkpoint(backbone, tmp_path, names=("polarity",), rank=1)
    manifest = write_bundle(bundle_source(trained, backbone), tmp_path / "b8", ExportOptions(quantize="int8", max_length=24))
    assert "fuse" not in manifest["graph"] and "com.microsoft:Attention" not in graph_ops(tmp_path / "b8")


def test_traced_attention_restores_the_models_own_even_on_failure():
    model = tiny_bert_backbone().model
    with traced_attention(model, "eager"):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="trace failed"), traced_attention(model, "eager"):
        raise RuntimeError("trace failed")
    assert model.config._attn_implementation == "sdpa"
    with traced_attention(model, None):
        assert model.config._attn_implementation == "sdpa"


def break_one_weight(src, dst, *args):
    """The real fusion, then one fused Attention weight doubled: a rewrite that misses parity."""
    info = real_fuse(src, dst, *args)
    model = onnx.load(str(dst))
    weight = next(t for t in model.graph.initializer if "qkv_weight" in t.name)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2.0, weight.name))
    onnx.save(model, str(dst))
    return info


real_fuse = transform.fuse


@pytest.mark.parametrize("failure", ["raises", "misses parity"])
def test_a_failed_fusion_keeps_the_traced_graph(failure, tmp_path, monkeypatch):
    def raises(*args):
        raise RuntimeError("no pattern for this graph")

    monkeypatch.setattr(transform, "fuse", raises if failure == "raises" else break_one_weight)
    backbone = tiny_bert_backbone()
    trained = trained_checkpoint(backbone, tmp_path, names=("polarity",), rank=1)
    manifest = write_bundle(bundle_source(trained, backbone), tmp_path / "b", ExportOptions(max_length=24))
    fuse = manifest["graph"]["fuse"]
    assert fuse["applied"] is False and ("no pattern" in fuse["reason"] if failure == "raises"
                                         else "differs from PyTorch" in fuse["reason"])
    assert "fused" not in manifest["parity"] and manifest["parity"]["fp32"]["max_rel_diff"] < 1e-3
    assert not any(op.startswith("com.microsoft:") for op in graph_ops(tmp_path / "b"))
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix == ".onnx") == [fmt.GRAPH]
    expected = torch_probabilities(backbone, trained, "polarity", texts_for("polarity"))
    got = [[p.probabilities[label] for label in ("negative", "positive")]
           for p in mer.load(tmp_path / "b", device="cpu").classify("polarity", texts_for("polarity"))]
    np.testing.assert_allclose(np.array(got), expected, atol=1e-4)
