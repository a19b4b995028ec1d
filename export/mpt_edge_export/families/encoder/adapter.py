"""Encoder family (BERT, MiniLM, MPNet, RoBERTa): prompt prepended to the input embeddings.

Features are the real tokens' last hidden states pooled (mean over the attention mask, or the first
real token, i.e. [CLS]); a per-task linear head outside the backbone turns them into label logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpt_edge.errors import ConfigError
from mpt_edge_export.families.base import PromptedOutput, prompted_inputs

POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class EncoderAdapter:
    pooling: str = "mean"
    name: str = "encoder"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r} is not supported; allowed: {', '.join(POOLINGS)}")

    def forward(self, model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, target_mask: torch.Tensor | None = None) -> PromptedOutput:
        """prompt (B, l, d) or None, input_ids/attention_mask (B, n) → PromptedOutput (features pooled)."""
        embeds, mask = prompted_inputs(model, prompt, input_ids, attention_mask)
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        tokens = hidden[:, hidden.shape[1] - input_ids.shape[1]:]
        if self.pooling == "cls":
            features = tokens[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
            features = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return PromptedOutput(features=features, hidden=tokens)
