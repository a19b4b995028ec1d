"""The fused generation graph of a Llama-like backbone, written op by op with onnxruntime's contrib ops.

    (input_ids (B, n) int64 right-padded, prompt_embeds (B, P, d), step_lengths (B,) int64, total_lengths (B,) int64,
     past.<i>.key / past.<i>.value (B, h_kv, S, d_h))
      → logits (B, V) and features (B, d) at each row's last real position, present.<i>.* (B, h_kv, S + P + n, d_h)

Each row's cache holds its tokens packed from position 0 ([prompt | tokens | unused]): `step_lengths[b]` rows of
this step's [prompt | tokens] chunk are real (the rest is right padding), and `total_lengths[b]` is how many
tokens row b's cache holds after the step. Every layer is one GroupQueryAttention (KV cache appended in the
op, rotary inside, padded chunks through `query_seqlens`), SkipSimplifiedLayerNormalization, and MatMuls with
packed QKV and packed gate / up (then a Split; its builder's `fuse_mlp_gate_up`): the ops onnxruntime-genai's
model builder emits, so `--quantize int4` gives its MatMulNBits too. One MatMul instead of two saves a parallel
section per layer: decode steps a few percent faster in paired rounds, clearly at fp32 batch 1 (performance.md).
The same graph computes a task's prompt KV once (P = l, n = 0), starts requests from it (P = 0) and decodes
(n = 1). Needs onnxruntime >= 1.32 (GroupQueryAttention's `query_seqlens`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from mpt_edge.errors import ExportError
from mpt_edge_export.families.causal.graphs import cache_shape
from mpt_edge_runtime import format as fmt

FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
ROPE_TYPES = frozenset({"default", "linear", "llama3"})   # those that only rescale inv_freq: a static cos/sin table
OPSET = 17
MS = "com.microsoft"


def fusable(model: nn.Module) -> str | None:
    """None when `model` can be written as the fused graph, else why not (one line)."""
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in FUSED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {sorted(FUSED_MODEL_TYPES)}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return f"rope type {rope.get('rope_type')!r} needs position-dependent scaling"
    head_dim = cache_shape(model)[2]
    if head_dim % 16:
        return f"head dim {head_dim} is not a multiple of 16 (GroupQueryAttention needs that)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and \
            config.model_type == "mistral":
        return "sliding-window attention"
    return None


def _weight(module: nn.Linear) -> np.ndarray:
    """A Linear's weight as the right-hand side of x @ W: (in, out) float32."""
    return module.weight.detach().float().numpy().T.copy()


