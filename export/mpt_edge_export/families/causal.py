"""Decoder-only family (Llama, Qwen, SmolLM, GPT-2): prompt prepended to the input embeddings.

Rows are right-padded: [prompt | tokens | pad], so positions are the default 0..l+n-1 and the last real
token of row b sits at l + len_b - 1. Classification scores each label's first token there with the
output embedding rows of the label tokens only (no full-vocabulary projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpt_edge_export.families.base import PromptedOutput, prompted_inputs, score_rows


@dataclass(frozen=True)
class CausalAdapter:
    name: str = "causal"

    def forward(self, model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> PromptedOutput:
        """prompt (B, l, d) or None, input_ids/attention_mask (B, n), right-padded → PromptedOutput."""
        embeds, mask = prompted_inputs(model, prompt, input_ids, attention_mask)
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        prompt_len = hidden.shape[1] - input_ids.shape[1]
        last = prompt_len + attention_mask.sum(dim=1) - 1
        features = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return PromptedOutput(features=features, hidden=hidden[:, prompt_len:])

    def answer_logits(self, model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                      target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary logits at the positions that predict target tokens, and those tokens.

        hidden (B, n, d) at the input positions, input_ids and target_mask (B, n) → (N, V), (N,) for the
        N target tokens of the batch (position j predicts token j + 1).
        """
        predicts = target_mask[:, 1:]
        return model.get_output_embeddings()(hidden[:, :-1][predicts]), input_ids[:, 1:][predicts]

    def label_logits(self, model: nn.Module, features: torch.Tensor, token_ids: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the label tokens: features (B, d), token_ids/valid (B, C) → (B, C)."""
        head = model.get_output_embeddings()
        bias = head.bias[token_ids] if getattr(head, "bias", None) is not None else None
        return score_rows(features, head.weight[token_ids], valid, bias)
