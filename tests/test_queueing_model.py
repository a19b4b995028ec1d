"""bench/queueing.py's ideal batcher: checked against queueing theory before its numbers go into the docs."""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("queueing", Path(__file__).parents[1] / "bench" / "queueing.py")
queueing = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = queueing          # dataclasses look their module up there
spec.loader.exec_module(queueing)


def test_one_request_per_batch_is_md1_and_matches_pollaczek_khinchine():
    service, rate = 0.1, 6.0                     # rho = 0.6
    times = queueing.simulate(rate, queueing.BatchCost(0.0, service), max_batch=1, requests=100_000)
    rho = rate * service
    expected = service + rho * service / (2 * (1 - rho))    # M/D/1 mean sojourn
    assert statistics.fmean(times) == pytest.approx(expected, rel=0.03)


def test_batching_absorbs_bursts_only_when_a_batch_costs_less_than_its_rows():
    sublinear = queueing.floor_report(300.0, queueing.BatchCost(0.020, 0.001), replicas=1, max_batch=32)
    linear = queueing.floor_report(5.0, queueing.BatchCost(0.0, 0.1), replicas=1, max_batch=32)
    assert sublinear["ideal_p99_over_p50"] < 2 < linear["ideal_p99_over_p50"]


def test_the_cost_line_goes_through_both_measured_points():
    cost = queueing.BatchCost.through(single_per_s=8.0, batched_per_s=10.0, mean_batch=25.0)
    assert cost(1) == pytest.approx(1 / 8.0)
    assert cost(25) == pytest.approx(25 / 10.0)
    with pytest.raises(ValueError, match="per_row > 0"):
        queueing.BatchCost(0.1, 0.0)
