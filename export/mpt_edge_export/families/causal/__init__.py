"""Decoder-only family (Llama, Qwen, SmolLM, GPT-2): the prompt is prepended to the input embeddings; labels are
scored with the LM head's rows of their verbalizer tokens; generation runs one KV-cache step graph."""

from __future__ import annotations

from mpt_edge_export.families.causal.adapter import CausalAdapter
from mpt_edge_export.families.family import Family, GenerationGraphs

MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gpt2", "phi3", "smollm3"})


def _export_generation(model, folder, opset: int, prompt_length: int, max_length: int, fuse: bool = False,
                       share_head: bool = True) -> GenerationGraphs:
    """The traced step graph, or with `fuse` the fused one (onnxruntime contrib ops) when the model allows it
    (`fused.fusable`); `share_head` False gives a tied LM head its own weight (so quantization covers it)."""
    from mpt_edge_export.families.causal.fused import export_fused_decoder, fusable, fused_parity_report
    from mpt_edge_export.families.causal.graphs import decoder_parity_report, export_decoder
    from mpt_edge_export.graph import eos_token_ids
    from mpt_edge_runtime import format as fmt

    path = folder / fmt.DECODER_GRAPH
    if fuse and fusable(model) is None:
        export_fused_decoder(model, path, share_head)
        kind, inputs, report = fmt.FUSED_DECODER_KIND, fmt.FUSED_DECODER_INPUTS, fused_parity_report
    else:
        export_decoder(model, path, opset)
        kind, inputs, report = fmt.DECODER_KIND, fmt.DECODER_INPUTS, decoder_parity_report
    entry = {"kind": kind, "file": path.name, "eos_token_ids": eos_token_ids(model),
             "inputs": {k: list(v.values()) for k, v in inputs.items()}, "outputs": list(fmt.DECODER_OUTPUTS)}
    return GenerationGraphs([path], entry, lambda dtype: report(model, path, prompt_length, max_length, dtype))


FAMILY = Family("causal", MODEL_TYPES, "AutoModelForCausalLM", uses_heads=False, peft_task_type="CAUSAL_LM",
                adapter_class=CausalAdapter,
                training_options={"shared_prefix": True}, export_generation=_export_generation)
