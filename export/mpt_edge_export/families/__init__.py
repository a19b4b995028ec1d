"""Backbone family adapters: how a prompt enters each family of backbone.

This is the one place that knows it; the training core and the exporter both call it.
"""

from __future__ import annotations

from mpt_edge.errors import UnsupportedBackboneError

CAUSAL_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gpt2", "phi3", "smollm3"})
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "mpnet", "xlm-roberta", "distilbert", "electra"})
SEQ2SEQ_MODEL_TYPES = frozenset({"t5", "mt5"})


def family_for_model_type(model_type: str) -> str:
    """Map a transformers `config.model_type` to a family name: "causal", "encoder" or "seq2seq"."""
    for family, types in (("causal", CAUSAL_MODEL_TYPES), ("encoder", ENCODER_MODEL_TYPES), ("seq2seq", SEQ2SEQ_MODEL_TYPES)):
        if model_type in types:
            return family
    raise UnsupportedBackboneError(
        f"backbone model_type {model_type!r} belongs to no supported family; supported: "
        f"causal {sorted(CAUSAL_MODEL_TYPES)}, encoder {sorted(ENCODER_MODEL_TYPES)}, seq2seq {sorted(SEQ2SEQ_MODEL_TYPES)}"
    )


def adapter_for(family: str, **options):
    """The adapter object for a family name ("causal", "encoder", "seq2seq"); options go to its constructor."""
    from mpt_edge_export.families.causal import CausalAdapter
    from mpt_edge_export.families.encoder import EncoderAdapter
    from mpt_edge_export.families.seq2seq import Seq2SeqAdapter

    adapters = {"causal": CausalAdapter, "encoder": EncoderAdapter, "seq2seq": Seq2SeqAdapter}
    if family not in adapters:
        raise UnsupportedBackboneError(f"unknown family {family!r}; known: {', '.join(adapters)}")
    return adapters[family](**options)
