"""Which examples go into training step s: a pure function of (seed, step), so resuming is exact.

Mixture sampling (source stage, `group` mode): examples-proportional mixing rates with a cap, and
stochastic task sampling: each batch draws K ∈ [2, κ] tasks by those rates and fills itself from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpt_edge.errors import ConfigError, DataError


def mixing_rates(sizes: Sequence[int], cap: int) -> np.ndarray:
    """Examples-proportional mixing with a cap: rate_k ∝ min(n_k, cap). (T,) summing to 1."""
    if cap < 1:
        raise ConfigError(f"mixing cap must be >= 1, got {cap}")
    capped = np.minimum(np.asarray(sizes, dtype=np.float64), cap)
    if capped.sum() <= 0:
        raise DataError("every task is empty; nothing to sample")
    return capped / capped.sum()


@dataclass(frozen=True)
class MixtureSampler:
    """Batches of `batch_size` (task, example) picks from tasks of the given sizes."""

    sizes: tuple[int, ...]
    batch_size: int
    seed: int = 0
    cap: int = 3000          # examples-proportional mixing cap (a huge task does not drown the rest)
    max_tasks: int = 4       # κ: at most this many tasks per batch (at least 2 when there are 2)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tasks < 1:
            raise ConfigError(f"max_tasks (κ) must be >= 1, got {self.max_tasks}")
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))

    @property
    def rates(self) -> np.ndarray:
        return mixing_rates(self.sizes, self.cap)

    def tasks_for(self, step: int) -> np.ndarray:
        """The K tasks of step `step` (K uniform in [min(2, T), min(κ, T)]), drawn without replacement by rate."""
        rng = np.random.default_rng([self.seed, step, 0])
        n = len(self.sizes)
        low, high = min(2, n), max(min(self.max_tasks, n), min(2, n))
        k = int(rng.integers(low, high + 1))
        return rng.choice(n, size=k, replace=False, p=self.rates)

    def batch(self, step: int) -> list[tuple[int, int]]:
        """[(task, example)] for step `step`: rows split among that step's tasks by their rates."""
        chosen = self.tasks_for(step)
        rng = np.random.default_rng([self.seed, step, 1])
        p = self.rates[chosen] / self.rates[chosen].sum()
        tasks = rng.choice(chosen, size=self.batch_size, p=p)
        return [(int(t), int(rng.integers(0, self.sizes[t]))) for t in tasks]


@dataclass(frozen=True)
class RoundRobinSampler:
    """Single-task batches; step s trains task s mod T (teachers: independent prompts, one run).

    Each task walks through seeded per-epoch permutations of its examples (every example once per
    epoch); the j-th example a task sees depends only on (seed, task, j), so this too is stateless.
    """

    sizes: tuple[int, ...]
    batch_size: int
    seed: int = 0

    def batch(self, step: int) -> list[tuple[int, int]]:
        task, visit = step % len(self.sizes), step // len(self.sizes)
        first = visit * self.batch_size
        return [(task, self._nth(task, j)) for j in range(first, first + self.batch_size)]

    def _nth(self, task: int, j: int) -> int:
        n = self.sizes[task]
        order = np.random.default_rng([self.seed, task, j // n, 2]).permutation(n)
        return int(order[j % n])
