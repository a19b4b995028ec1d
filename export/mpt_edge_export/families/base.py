"""What every family adapter shares: prepending a prompt to the token embeddings, and label scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Logit given to label slots a task does not have (tasks in one batch may have different label counts).
# Finite, so that KL and softmax stay NaN-free; exp(-1e9) is exactly 0 in float32.
MASKED_LOGIT = -1e9


@dataclass(frozen=True)
class PromptedOutput:
    """What a family forward returns.

    features: (B, d) one vector per row that label scoring reads (family-specific).
    hidden:   (B, n, d) last hidden states at the input token positions (prompt positions removed),
              used by hidden-state distillation together with the input attention mask.
    decoder_hidden, decoder_mask: (B, m, d), (B, m) the decoder's last hidden states (seq2seq only).
    """

    features: torch.Tensor
    hidden: torch.Tensor
    decoder_hidden: torch.Tensor | None = None
    decoder_mask: torch.Tensor | None = None


def hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().embedding_dim


def prompted_inputs(
    model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend `prompt` (B, l, d) to the token embeddings of `input_ids` (B, n).

    Returns inputs_embeds (B, l + n, d) and the extended attention mask (B, l + n); the prompt rows
    are always attended. `prompt=None` means no prompt (l = 0).
    """
    embeds = model.get_input_embeddings()(input_ids)
    if prompt is None:
        return embeds, attention_mask
    if prompt.shape[0] != input_ids.shape[0] or prompt.shape[-1] != embeds.shape[-1]:
        raise ValueError(
            f"prompt shape {tuple(prompt.shape)} does not fit input batch {input_ids.shape[0]} with hidden size "
            f"{embeds.shape[-1]}; expected (B, l, {embeds.shape[-1]})"
        )
    prompt_mask = attention_mask.new_ones(prompt.shape[:2])
    return torch.cat([prompt.to(embeds.dtype), embeds], dim=1), torch.cat([prompt_mask, attention_mask], dim=1)


def score_rows(features: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row label logits: features (B, d) · weights (B, C, d) [+ bias (B, C)] → (B, C).

    Slots where `valid` (B, C) is False get MASKED_LOGIT.
    """
    logits = torch.einsum("bd,bcd->bc", features, weights.to(features.dtype))
    if bias is not None:
        logits = logits + bias
    return logits.masked_fill(~valid, MASKED_LOGIT)
