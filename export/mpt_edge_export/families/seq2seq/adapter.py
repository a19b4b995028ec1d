"""Encoder-decoder family (T5, Flan-T5, mT5): the prompt is prepended to the encoder input only.

The encoder reads [prompt | input] with the prompt always attended; the decoder attends to all of it
through cross-attention (the extended mask). Classification runs one decoder step from the start token:
its (output-scaled) hidden state is the row's feature, scored against the label tokens' output
embeddings, so `features @ W[label]ᵀ` equals the model's own next-token logits. Generate rows carry their
target after the input in the shared batch layout ([input | target + eos | pad], `target_mask`); here the
target moves to the decoder (teacher forcing: [start, t_0, …, t_{L-2}] predicts [t_0, …, t_{L-1}]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpt_edge_export.families.base import MASKED_LOGIT, PromptedOutput, prompted_inputs, score_rows


def output_scale(model: nn.Module) -> float:
    """T5 scales decoder outputs by d^-0.5 before a tied LM head; 1 otherwise."""
    config = model.config
    scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False))
    return config.d_model ** -0.5 if scaled else 1.0


def start_id(model: nn.Module) -> int:
    start = model.config.decoder_start_token_id
    return start if start is not None else model.config.pad_token_id


def left_aligned_targets(input_ids: torch.Tensor, target_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's target tokens moved to the front: (B, n) ids + mask → (B, m) tokens, (B, m) mask, m ≥ 1."""
    if target_mask is None:
        empty = input_ids.new_zeros((input_ids.shape[0], 1))
        return empty, empty.bool()
    lengths = target_mask.sum(dim=1)
    width = max(1, int(lengths.max()))
    order = torch.argsort((~target_mask).long(), dim=1, stable=True)[:, :width]   # target positions first, in order
    mask = torch.arange(width, device=input_ids.device)[None] < lengths[:, None]
    return torch.where(mask, input_ids.gather(1, order), 0), mask


def teacher_forced(tokens: torch.Tensor, mask: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs that predict `tokens` (B, m): [start | t_0 … t_{m-2}], and their mask (B, m): a row's
    L real positions, or the start alone when it has no tokens (classify rows)."""
    ids = torch.cat([tokens.new_full((tokens.shape[0], 1), start), tokens[:, :-1]], dim=1)
    fed = mask.clone()
    fed[:, 0] = True
    return ids, fed


@dataclass(frozen=True)
class Seq2SeqAdapter:
    name: str = "seq2seq"

    def encode(self, model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder over [prompt | input]: hidden (B, l + n, d) and the extended mask (B, l + n)."""
        embeds, mask = prompted_inputs(model, prompt, input_ids, attention_mask)
        return model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask

    def decode(self, model: nn.Module, decoder_ids: torch.Tensor, decoder_mask: torch.Tensor,
               encoded: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states (B, m, d), scaled like the model's own LM-head input."""
        hidden = model.get_decoder()(input_ids=decoder_ids, attention_mask=decoder_mask, encoder_hidden_states=encoded,
                                     encoder_attention_mask=encoder_mask).last_hidden_state
        return hidden * output_scale(model)

    def forward(self, model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, target_mask: torch.Tensor | None = None) -> PromptedOutput:
        """prompt (B, l, d) or None, input_ids/attention_mask/target_mask (B, n) → PromptedOutput.

        features (B, d): decoder step 0; hidden (B, n, d): encoder at the input positions; decoder_hidden
        (B, m, d) and decoder_mask (B, m): the decoder over [start | target[:-1]] (m = 1 without targets)."""
        input_mask = attention_mask if target_mask is None else attention_mask * (~target_mask).long()
        encoded, encoder_mask = self.encode(model, prompt, input_ids, input_mask)
        decoder_ids, decoder_mask = teacher_forced(*left_aligned_targets(input_ids, target_mask), start_id(model))
        hidden = self.decode(model, decoder_ids, decoder_mask.long(), encoded, encoder_mask)
        prompt_len = encoded.shape[1] - input_ids.shape[1]
        return PromptedOutput(features=hidden[:, 0], hidden=encoded[:, prompt_len:], decoder_hidden=hidden,
                              decoder_mask=decoder_mask)

    def answer_logits(self, model: nn.Module, out: PromptedOutput, input_ids: torch.Tensor,
                      target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary logits (N, V) at the decoder positions of the N target tokens, and the tokens (N,)."""
        targets, mask = left_aligned_targets(input_ids, target_mask)
        return model.get_output_embeddings()(out.decoder_hidden[mask]), targets[mask]

    def sequence_log_probs(self, model: nn.Module, prompt: torch.Tensor | None, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, label_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """Summed log-probability of each label's tokens as the decoder's output: (B, C); the encoder runs once
        per row, the decoder over B·C rows [start | label[:-1]]. Labels without tokens get MASKED_LOGIT."""
        labels, length = label_ids.shape[1:]
        encoded, encoder_mask = self.encode(model, prompt, input_ids, attention_mask)
        flat_ids, flat_mask = label_ids.reshape(-1, length), label_mask.reshape(-1, length)
        decoder_ids, decoder_mask = teacher_forced(flat_ids, flat_mask, start_id(model))
        hidden = self.decode(model, decoder_ids, decoder_mask.long(), encoded.repeat_interleave(labels, 0),
                             encoder_mask.repeat_interleave(labels, 0))
        log_probs = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
        picked = log_probs.gather(-1, flat_ids[..., None]).squeeze(-1) * flat_mask
        scores = picked.sum(dim=-1).view(-1, labels)
        return scores.masked_fill(~label_mask.any(dim=-1), MASKED_LOGIT)

    def label_logits(self, model: nn.Module, features: torch.Tensor, token_ids: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """First-step logits of the label tokens: features (B, d), token_ids/valid (B, C) → (B, C)."""
        return score_rows(features, model.get_output_embeddings().weight[token_ids], valid)