def rotary_tables(model: nn.Module, positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (positions, d_h / 2) from the model's own rotary inv_freq and attention scaling."""
    rotary = model.base_model.rotary_emb
    inv_freq = rotary.inv_freq.detach().double().cpu()
    if inv_freq.numel() * 2 != head_dim:
        raise ExportError(f"rotary inv_freq has {inv_freq.numel()} entries for head dim {head_dim}; partial rotary "
                          "is not supported by the fused graph, export with --no-fuse")
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return ((angles.cos() * scale).float().numpy(), (angles.sin() * scale).float().numpy())


class _Graph:
    """Nodes and initializers being written; names are unique by construction."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def fused_decoder_graph(model: nn.Module, share_head: bool = True) -> onnx.ModelProto:
    """The contrib-op step graph of a Llama-like `model` (see the module docstring); weights are copied as fp32.
    `share_head`: a tied LM head reads the embedding table (one copy); False writes it as its own MatMul weight,
    which weight quantization then covers too (the largest single matrix of a small LM)."""
    reason = fusable(model)
    if reason:
        raise ExportError(f"the fused decoder graph does not support this model: {reason}; export with --no-fuse")
    config = model.config.get_text_config(decoder=True)
    layers, kv_heads, head_dim = cache_shape(model)
    heads, hidden = config.num_attention_heads, config.hidden_size
    eps = float(config.rms_norm_eps)
    g = _Graph()
    embed = g.constant("embed_tokens.weight", model.get_input_embeddings().weight.detach().float().numpy())
    cos, sin = rotary_tables(model, config.max_position_embeddings, head_dim)
    g.constant("cos_cache", cos), g.constant("sin_cache", sin)

    g.op("Gather", [embed, fmt.INPUT_IDS], ["token_embeds"], "embed")
    g.op("Concat", [fmt.PROMPT_EMBEDS, "token_embeds"], ["x"], "prepend_prompt", axis=1)
    g.constant("one", np.array(1, np.int64))
    g.op("Sub", [fmt.TOTAL_LENGTHS, "one"], ["seqlens_k64"], "seqlens_k_minus")
    g.op("Cast", ["seqlens_k64"], ["seqlens_k"], "seqlens_k", to=TensorProto.INT32)
    g.op("ReduceMax", [fmt.TOTAL_LENGTHS], ["total_max"], "total_max", keepdims=0)
    g.op("Cast", ["total_max"], ["total_sequence_length"], "total_sequence_length", to=TensorProto.INT32)
    g.op("Cast", [fmt.STEP_LENGTHS], ["query_seqlens"], "query_seqlens", to=TensorProto.INT32)

    split = g.constant("gate_up_sizes", np.array([config.intermediate_size] * 2, np.int64))   # gate, up
    residual, pending = "x", None
    for i, layer in enumerate(model.base_model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        ln1 = g.constant(f"layers.{i}.input_layernorm.weight", layer.input_layernorm.weight.detach().float().numpy())
        if pending is None:
            g.op("SimplifiedLayerNormalization", [residual, ln1], [f"h{i}"], f"ln1_{i}", axis=-1, epsilon=eps)
        else:
            g.op("SkipSimplifiedLayerNormalization", [pending, residual, ln1], [f"h{i}", "", "", f"r{i}"],
                 f"ln1_{i}", domain=MS, epsilon=eps)
            residual = f"r{i}"
        qkv = np.concatenate([_weight(attention.q_proj), _weight(attention.k_proj), _weight(attention.v_proj)], axis=1)
        g.op("MatMul", [f"h{i}", g.constant(f"layers.{i}.qkv.weight", qkv)], [f"qkv{i}"], f"layers.{i}.self_attn.qkv_proj")
        packed = f"qkv{i}"
        if attention.q_proj.bias is not None:
            bias = torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]).detach().float().numpy()
            g.op("Add", [packed, g.constant(f"layers.{i}.qkv.bias", bias)], [f"qkvb{i}"], f"qkv_bias_{i}")
            packed = f"qkvb{i}"
        g.op("GroupQueryAttention",
             [packed, "", "", fmt.past_name(i, "key"), fmt.past_name(i, "value"), "seqlens_k", "total_sequence_length",
              "cos_cache", "sin_cache", "", "", "", "", "", "", "", "query_seqlens"],
             [f"attn{i}", fmt.present_name(i, "key"), fmt.present_name(i, "value")], f"attention_{i}", domain=MS,
             num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
             scale=float(getattr(attention, "scaling", head_dim ** -0.5)))
        g.op("MatMul", [f"attn{i}", g.constant(f"layers.{i}.o_proj.weight", _weight(attention.o_proj))], [f"o{i}"], f"layers.{i}.self_attn.o_proj")
        ln2 = g.constant(f"layers.{i}.post_attention_layernorm.weight",
                         layer.post_attention_layernorm.weight.detach().float().numpy())
        g.op("SkipSimplifiedLayerNormalization", [f"o{i}", residual, ln2], [f"m{i}", "", "", f"ra{i}"], f"ln2_{i}",
             domain=MS, epsilon=eps)
        residual = f"ra{i}"
        gate_up = np.concatenate([_weight(mlp.gate_proj), _weight(mlp.up_proj)], axis=1)
        g.op("MatMul", [f"m{i}", g.constant(f"layers.{i}.gate_up.weight", gate_up)], [f"gate_up{i}"],
             f"layers.{i}.mlp.gate_up_proj")
        g.op("Split", [f"gate_up{i}", split], [f"gate{i}", f"up{i}"], f"gate_up_split_{i}", axis=-1)
        g.op("QuickGelu", [f"gate{i}"], [f"act{i}"], f"silu_{i}", domain=MS, alpha=1.0)   # x·sigmoid(x) = SiLU
        g.op("Mul", [f"act{i}", f"up{i}"], [f"gated{i}"], f"gated_{i}")
        g.op("MatMul", [f"gated{i}", g.constant(f"layers.{i}.down.weight", _weight(mlp.down_proj))], [f"down{i}"],
             f"layers.{i}.mlp.down_proj")
        pending = f"down{i}"

    norm = g.constant("norm.weight", model.base_model.norm.weight.detach().float().numpy())
    g.op("SkipSimplifiedLayerNormalization", [pending, residual, norm], ["normed"], "final_norm", domain=MS, epsilon=eps)
    g.op("Sub", [fmt.STEP_LENGTHS, "one"], ["last"], "last_index")
    g.op("Unsqueeze", ["last", g.constant("axis1", np.array([1], np.int64))], ["last_2d"], "last_2d")
    g.op("GatherND", ["normed", "last_2d"], [fmt.FEATURES], "last_position", batch_dims=1)
    head = model.get_output_embeddings()
    if share_head and head.weight is model.get_input_embeddings().weight:
        g.op("Gemm", [fmt.FEATURES, embed], [fmt.LOGITS], "lm_head", transB=1)   # tied: one copy of the table
    else:
        g.op("MatMul", [fmt.FEATURES, g.constant("lm_head.weight", _weight(head))], [fmt.LOGITS], "lm_head")
    if getattr(head, "bias", None) is not None:
        raise ExportError("an LM head with a bias is not supported by the fused decoder graph; export with --no-fuse")

    floats = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(fmt.INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info(fmt.PROMPT_EMBEDS, floats, ["batch", "prompt_length", hidden]),
              helper.make_tensor_value_info(fmt.STEP_LENGTHS, TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info(fmt.TOTAL_LENGTHS, TensorProto.INT64, ["batch"])]
    outputs = [helper.make_tensor_value_info(fmt.LOGITS, floats, ["batch", config.vocab_size]),
               helper.make_tensor_value_info(fmt.FEATURES, floats, ["batch", hidden])]
    for i in range(layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(fmt.past_name(i, part), floats,
                                                        ["batch", kv_heads, "past", head_dim]))
            outputs.append(helper.make_tensor_value_info(fmt.present_name(i, part), floats,
                                                         ["batch", kv_heads, "total", head_dim]))
    graph = helper.make_graph(g.nodes, "mpt_edge_fused_decoder", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                             producer_name="mpt-edge")


def export_fused_decoder(model: nn.Module, path: Path, share_head: bool = True) -> None:
    """Write the fused step graph to `path`: one file, as a bundle holds its graph (protobuf's limit: 2 GB)."""
    proto = fused_decoder_graph(model, share_head)
    if proto.ByteSize() >= 2 ** 31:
        raise ExportError(f"the fused graph would be {proto.ByteSize() / 2 ** 30:.1f} GiB, over the 2 GiB a one-file "
                          "ONNX graph can hold; bundles of backbones this large are not supported yet")
    onnx.save_model(proto, str(path))


def fused_parity_cases(prompt_length: int, max_length: int) -> list[tuple[int, int, list[int], int, bool]]:
    """(batch, prompt l, token counts per row, decode steps after, from scratch): a task's prompt prefill,
    requests from the cached prompt KV at batch 1 and as ragged batches (short and long rows, one token), a
    ragged batch of prompt + tokens from scratch (no cache), and decode steps from the graph's own returned KV."""
    short = min(8, max_length)
    return [(1, prompt_length, [0], 0, True), (1, prompt_length, [3], 2, False),
            (3, prompt_length, [max_length, max_length // 2, 1], 2, False),
            (4, prompt_length, [short, 1, short // 2, 2], 1, True)]


@torch.no_grad()
def _reference(model: nn.Module, prompt: torch.Tensor, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch without a cache: the last position of [prompt | ids] → logits (V,), features (d,)."""
    embeds = torch.cat([prompt[None], model.get_input_embeddings()(torch.tensor([ids], dtype=torch.long))], dim=1)
    hidden = model.base_model(inputs_embeds=embeds).last_hidden_state[0, -1]
    return model.get_output_embeddings()(hidden).float().numpy(), hidden.float().numpy()


def fused_parity_report(model: nn.Module, graph: Path, prompt_length: int, max_length: int, dtype=np.float32) -> dict:
    """PyTorch vs the fused graph in onnxruntime (CPU), every case: a row's prompt is random (rows mix tasks) and
    its tokens random; the prompt KV comes from the graph, requests start from it, decode steps feed the argmax.
    Max abs difference of the logits and features at each row's last real position. `dtype`: fp32 only (the graph
    is never converted to fp16: such exports use the traced graph)."""
    from mpt_edge_runtime.fused_decoder import FusedDecoderSession
    from mpt_edge_runtime.session import GraphSession

    steps = FusedDecoderSession.open(GraphSession.open(graph, "cpu"), model.get_input_embeddings().embedding_dim)
    generator = torch.Generator().manual_seed(1234)
    vocab, hidden = model.get_input_embeddings().num_embeddings, model.get_input_embeddings().embedding_dim
    cases = []
    for batch, length, counts, decode_steps, scratch in fused_parity_cases(prompt_length, max_length):
        prompts = [torch.randn(length, hidden, generator=generator) * 0.05 for _ in range(batch)]
        rows = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in counts]
        diffs, scale = [], 0.0

        def compare(got_logits, got_features, sequences):
            nonlocal scale
            for b, ids in enumerate(sequences):
                logits, features = _reference(model, prompts[b], ids)
                diffs.append(max(float(np.abs(logits - got_logits[b]).max()), float(np.abs(features - got_features[b]).max())))
                scale = max(scale, float(np.abs(logits).max()))

        caches = [steps.prefix(p.numpy()) for p in prompts]
        if scratch:   # [prompt | tokens] through the graph with no cache (counts [0]: the prompt's own prefill)
            logits, features, state = steps.start_from_prompts(torch.stack(prompts).numpy(), rows)
        else:
            logits, features, state = steps.start(list(zip(caches, rows)))
        compare(logits, features, rows)
        for _ in range(decode_steps):
            fed = logits.argmax(axis=-1)
            rows = [ids + [int(t)] for ids, t in zip(rows, fed)]
            logits, state = steps.advance(state, fed)
            _, features, _ = steps.start(list(zip(caches, rows)))   # features: the same rows, prefilled anew
            compare(logits, features, rows)
        cases.append({"batch": batch, "prompt": length, "sequence": max(counts), "decode_steps": decode_steps,
                      "max_abs_diff": max(diffs), "scale": scale})
    return {"output": "logits, features", "cases": cases, "max_abs_diff": max(c["max_abs_diff"] for c in cases)}

