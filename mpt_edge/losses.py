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


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over label logits (B, C) against label indices (B,)."""
    return F.cross_entropy(logits, labels)


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
                      config: DistillConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """λ (L_logits + L_hidden) and its parts for logging."""
    kl = logits_distillation(student_logits, teacher_logits, config.temperature)
    mse = hidden_distillation(student_hidden, teacher_hidden, mask)
    return config.weight * (kl + mse), {"kl": kl.item(), "mse": mse.item()}
