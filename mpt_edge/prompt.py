"""The Multitask Prompt Tuning prompt: one shared prompt per group and a low-rank factor pair per task.

    P_k = P*_{g(k)} ∘ (U_k V_k)        P* (l, d), U_k (l, r), V_k (r, d), ∘ = Hadamard product

Each group's P* and each task's U_k, V_k is its own parameter, so a task absent from a batch gets no
gradient (grad None), and optimizers leave it and its state untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mpt_edge.errors import ConfigError


@dataclass(frozen=True)
class PromptConfig:
    length: int = 100  # l: prompt vectors prepended to the input [paper: 100]
    rank: int = 1      # r: rank of each task's factor pair U_k V_k [paper: 1]

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"prompt length must be an integer >= 1, got {self.length!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"prompt rank must be an integer >= 1, got {self.rank!r}")


class MultitaskPrompt(nn.Module):
    """Shared prompts (G × (l, d)), task factors U (T × (l, r)) and V (T × (r, d)), task → group map."""

    def __init__(self, shared: torch.Tensor, u: torch.Tensor, v: torch.Tensor, task_groups: Sequence[int]):
        """shared (G, l, d), u (T, l, r), v (T, r, d); task_groups: T ints in [0, G)."""
        super().__init__()
        groups, length, dim = shared.shape
        tasks, rank = u.shape[0], u.shape[2]
        if u.shape != (tasks, length, rank) or v.shape != (tasks, rank, dim):
            raise ValueError(
                f"factor shapes do not fit: shared {tuple(shared.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}; "
                f"expected u (T, {length}, r) and v (T, r, {dim})"
            )
        if len(task_groups) != tasks or any(not 0 <= g < groups for g in task_groups):
            raise ConfigError(f"task_groups must give each of the {tasks} tasks a group in [0, {groups}), got {list(task_groups)}")
        self.shared = nn.ParameterList(nn.Parameter(p.detach().clone().float()) for p in shared)
        self.u = nn.ParameterList(nn.Parameter(p.detach().clone().float()) for p in u)
        self.v = nn.ParameterList(nn.Parameter(p.detach().clone().float()) for p in v)
        self.register_buffer("task_groups", torch.tensor(list(task_groups), dtype=torch.long), persistent=False)

    @property
    def num_tasks(self) -> int:
        return len(self.u)

    @property
    def length(self) -> int:
        return self.shared[0].shape[0]

    @property
    def rank(self) -> int:
        return self.u[0].shape[1]

    @property
    def hidden_size(self) -> int:
        return self.shared[0].shape[1]

    def compose(self, task_ids: torch.Tensor) -> torch.Tensor:
        """task_ids (B,) → prompts (B, l, d); each row gets its own task's prompt."""
        task_ids = task_ids.to(self.task_groups.device)
        unique, inverse = torch.unique(task_ids, return_inverse=True)
        per_task = torch.stack([self._task_prompt(int(k)) for k in unique])
        return per_task[inverse]

    def fold(self) -> torch.Tensor:
        """Every task's composed prompt: (T, l, d)."""
        return torch.stack([self._task_prompt(k) for k in range(self.num_tasks)])

    def _task_prompt(self, k: int) -> torch.Tensor:
        return self.shared[int(self.task_groups[k])] * (self.u[k] @ self.v[k])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Stacked tensors for saving: shared (G, l, d), u (T, l, r), v (T, r, d), task_groups (T,)."""
        return {
            "prompt.shared": torch.stack([p.detach() for p in self.shared]),
            "prompt.u": torch.stack([p.detach() for p in self.u]),
            "prompt.v": torch.stack([p.detach() for p in self.v]),
            "prompt.task_groups": self.task_groups.clone(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "MultitaskPrompt":
        return cls(tensors["prompt.shared"], tensors["prompt.u"], tensors["prompt.v"],
                   tensors["prompt.task_groups"].tolist())

    def set_trainable(self, *, shared: bool, factors: bool) -> "MultitaskPrompt":
        for p in self.shared:
            p.requires_grad_(shared)
        for p in [*self.u, *self.v]:
            p.requires_grad_(factors)
        return self
