"""Encoder family (BERT, MiniLM, MPNet, RoBERTa): the prompt is prepended to the input embeddings; pooled
features feed a learned linear head per task. It does not generate."""

from __future__ import annotations

from mpt_edge_export.families.encoder.adapter import POOLINGS, EncoderAdapter
from mpt_edge_export.families.family import Family

MODEL_TYPES = frozenset({"bert", "roberta", "mpnet", "xlm-roberta", "distilbert", "electra"})


FAMILY = Family("encoder", MODEL_TYPES, "AutoModel", uses_heads=True, peft_task_type=None, adapter_class=EncoderAdapter)

__all__ = ["FAMILY", "POOLINGS", "EncoderAdapter"]
