"""Training losses: the task loss and the MPT distillation terms.

    L = L_task + λ (L_logits + L_hidden)          [λ = 0.9, paper]

L_logits is KL(teacher ‖ student) between temperature-scaled label distributions (times T², so the
gradient scale does not shrink with T); L_hidden is the MSE between the last hidden states at the
real input positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class DistillConfig:
    weight: float = 0.9        # λ [paper]
    temperature: float = 1.0   # T on the output distributions (not stated in the paper)

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"distillation weight λ must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")


def batch_task_loss(logits: torch.Tensor, batch, answers: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The task loss of a batch that may mix kinds: cross-entropy of classify rows over their label logits
    (B, C) and of generate rows over their target tokens (`answers` = logits (N, V), tokens (N,)), each
    weighted by its share of the batch's rows."""
    classify = batch.labels >= 0
    parts = []
    if classify.any():
        parts.append(F.cross_entropy(logits[classify], batch.labels[classify]) * classify.float().mean())
    if answers is not None and answers[1].numel():
        parts.append(F.cross_entropy(*answers) * (~classify).float().mean())
    return torch.stack(parts).sum()


def logits_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over rows. Inputs (B, C)."""
    log_p_teacher = F.log_softmax(teacher.detach() / temperature, dim=-1)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def hidden_distillation(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between hidden states (B, n, d) over the real positions of `mask` (B, n)."""
    weights = mask.unsqueeze(-1).to(student.dtype)
    squared = (student - teacher.detach()).pow(2) * weights
    return squared.sum() / (weights.sum() * student.shape[-1]).clamp(min=1.0)


def distillation_loss(student_logits, teacher_logits, student_hidden, teacher_hidden, mask,
                      config: DistillConfig, answers: tuple | None = None,
                      decoder: tuple | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """λ (L_logits + L_hidden) and its parts for logging. `student_logits`/`teacher_logits` are the label
    logits (B_c, C) of classify rows; `answers` = (student (N, V), teacher (N, V), share of generate rows)
    adds the KL of the output distributions at the answer positions, each part weighted by its row share.
    The hidden MSE reads `mask` (B, n): the input positions. Encoder-decoder backbones add the decoder's:
    `decoder` = (student (B, m, d), teacher (B, m, d), mask (B, m)), as in the paper's appendix."""
    share = 1.0 - (answers[2] if answers is not None else 0.0)
    kl = student_logits.new_zeros(())
    if share > 0 and student_logits.shape[0]:
        kl = kl + share * logits_distillation(student_logits, teacher_logits, config.temperature)
    if answers is not None and answers[0].shape[0]:
        kl = kl + answers[2] * logits_distillation(answers[0], answers[1], config.temperature)
    mse = hidden_distillation(student_hidden, teacher_hidden, mask)
    if decoder is not None:
        mse = mse + hidden_distillation(*decoder)
    return config.weight * (kl + mse), {"kl": kl.item(), "mse": mse.item()}
