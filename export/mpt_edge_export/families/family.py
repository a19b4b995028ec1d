"""What a backbone family is, as data: the one object the rest of the kit asks instead of comparing names.

A family folder (`families/<name>/`) holds the adapter (how a prompt enters the model), its generation graphs
if it generates, and a `FAMILY` declaration; `families/__init__.py` registers it. See docs/adding-a-family.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class GenerationGraphs:
    """A family's exported generation graph(s): the files, the manifest's "graph" entry (kind, files, inputs,
    outputs, eos ids) and `report(dtype)` → the parity report of PyTorch against onnxruntime on them."""

    paths: list[Path]
    entry: dict
    report: Callable


@dataclass(frozen=True)
class FeaturesFusion:
    """How a family's fp32 features graph gets onnxruntime's fused transformer ops (Attention,
    SkipLayerNormalization, BiasGelu, ...): traced with transformers' `attn_implementation` (the attention whose
    ONNX pattern onnxruntime's fusions recognise; SDPA exports do not match them), then rewritten by
    `onnxruntime.transformers.optimizer` for its `ort_model_type`. The model's own attention is restored after
    the trace, and parity against it is checked before and after the rewrite."""

    attn_implementation: str      # e.g. "eager"
    ort_model_type: str           # onnxruntime.transformers.optimizer model_type, e.g. "bert"


@dataclass(frozen=True)
class Family:
    """One backbone family.

    `adapter_class(**options)` is how a prompt enters its models; `export_generation(model, folder, opset,
    prompt_length, max_length, fuse=False, share_head=True)` → GenerationGraphs, or None for a family that does
    not generate (`fuse`: its fused graph where it has one; `share_head` False: a tied LM head gets its own
    weight, for quantization).
    """

    name: str
    model_types: frozenset[str]      # transformers `config.model_type` values it handles
    auto_model: str                  # the transformers Auto class that loads it
    uses_heads: bool                 # classifies with a learned linear head per task on pooled features;
                                     # otherwise with the LM head's rows of each label's verbalizer tokens
    peft_task_type: str | None       # PEFT `task_type` of its MPT adapter (None: PEFT cannot hold its heads)
    adapter_class: type
    training_options: dict = field(default_factory=dict, hash=False)   # adapter options when training
    export_generation: Callable[..., GenerationGraphs] | None = None
    features_fusion: FeaturesFusion | None = None   # fused onnxruntime ops for its fp32 features graph, if any

    def __post_init__(self):
        if not self.name or not self.model_types:
            raise ValueError("a family needs a name and at least one model_type")
        if self.uses_heads == (self.peft_task_type is not None):
            raise ValueError(f"family {self.name!r}: a head family has no PEFT task type and a verbalizer family has one")

    @property
    def generates(self) -> bool:
        """Can generate text and score whole verbalizer sequences (it exports a generation graph)."""
        return self.export_generation is not None

    def adapter(self, *, pooling: str = "mean", training: bool = False):
        """The adapter for training (`training=True`: the family's fastest exact training forward) or export."""
        options = dict(self.training_options) if training else {}
        if self.uses_heads:
            options["pooling"] = pooling          # how features are pooled for the head
        return self.adapter_class(**options)
