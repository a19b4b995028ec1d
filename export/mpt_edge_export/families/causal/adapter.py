"""Decoder-only family (Llama, Qwen, SmolLM, GPT-2): prompt prepended to the input embeddings.

Rows are right-padded: [prompt | tokens | pad], so positions are the default 0..l+n-1 and the last real
token of row b sits at l + len_b - 1. Classification scores each label's first token there with the
output embedding rows of the label tokens only (no full-vocabulary projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpt_edge_export.families.base import MASKED_LOGIT, PromptedOutput, prompted_inputs, score_rows


@dataclass(frozen=True)
class CausalAdapter:
    name: str = "causal"
    shared_prefix: bool = False   # training: run each distinct prompt once and share its KV across rows

    def forward(self, model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, target_mask: torch.Tensor | None = None) -> PromptedOutput:
        """prompt (B, l, d) or None, input_ids/attention_mask (B, n), right-padded → PromptedOutput.
        Targets stay in the row (teacher forcing in one sequence), so `target_mask` is not needed here."""
        if self.shared_prefix and prompt is not None:
            return self._forward_shared_prefix(model, prompt, input_ids, attention_mask)
        embeds, mask = prompted_inputs(model, prompt, input_ids, attention_mask)
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        prompt_len = hidden.shape[1] - input_ids.shape[1]
        last = prompt_len + attention_mask.sum(dim=1) - 1
        features = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return PromptedOutput(features=features, hidden=hidden[:, prompt_len:])

    def _forward_shared_prefix(self, model: nn.Module, prompt: torch.Tensor, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> PromptedOutput:
        """The same output as the plain forward, computed with the prompt positions run once per distinct prompt.

        Attention is causal and the prompt comes first, so the prompt's keys and values do not depend on the
        row's tokens: rows that share a prompt (a task's rows in a batch) share one prefix pass (U, l) whose
        cache is gathered to the B rows; the tokens (B, n) then run on top of it. Gradients reach the prompt
        through the gathered cache (summed over the rows, as in the plain forward). With l prompt vectors and
        n tokens per row this costs U·l + B·n positions instead of B·(l + n).
        """
        rows = prompt.shape[0]
        with torch.no_grad():
            _, inverse = torch.unique(prompt.detach().reshape(rows, -1), dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), rows, dtype=torch.long, device=prompt.device)
        first = first.scatter_reduce(0, inverse, torch.arange(rows, device=prompt.device), reduce="amin")
        embeds = model.get_input_embeddings()(input_ids)
        if prompt.shape[-1] != embeds.shape[-1]:
            raise ValueError(f"prompt shape {tuple(prompt.shape)} does not fit hidden size {embeds.shape[-1]}")
        cache = model.base_model(inputs_embeds=prompt[first].to(embeds.dtype), use_cache=True).cache
        cache.reorder_cache(inverse)                                              # (U, ...) → (B, ...) rows
        mask = torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                  use_cache=True).last_hidden_state              # (B, n, d): token positions only
        last = attention_mask.sum(dim=1) - 1
        features = hidden[torch.arange(rows, device=hidden.device), last]
        return PromptedOutput(features=features, hidden=hidden)

    def answer_logits(self, model: nn.Module, out: PromptedOutput, input_ids: torch.Tensor,
                      target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary logits at the positions that predict target tokens, and those tokens.

        out.hidden (B, n, d) at the input positions, input_ids and target_mask (B, n) → (N, V), (N,) for the
        N target tokens of the batch (position j predicts token j + 1).
        """
        predicts = target_mask[:, 1:]
        return model.get_output_embeddings()(out.hidden[:, :-1][predicts]), input_ids[:, 1:][predicts]

    def sequence_log_probs(self, model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, label_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """Summed log-probability of each label's token sequence after each row's input.

        prompt (B, l, d) or None, input_ids/attention_mask (B, n) right-padded, label_ids/label_mask (B, C, L)
        → (B, C); labels without tokens get MASKED_LOGIT. Runs one forward over B·C rows [input | label].
        """
        batch, width = input_ids.shape
        labels, length = label_ids.shape[1:]
        lengths = attention_mask.sum(dim=1).repeat_interleave(labels)                     # (B·C,)
        flat_ids, flat_mask = label_ids.reshape(-1, length), label_mask.reshape(-1, length)
        ids = torch.cat([input_ids.repeat_interleave(labels, 0), input_ids.new_zeros(batch * labels, length)], 1)
        mask = torch.cat([attention_mask.repeat_interleave(labels, 0), attention_mask.new_zeros(batch * labels, length)], 1)
        slots = lengths[:, None] + torch.arange(length, device=ids.device)                # where label tokens go
        ids = ids.scatter(1, slots, torch.where(flat_mask, flat_ids, 0))
        mask = mask.scatter(1, slots, flat_mask.long())
        prompts = prompt.repeat_interleave(labels, 0) if prompt is not None else None
        hidden = self.forward(model, prompts, ids, mask).hidden                            # (B·C, n + L, d)
        before = (slots - 1)[..., None].expand(-1, -1, hidden.shape[-1])                  # positions that predict them
        log_probs = torch.log_softmax(model.get_output_embeddings()(hidden.gather(1, before)).float(), dim=-1)
        picked = log_probs.gather(-1, flat_ids[..., None]).squeeze(-1) * flat_mask
        scores = picked.sum(dim=-1).view(batch, labels)
        return scores.masked_fill(~label_mask.any(dim=-1), MASKED_LOGIT)

    def label_logits(self, model: nn.Module, features: torch.Tensor, token_ids: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the label tokens: features (B, d), token_ids/valid (B, C) → (B, C)."""
        head = model.get_output_embeddings()
        bias = head.bias[token_ids] if getattr(head, "bias", None) is not None else None
        return score_rows(features, head.weight[token_ids], valid, bias)
