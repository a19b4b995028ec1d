"""How to generate: `SamplingParams` (checked once, when made), and choosing the next token from logits: greedy, or
sampling with temperature, top-k and top-p (numpy only).

    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=0, stop=["\n"])
    engine.generate("task", ["text"], params)          # or the same options as keywords: engine.generate(..., seed=0)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np

from mpt_edge_runtime.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 = greedy (top_k, top_p and seed are then unused).
    Every field is checked when the object is made: a bad value is an InputError that names it."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0                  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0              # keep the smallest set whose probability reaches p (1 = all)
    seed: int | None = None         # sampling seed; None draws a fresh one
    stop: tuple[str, ...] = ()      # generation of a row ends at the first of these strings (not included);
                                    # a string or any sequence of strings is accepted and kept as a tuple

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise InputError(f"seed must be an integer >= 0 or None (a fresh seed), got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


def sampling_params(sampling: SamplingParams | None, options: Mapping[str, object]) -> SamplingParams:
    """What a generation call asked for: `sampling` (None: the defaults) with the keyword `options` (fields of
    SamplingParams, as the engine's methods accept them) put over it. The one place the engine builds it."""
    unknown = sorted(set(options) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; sampling options are "
                        f"{', '.join(SAMPLING_FIELDS)}")
    if sampling is None:
        return SamplingParams(**options)
    if not isinstance(sampling, SamplingParams):
        raise InputError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__} {sampling!r}; "
                         "e.g. SamplingParams(max_new_tokens=8), or pass the options as keywords (max_new_tokens=8)")
    return replace(sampling, **options) if options else sampling


def next_tokens(logits: np.ndarray, config: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) → token ids (B,) int64: the argmax (temperature 0), or a draw from `filtered_probabilities`."""
    if config.temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64, copy=False)
    probs = filtered_probabilities(logits, config)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def filtered_probabilities(logits: np.ndarray, config: SamplingParams) -> np.ndarray:
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
