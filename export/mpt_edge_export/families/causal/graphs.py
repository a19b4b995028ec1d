"""The generation graph of a decoder-only backbone: one step with a KV cache, the prompt as an input.

    (input_ids (B, n) int64, attention_mask (B, K) int64, position_ids (B, P + n) int64,
     prompt_embeds (B, P, d), past.<i>.key / past.<i>.value (B, h_kv, S, d_h))
      → logits (B, V) and features (B, d) at the last position, present.<i>.key / .value (B, h_kv, K, d_h)

with K = S + P + n. The sequence is [past | prompt | tokens]; the prompt may be empty (P = 0: decode steps and
requests that start from a task's cached prompt KV) and so may the past (S = 0: the task prompt's own
prefill). Rows are left-padded, so the last position is real in every row; padding inside the sequence is
masked out by `attention_mask` and skipped by `position_ids`. The same graph computes a task's prompt KV
once (P = l, n = 0), starts requests from it (P = 0) and decodes (n = 1). `features` (the last hidden state)
is what classification heads read, exactly as in the features graph, so verbalizer tasks classify in one step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from mpt_edge_export.graph import DEFAULT_OPSET
from mpt_edge_runtime import format as fmt


def cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder-only transformers model."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def step_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask (B, 1, q, K) for the last `q` positions of a K-long left-padded sequence: causal, padding
    masked, and every position may see itself (so padded rows never attend to nothing and never produce NaN)."""
    batch, total = attention_mask.shape
    keys = torch.arange(total, device=attention_mask.device)
    queries = keys[total - query_length:] if query_length else keys[:0]
    causal = keys[None, :] <= queries[:, None]                                  # (q, K)
    allowed = causal[None] & attention_mask[:, None, :].bool()                  # (B, q, K)
    allowed = allowed | (keys[None, :] == queries[:, None])[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


class PromptedDecoder(nn.Module):
    """Flat-tensor wrapper of a decoder-only LM for tracing: one prefill or decode step with a KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layers = cache_shape(model)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_embeds: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompt_embeds.to(embeds.dtype), embeds], dim=1)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        mask = step_mask(attention_mask, embeds.shape[1], embeds.dtype)
        out = self.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                    cache=cache, use_cache=True)
        features = out.last_hidden_state[:, -1]
        logits = self.model.get_output_embeddings()(features)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, features, *present)


def io_names(layers: int) -> tuple[dict, dict]:
    """Graph inputs and outputs with their dynamic axes."""
    inputs = dict(fmt.DECODER_INPUTS)
    outputs = dict(fmt.DECODER_OUTPUTS)
    for i in range(layers):
        for part in ("key", "value"):
            inputs[fmt.past_name(i, part)] = {0: "batch", 2: "past"}
            outputs[fmt.present_name(i, part)] = {0: "batch", 2: "total"}
    return inputs, outputs


def sample_step(model: nn.Module, batch: int, past: int, prompt: int, length: int, generator: torch.Generator,
                padded: bool = True) -> tuple[torch.Tensor, ...]:
    """Random inputs for one step: left padding in the last row's tokens when `padded`."""
    layers, kv_heads, head_dim = cache_shape(model)
    hidden = model.get_input_embeddings().embedding_dim
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, past + prompt + length, dtype=torch.long)
    if padded and batch > 1 and length > 1:
        mask[-1, past + prompt: past + prompt + length // 2] = 0
    positions = (mask[:, past:].cumsum(dim=1) - 1 + past).clamp(min=0)
    prompts = torch.randn(batch, prompt, hidden, generator=generator) * 0.05
    cache = [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * layers)]
    return (ids, mask, positions, prompts, *cache)


def export_decoder(model: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace the one-step KV graph (dynamic batch, past, prompt and token lengths) into `path`."""
    wrapper = PromptedDecoder(model).eval()
    inputs, outputs = io_names(wrapper.layers)
    example = sample_step(model, 2, 3, 2, 4, torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(wrapper, example, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={**inputs, **outputs}, opset_version=opset, dynamo=False,
                          do_constant_folding=True)


def decoder_parity_cases(prompt_length: int, max_length: int) -> list[tuple[int, int, int, int]]:
    """(batch, past, prompt, tokens): a task's prompt prefill, requests from a cached prompt (batch 1 and padded
    batches, short and long), prompt + tokens from scratch, and decode steps."""
    short = min(8, max_length)
    return [(1, 0, prompt_length, 0), (1, prompt_length, 0, 3), (3, prompt_length, 0, max_length),
            (4, 0, prompt_length, short), (3, prompt_length + short, 0, 1), (1, prompt_length + max_length, 0, 1)]


def decoder_parity_report(model: nn.Module, graph: Path, prompt_length: int, max_length: int, dtype=np.float32) -> dict:
    """PyTorch vs onnxruntime (CPU) on every case: max abs difference of the logits, features and present KV."""
    import onnxruntime as ort

    wrapper = PromptedDecoder(model).eval()
    names = list(io_names(wrapper.layers)[0])
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1234)
    cases = []
    for batch, past, prompt, length in decoder_parity_cases(prompt_length, max_length):
        inputs = sample_step(model, batch, past, prompt, length, generator)
        with torch.no_grad():
            expected = [t.float().numpy() for t in wrapper(*inputs)]
        feeds = {n: (t.numpy().astype(dtype) if t.is_floating_point() else t.numpy()) for n, t in zip(names, inputs)}
        got = [g.astype(np.float32) for g in session.run(None, feeds)]
        diff = max(float(np.abs(e - g).max()) if e.size else 0.0 for e, g in zip(expected, got))
        cases.append({"batch": batch, "past": past, "prompt": prompt, "sequence": length, "max_abs_diff": diff,
                      "scale": max(float(np.abs(e).max()) if e.size else 0.0 for e in expected)})
    return {"output": "logits, features, present", "cases": cases, "max_abs_diff": max(c["max_abs_diff"] for c in cases)}
