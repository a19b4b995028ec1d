"""Examples-proportional mixing with a cap, stochastic task sampling, and round-robin epochs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mpt_edge.task_mixing import MixtureSampler, RoundRobinSampler, mixing_rates


def test_mixing_rates_are_proportional_up_to_the_cap():
    rates = mixing_rates([100, 300, 10_000], cap=1000)
    np.testing.assert_allclose(rates, np.array([100, 300, 1000]) / 1400)
    with pytest.raises(ValueError, match="cap"):
        mixing_rates([1, 2], cap=0)


def test_each_batch_draws_between_two_and_kappa_tasks():
    sampler = MixtureSampler(sizes=(50, 80, 500, 20, 40), batch_size=16, seed=3, cap=200, max_tasks=3)
    ks = Counter()
    for step in range(2000):
        chosen = sampler.tasks_for(step)
        assert 2 <= len(chosen) <= 3 and len(set(chosen.tolist())) == len(chosen)
        assert {t for t, _ in sampler.batch(step)} <= set(chosen.tolist())
        ks[len(chosen)] += 1
    # K is uniform on {2, 3}: each about half of 2000 (binomial sd ≈ 22)
    assert abs(ks[2] - 1000) < 120 and abs(ks[3] - 1000) < 120


def test_rows_follow_the_capped_mixing_rates_when_all_tasks_are_drawn():
    sizes = (100, 300, 5000)
    sampler = MixtureSampler(sizes=sizes, batch_size=32, seed=0, cap=1000, max_tasks=3)
    counts = Counter()
    steps = 0
    for step in range(4000):
        if len(sampler.tasks_for(step)) == 3:
            counts.update(t for t, _ in sampler.batch(step))
            steps += 1
    total = 32 * steps
    expected = mixing_rates(sizes, 1000) * total
    observed = np.array([counts[t] for t in range(3)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # χ²(2) at p = 0.001


def test_batches_are_a_pure_function_of_seed_and_step_and_indices_in_range():
    a = MixtureSampler(sizes=(7, 9), batch_size=8, seed=1)
    b = MixtureSampler(sizes=(7, 9), batch_size=8, seed=1)
    c = MixtureSampler(sizes=(7, 9), batch_size=8, seed=2)
    assert [a.batch(s) for s in range(20)] == [b.batch(s) for s in reversed(range(20))][::-1]
    assert [a.batch(s) for s in range(20)] != [c.batch(s) for s in range(20)]
    assert all(0 <= i < (7, 9)[t] for s in range(50) for t, i in a.batch(s))


def test_round_robin_alternates_tasks_and_covers_every_example_each_epoch():
    sampler = RoundRobinSampler(sizes=(6, 4), batch_size=2, seed=0)
    seen = {0: [], 1: []}
    for step in range(12):  # 6 batches per task: task 0 sees 12 rows (2 epochs), task 1 sees 12 (3 epochs)
        picks = sampler.batch(step)
        assert {t for t, _ in picks} == {step % 2}
        seen[step % 2].extend(i for _, i in picks)
    assert sorted(seen[0][:6]) == list(range(6)) and sorted(seen[0][6:]) == list(range(6))
    assert all(sorted(seen[1][e * 4:(e + 1) * 4]) == list(range(4)) for e in range(3))
    assert seen[0][:6] != seen[0][6:]  # a fresh permutation each epoch
