"""Encoder family (BERT, MiniLM, MPNet, RoBERTa): the prompt is prepended to the input embeddings; pooled
features feed a learned linear head per task. It does not generate."""

from __future__ import annotations

from mpt_edge_export.families.encoder.adapter import POOLINGS, EncoderAdapter
from mpt_edge_export.families.family import FeaturesFusion, Family

MODEL_TYPES = frozenset({"bert", "roberta", "mpnet", "xlm-roberta", "distilbert", "electra"})


# Traced with eager attention, whose Q·Kᵀ/softmax/V pattern onnxruntime's BERT fusions turn into one Attention op per
# layer (they do not match SDPA exports: onnxruntime issue 21208); the 2D attention mask is kept as it is.
FUSION = FeaturesFusion(attn_implementation="eager", ort_model_type="bert")

FAMILY = Family("encoder", MODEL_TYPES, "AutoModel", uses_heads=True, peft_task_type=None, adapter_class=EncoderAdapter,
                features_fusion=FUSION)

__all__ = ["FAMILY", "POOLINGS", "EncoderAdapter"]
