"""Encoder-decoder family (T5): the prompt is prepended to the encoder's input embeddings; labels are scored at
decoder step 0 with the LM head's verbalizer rows; generation runs a prefill graph and a decoder-step graph."""

from __future__ import annotations

from mpt_edge_export.families.family import Family, GenerationGraphs
from mpt_edge_export.families.seq2seq.adapter import Seq2SeqAdapter, output_scale, start_id

MODEL_TYPES = frozenset({"t5", "mt5"})


def _export_generation(model, folder, opset: int, prompt_length: int, max_length: int, fuse: bool = False,
                       share_head: bool = True) -> GenerationGraphs:
    """Encoder + step graphs, traced (`fuse` and `share_head` do not apply: seq2seq has no fused form yet)."""
    from mpt_edge_export.families.seq2seq.graphs import export_seq2seq, seq2seq_parity_report
    from mpt_edge_export.graph import eos_token_ids
    from mpt_edge_runtime import format as fmt

    prefill, step = folder / fmt.ENCODER_GRAPH, folder / fmt.DECODER_GRAPH
    export_seq2seq(model, prefill, step, opset)
    entry = {"kind": fmt.SEQ2SEQ_KIND, "file": prefill.name, "decoder_file": step.name,
             "eos_token_ids": eos_token_ids(model), "inputs": {k: list(v.values()) for k, v in fmt.GRAPH_INPUTS.items()},
             "decoder_inputs": {k: list(v.values()) for k, v in fmt.SEQ2SEQ_STEP_INPUTS.items()},
             "outputs": list(fmt.DECODER_OUTPUTS)}
    return GenerationGraphs([prefill, step], entry, lambda dtype: seq2seq_parity_report(
        model, prefill, step, prompt_length, max_length, dtype))


FAMILY = Family("seq2seq", MODEL_TYPES, "AutoModelForSeq2SeqLM", uses_heads=False, peft_task_type="SEQ_2_SEQ_LM",
                adapter_class=Seq2SeqAdapter, export_generation=_export_generation)

__all__ = ["FAMILY", "Seq2SeqAdapter", "output_scale", "start_id"]
