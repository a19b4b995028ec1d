"""Token sampling (temperature, top-k, top-p, seed) against a small reference written here in plain Python/numpy.

The reference's rules: probabilities are softmax(logits / temperature); top-k keeps every token whose scaled logit
is at least the k-th largest (ties with the k-th stay, as in Hugging Face's TopKLogitsWarper); top-p then walks the
kept tokens from most to least likely, ties by lower token id, and keeps each token while the mass before it is
below p; the kept probabilities are renormalised.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpt_edge_runtime.generation import decode
from mpt_edge_runtime.sampling import SamplingParams, filtered_probabilities, next_tokens


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """One row of logits (V,) → the distribution to sample from (V,), token by token."""
    scaled = [float(x) / temperature for x in logits]
    vocab = len(scaled)
    kept = set(range(vocab))
    if 0 < top_k < vocab:
        kth = sorted(scaled, reverse=True)[top_k - 1]
        kept = {i for i in kept if scaled[i] >= kth}
    top = max(scaled[i] for i in kept)
    weights = {i: np.exp(scaled[i] - top) for i in kept}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if top_p < 1:
        mass, chosen = 0.0, set()
        for i in sorted(kept, key=lambda i: (-probs[i], i)):
            if mass >= top_p:
                break
            chosen.add(i)
            mass += probs[i]
        kept = chosen
    out = np.zeros(vocab)
    total = sum(probs[i] for i in kept)
    for i in kept:
        out[i] = probs[i] / total
    return out


def assert_same_distribution(got: np.ndarray, expected: np.ndarray) -> None:
    """Same support exactly, same renormalised probabilities (float64 rounding only)."""
    assert np.flatnonzero(got).tolist() == np.flatnonzero(expected).tolist()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def config(temperature=1.0, top_k=0, top_p=1.0, seed=None) -> SamplingParams:
    return SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


LOGITS = np.random.default_rng(0).normal(0, 2, (4, 50)).astype(np.float32)
FILTERS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (2.5, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (1.0, 0, 0.5),
           (0.8, 10, 0.8), (1.3, 3, 0.99), (1.0, 1, 1.0), (0.05, 0, 0.95), (50.0, 0, 0.3)]


@pytest.mark.parametrize("temperature, top_k, top_p", FILTERS)
def test_filtered_distribution_equals_the_reference(temperature, top_k, top_p):
    got = filtered_probabilities(LOGITS, config(temperature, top_k, top_p))
    assert got.shape == LOGITS.shape and np.allclose(got.sum(-1), 1.0)
    for row, logits in zip(got, LOGITS):
        assert_same_distribution(row, reference_distribution(logits, temperature, top_k, top_p))


def test_temperature_scales_the_logits_before_the_softmax():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.5, 1.0, 3.0):
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        np.testing.assert_allclose(filtered_probabilities(logits, config(temperature)), expected, rtol=1e-12)
    cold = filtered_probabilities(logits, config(0.01))[0]      # neighbours 1 apart: ratio e^(-1 / T)
    hot = filtered_probabilities(logits, config(1000.0))[0]
    assert cold[1] / cold[0] == pytest.approx(np.exp(-100.0), rel=1e-9) and cold[0] == 1.0
    assert hot[1] / hot[0] == pytest.approx(np.exp(-0.001), rel=1e-9)


@pytest.mark.parametrize("top_k", [0, 50, 51, 1000])
def test_top_k_of_the_whole_vocabulary_or_more_filters_nothing(top_k):
    expected = filtered_probabilities(LOGITS, config(0.9))
    np.testing.assert_array_equal(filtered_probabilities(LOGITS, config(0.9, top_k=top_k)), expected)
    assert (expected > 0).all()


def test_top_k_keeps_tokens_tied_with_the_kth():
    logits = np.array([[3.0, 1.0, 2.0, 1.0, 1.0, 0.0]])
    got = filtered_probabilities(logits, config(top_k=3))[0]
    assert np.flatnonzero(got).tolist() == [0, 1, 2, 3, 4]
    assert_same_distribution(got, reference_distribution(logits[0], 1.0, top_k=3))


def test_tiny_top_p_keeps_exactly_the_argmax_even_among_ties():
    logits = np.full((2, 1000), -1.0)
    logits[0, ::2] = 5.0                             # 500 tokens tie for the most likely
    logits[1, 3] = 2.0
    got = filtered_probabilities(logits, config(top_p=1e-9))
    expected = np.zeros_like(logits)
    expected[[0, 1], [0, 3]] = 1.0                   # np.argmax (greedy) picks the first of the tied tokens
    np.testing.assert_array_equal(got, expected)
    assert next_tokens(logits, config(top_p=1e-9), np.random.default_rng(0)).tolist() == [0, 3]


def test_top_p_boundary_ties_are_broken_by_token_id():
    logits = np.zeros((1, 300))
    logits[0, ::3] = np.log(3.0)                     # 100 tokens of probability 3/500 each, 200 of 1/500
    top_p = 10 * 3 / 500 - 0.001                     # the mass is reached inside the tied group, at its 10th token
    got = filtered_probabilities(logits, config(top_p=top_p))[0]
    assert np.flatnonzero(got).tolist() == list(range(0, 30, 3))   # the 10 lowest ids of the group
    assert_same_distribution(got, reference_distribution(logits[0], 1.0, top_p=top_p))


def test_temperature_zero_puts_all_mass_on_the_greedy_token():
    got = filtered_probabilities(LOGITS, config(0.0))
    np.testing.assert_array_equal(got.argmax(-1), LOGITS.argmax(-1))
    assert (got.max(-1) == 1.0).all() and (got.sum(-1) == 1.0).all()


def test_seeded_draws_are_reproducible_and_follow_the_filtered_distribution():
    cfg = config(0.8, top_k=8, top_p=0.9)
    logits = np.repeat(LOGITS[:1], 20_000, axis=0)
    first = next_tokens(logits, cfg, np.random.default_rng(42))
    assert np.array_equal(first, next_tokens(logits, cfg, np.random.default_rng(42)))
    assert not np.array_equal(first, next_tokens(logits, cfg, np.random.default_rng(43)))
    expected = reference_distribution(LOGITS[0], 0.8, 8, 0.9)
    uniforms = np.random.default_rng(42).random((len(logits), 1))
    assert np.array_equal(first, (np.cumsum(expected) < uniforms).sum(-1))   # inverse CDF of the same draws
    counts = np.bincount(first, minlength=LOGITS.shape[1])
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))
    support = expected > 0
    chi2 = float(((counts[support] - expected[support] * len(logits)) ** 2 / (expected[support] * len(logits))).sum())
    assert chi2 < 30.0, chi2   # χ² with ≤ 7 degrees of freedom: p < 1e-4


class FixedLogits:
    """A stand-in generation session: every step's logits are the same rows, so only decode() is under test."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def start(self, rows):
        return self.logits, None, None

    def advance(self, state, tokens):
        return self.logits, state


def test_decode_samples_through_the_filters_with_its_seed():
    steps = FixedLogits(LOGITS)
    rows = [(None, [1])] * len(LOGITS)
    sampled = SamplingParams(max_new_tokens=40, temperature=1.2, top_k=4, seed=7)
    tokens = np.stack(list(decode(steps, rows, sampled)), axis=1)
    assert np.array_equal(tokens, np.stack(list(decode(steps, rows, sampled)), axis=1))
    top4 = np.argsort(-LOGITS, axis=-1)[:, :4]
    assert all(set(row) <= set(allowed) for row, allowed in zip(tokens.tolist(), top4.tolist()))
    assert all(len(set(row)) > 1 for row in tokens.tolist())   # it samples: not one token over 40 draws
    greedy = np.stack(list(decode(steps, rows, SamplingParams(max_new_tokens=3, temperature=1.0, top_p=1e-9, seed=1))))
    assert (greedy == LOGITS.argmax(-1)).all()
