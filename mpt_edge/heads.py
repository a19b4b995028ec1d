"""Per-task linear heads for the encoder family: pooled features (B, d) → label logits (B, C_max)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mpt_edge_export.families.base import score_rows


class TaskHeads(nn.Module):
    """One (C_k, d) weight and (C_k,) bias per task; rows of a batch may belong to different tasks."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]):
        super().__init__()
        if len(weights) != len(biases) or any(w.shape[0] != b.shape[0] for w, b in zip(weights, biases)):
            raise ValueError("each task head needs a weight (C_k, d) and a bias (C_k,) with the same C_k")
        self.weight = nn.ParameterList(nn.Parameter(w.detach().clone().float()) for w in weights)
        self.bias = nn.ParameterList(nn.Parameter(b.detach().clone().float()) for b in biases)

    @classmethod
    def random(cls, label_counts: Sequence[int], dim: int, generator: torch.Generator) -> "TaskHeads":
        """Heads drawn from N(0, 1/d), zero biases."""
        weights = [torch.randn(c, dim, generator=generator) / dim**0.5 for c in label_counts]
        return cls(weights, [torch.zeros(c) for c in label_counts])

    @property
    def label_counts(self) -> list[int]:
        return [w.shape[0] for w in self.weight]

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """features (B, d), task_ids (B,) → logits (B, C_max); slots past a task's labels are masked."""
        width = max(self.label_counts)
        weight = torch.stack([F.pad(w, (0, 0, 0, width - w.shape[0])) for w in self.weight])[task_ids]
        bias = torch.stack([F.pad(b, (0, width - b.shape[0])) for b in self.bias])[task_ids]
        counts = torch.tensor(self.label_counts, device=features.device)[task_ids]
        valid = torch.arange(width, device=features.device)[None, :] < counts[:, None]
        return score_rows(features, weight, valid, bias)

    def select(self, order) -> "TaskHeads":
        """A frozen copy holding the heads of tasks `order` (indices into this one), in that order."""
        order = [int(k) for k in order]
        return TaskHeads([self.weight[k] for k in order], [self.bias[k] for k in order]).requires_grad_(False)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, (w, b) in enumerate(zip(self.weight, self.bias)):
            out[f"heads.{k}.weight"], out[f"heads.{k}.bias"] = w.detach(), b.detach()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_tasks: int) -> "TaskHeads":
        return cls([tensors[f"heads.{k}.weight"] for k in range(num_tasks)],
                   [tensors[f"heads.{k}.bias"] for k in range(num_tasks)])
