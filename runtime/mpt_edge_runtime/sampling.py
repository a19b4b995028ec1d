"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpt_edge_runtime.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens and when to stop. temperature 0 = greedy (top_k, top_p and seed are then unused)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0                  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0              # keep the smallest set whose probability reaches p (1 = all)
    seed: int | None = None         # sampling seed; None draws a fresh one
    stop: tuple[str, ...] = ()      # generation of a row ends at the first of these strings (not included)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)


def next_tokens(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) → token ids (B,) int64: the argmax (temperature 0), or a draw from `filtered_probabilities`."""
    if config.temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    probs = filtered_probabilities(logits, config)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def filtered_probabilities(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """logits (B, V) → the distribution tokens are drawn from, (B, V) float64: softmax(logits / temperature), cut to
    the top_k most likely tokens (tokens tied with the k-th stay), then to the smallest most-likely-first prefix whose
    probability reaches top_p (ties in order by token id, so a tiny top_p keeps exactly the argmax), renormalised.
    Temperature 0: all mass on the argmax."""
    if config.temperature == 0:
        probs = np.zeros(logits.shape, np.float64)
        np.put_along_axis(probs, logits.argmax(axis=-1)[:, None], 1.0, axis=-1)
        return probs
    scaled = logits.astype(np.float64) / config.temperature
    if config.top_k and config.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -config.top_k, axis=-1)[:, -config.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if config.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")   # numpy's default sort orders ties differently per CPU
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs   # mass of the more likely tokens
        keep = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(keep, order, before < config.top_p, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs
