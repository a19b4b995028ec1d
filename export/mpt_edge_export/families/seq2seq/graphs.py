"""The generation graphs of an encoder-decoder backbone (T5): a prefill graph and a one-step decoder graph.

    encoder.onnx: (input_ids (B, n), attention_mask (B, n), prompt_embeds (B, P, d))
        → logits (B, V), features (B, d) of decoder step 0 (the start token), present.<i>.key/value
          (B, h, 1, d_kv): its self-attention KV, cross.<i>.key/value (B, h, P + n, d_kv): the cross-attention KV
    decoder.onnx: (input_ids (B, 1), encoder_attention_mask (B, P + n), past.<i>.key/value (B, h, S, d_kv),
                   cross.<i>.key/value) → logits (B, V), features (B, d), present.<i>.key/value (B, h, S + 1, d_kv)

The encoder reads [prompt | input] (right-padded, prompt always attended) once per request, and the
cross-attention KV of every decoder layer is computed there, once; decode steps only read it. Decoder rows
advance in lockstep from the same start token, so the decoder side never needs padding. `features` is the
(output-scaled) last decoder state that the LM head reads, so classify tasks score labels from step 0
exactly as the features graph does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from mpt_edge_export.families.base import prompted_inputs
from mpt_edge_export.families.seq2seq.adapter import output_scale, start_id
from mpt_edge_export.graph import DEFAULT_OPSET
from mpt_edge_runtime import format as fmt


def cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(decoder layers, heads, head dim) of a T5-style model."""
    config = model.config
    return config.num_decoder_layers, config.num_heads, config.d_kv


def _kv(cache: DynamicCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _pairs(flat) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


class Seq2SeqPrefill(nn.Module):
    """Encoder over [prompt | input], then decoder step 0: logits, features, self KV, cross KV."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.scale, self.start = model, output_scale(model), start_id(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_embeds: torch.Tensor):
        embeds, mask = prompted_inputs(self.model, prompt_embeds, input_ids, attention_mask)
        encoded = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        start = torch.zeros_like(input_ids[:, :1]) + self.start
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        hidden = self.model.get_decoder()(input_ids=start, encoder_hidden_states=encoded, encoder_attention_mask=mask,
                                          cache=cache, use_cache=True).last_hidden_state[:, -1] * self.scale
        return (self.model.get_output_embeddings()(hidden), hidden, *_kv(cache.self_attention_cache),
                *_kv(cache.cross_attention_cache))


class Seq2SeqStep(nn.Module):
    """One decoder step from the self-attention KV so far and the request's cross-attention KV."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.scale = model, output_scale(model)
        self.layers = cache_shape(model)[0]

    def forward(self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor, *kv: torch.Tensor):
        past, cross = kv[:2 * self.layers], kv[2 * self.layers:]
        cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=_pairs(past)), DynamicCache(ddp_cache_data=_pairs(cross)))
        # the cross KV comes from the cache; the encoder states are read only for their shape (B, E, ·)
        encoded = cross[0].transpose(1, 2).flatten(2)
        hidden = self.model.get_decoder()(input_ids=input_ids, encoder_hidden_states=encoded,
                                          encoder_attention_mask=encoder_attention_mask, cache=cache,
                                          use_cache=True).last_hidden_state[:, -1] * self.scale
        return (self.model.get_output_embeddings()(hidden), hidden, *_kv(cache.self_attention_cache))


def io_names(layers: int) -> tuple[dict, dict, dict, dict]:
    """(prefill inputs, prefill outputs, step inputs, step outputs), each name → dynamic axes."""
    prefill_out = dict(fmt.DECODER_OUTPUTS)
    step_in = dict(fmt.SEQ2SEQ_STEP_INPUTS)
    step_out = dict(fmt.DECODER_OUTPUTS)
    for i in range(layers):
        for part in ("key", "value"):
            prefill_out[fmt.present_name(i, part)] = {0: "batch"}
            step_in[fmt.past_name(i, part)] = {0: "batch", 2: "past"}
            step_out[fmt.present_name(i, part)] = {0: "batch", 2: "total"}
    for i in range(layers):
        for part in ("key", "value"):
            prefill_out[fmt.cross_name(i, part)] = {0: "batch", 2: "encoder"}
            step_in[fmt.cross_name(i, part)] = {0: "batch", 2: "encoder"}
    return dict(fmt.GRAPH_INPUTS), prefill_out, step_in, step_out


