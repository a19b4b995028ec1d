"""Training losses: the task loss and the MPT distillation terms.

    L = L_task + λ (L_logits + L_hidden)          [λ = 0.9, paper]

L_logits is KL(teacher ‖ student) between temperature-scaled label distributions (times T², so the
gradient scale does not shrink with T); L_hidden is the MSE between the last hidden states at the
real input positions. Every term is computed in fp32, also from a bf16 autocast forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mpt_edge.errors import ConfigError


@dataclass(frozen=True)
class DistillConfig:
    weight: float = 0.9        # λ [paper]
    temperature: float = 1.0   # T on the output distributions (not stated in the paper)

    def __post_init__(self):
        if self.weight < 0:
            raise ConfigError(f"distillation weight λ must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class Totals:
    """Counts over a whole batch that every loss term is normalised by. Each term is a sum over rows or tokens
    divided by one of these, so the losses of a batch's shards (data-parallel ranks) add up exactly to the
    loss of the batch when the totals are the whole batch's."""

    rows: int
    generate_rows: int = 0
    answer_tokens: int = 0      # target tokens of generate rows
    input_tokens: int = 0       # real input positions (hidden-state MSE)
    decoder_tokens: int = 0     # decoder positions (seq2seq hidden-state MSE): max(target length, 1) per row

    @classmethod
    def of(cls, batch) -> "Totals":
        targets = batch.target_mask.sum(dim=1) if batch.target_mask is not None else batch.labels.new_zeros(len(batch))
        return cls(rows=len(batch), generate_rows=int((batch.labels < 0).sum()), answer_tokens=int(targets.sum()),
                   input_tokens=int(batch.input_mask.sum()), decoder_tokens=int(targets.clamp(min=1).sum()))

    @property
    def generate_share(self) -> float:
        return self.generate_rows / max(self.rows, 1)


def batch_task_loss(logits: torch.Tensor, batch, answers: tuple[torch.Tensor, torch.Tensor] | None,
                    totals: Totals | None = None) -> torch.Tensor:
    """The task loss of a batch that may mix kinds: cross-entropy of classify rows over their label logits
    (B, C) and of generate rows over their target tokens (`answers` = logits (N, V), tokens (N,)), each part
    the mean over its rows or tokens weighted by its share of the rows (of `totals`, default the batch's)."""
    totals = totals or Totals.of(batch)
    classify = batch.labels >= 0
    logits = logits.float()
    loss = logits.new_zeros(())
    if classify.any():
        loss = loss + F.cross_entropy(logits[classify], batch.labels[classify], reduction="sum") / totals.rows
    if answers is not None and answers[1].numel():
        loss = loss + F.cross_entropy(answers[0].float(), answers[1], reduction="sum") / totals.answer_tokens * totals.generate_share
    return loss


def logits_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                        count: int | None = None) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) summed over rows / `count` (default: the rows). (B, C)."""
    log_p_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    return kl * temperature**2 / max(count if count is not None else student.shape[0], 1)


def hidden_distillation(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                        count: int | None = None) -> torch.Tensor:
    """MSE between hidden states (B, n, d) over the real positions of `mask` (B, n), per position and unit;
    `count` positions (default: the mask's) normalise the sum."""
    student, teacher = student.float(), teacher.detach().float()
    weights = mask.unsqueeze(-1).to(student.dtype)
    squared = (student - teacher).pow(2) * weights
    positions = count if count is not None else int(mask.sum())
    return squared.sum() / max(positions * student.shape[-1], 1)


def distillation_loss(student_logits, teacher_logits, student_hidden, teacher_hidden, mask,
                      config: DistillConfig, answers: tuple | None = None, decoder: tuple | None = None,
                      totals: Totals | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """λ (L_logits + L_hidden) and its parts for logging. `student_logits`/`teacher_logits` are the label
    logits (B_c, C) of classify rows; `answers` = (student (N, V), teacher (N, V)) adds the KL of the output
    distributions at the answer positions, each part weighted by its share of the rows. The hidden MSE reads
    `mask` (B, n): the input positions. Encoder-decoder backbones add the decoder's: `decoder` = (student
    (B, m, d), teacher (B, m, d), mask (B, m)), as in the paper's appendix. `totals` (default: what these
    tensors hold, classify rows only) normalise every sum, see `Totals`."""
    totals = totals or Totals(rows=student_logits.shape[0], input_tokens=int(mask.sum()),
                              decoder_tokens=int(decoder[2].sum()) if decoder is not None else 0)
    kl = student_logits.new_zeros((), dtype=torch.float32)
    if student_logits.shape[0]:
        kl = kl + logits_distillation(student_logits, teacher_logits, config.temperature, totals.rows)
    if answers is not None and answers[0].shape[0]:
        kl = kl + totals.generate_share * logits_distillation(answers[0], answers[1], config.temperature,
                                                              totals.answer_tokens)
    mse = hidden_distillation(student_hidden, teacher_hidden, mask, totals.input_tokens)
    if decoder is not None:
        mse = mse + hidden_distillation(*decoder, totals.decoder_tokens)
    return config.weight * (kl + mse), {"kl": kl.item(), "mse": mse.item()}