def sample_prefill(model: nn.Module, batch: int, prompt: int, length: int, generator: torch.Generator):
    """Random right-padded inputs (the last row cut to half) for the prefill graph."""
    hidden, vocab = model.get_input_embeddings().embedding_dim, model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, max(1, length // 2):] = 0
    return ids, mask, torch.randn(batch, prompt, hidden, generator=generator) * 0.05


def sample_step(model: nn.Module, batch: int, past: int, encoder: int, generator: torch.Generator):
    """Random inputs for one decode step: a padded encoder mask in the last row, random self and cross KV."""
    layers, heads, head_dim = cache_shape(model)
    vocab = model.get_input_embeddings().num_embeddings
    mask = torch.ones(batch, encoder, dtype=torch.long)
    if batch > 1:
        mask[-1, max(1, encoder // 2):] = 0
    kv = [torch.randn(batch, heads, size, head_dim, generator=generator)
          for size in [past] * (2 * layers) + [encoder] * (2 * layers)]
    return (torch.randint(0, vocab, (batch, 1), generator=generator), mask, *kv)


def export_seq2seq(model: nn.Module, prefill_path: Path, step_path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace both graphs (dynamic batch, input, prompt, past and encoder lengths)."""
    prefill_in, prefill_out, step_in, step_out = io_names(cache_shape(model)[0])
    generator = torch.Generator().manual_seed(0)
    jobs = [(Seq2SeqPrefill(model), sample_prefill(model, 2, 3, 6, generator), prefill_path, prefill_in, prefill_out),
            (Seq2SeqStep(model), sample_step(model, 2, 3, 7, generator), step_path, step_in, step_out)]
    for wrapper, example, path, inputs, outputs in jobs:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(wrapper.eval(), example, str(path), input_names=list(inputs), output_names=list(outputs),
                              dynamic_axes={**inputs, **outputs}, opset_version=opset, dynamo=False,
                              do_constant_folding=True)


def seq2seq_parity_report(model: nn.Module, prefill_path: Path, step_path: Path, prompt_length: int, max_length: int,
                          dtype=np.float32) -> dict:
    """PyTorch vs onnxruntime (CPU) on prefill shapes (batch 1 and padded batches) and decode steps at several
    past lengths: max abs difference over every output."""
    import onnxruntime as ort

    prefill_in, _, step_in, _ = io_names(cache_shape(model)[0])
    generator = torch.Generator().manual_seed(1234)
    short = min(8, max_length)
    cases = [("prefill", Seq2SeqPrefill(model), prefill_path, prefill_in, sample_prefill(model, b, prompt_length, n, generator),
              {"batch": b, "sequence": n}) for b, n in ((1, 3), (1, max_length), (3, short), (3, max_length))]
    cases += [("step", Seq2SeqStep(model), step_path, step_in, sample_step(model, b, s, prompt_length + n, generator),
               {"batch": b, "past": s, "encoder": prompt_length + n}) for b, s, n in ((1, 1, 3), (3, 5, short), (2, 40, max_length))]
    sessions = {}
    rows = []
    for graph, wrapper, path, names, inputs, shape in cases:
        session = sessions.setdefault(path, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        with torch.no_grad():
            expected = [t.float().numpy() for t in wrapper.eval()(*inputs)]
        feeds = {n: (t.numpy().astype(dtype) if t.is_floating_point() else t.numpy()) for n, t in zip(names, inputs)}
        got = [g.astype(np.float32) for g in session.run(None, feeds)]
        rows.append({"graph": graph, **shape, "max_abs_diff": max(float(np.abs(e - g).max()) for e, g in zip(expected, got)),
                     "scale": max(float(np.abs(e).max()) for e in expected)})
    return {"output": "logits, features, present, cross", "cases": rows, "max_abs_diff": max(c["max_abs_diff"] for c in rows)}
