"""The latency floor of dynamic batching on Poisson arrivals (issue 16): the p99 / p50 an *ideal* batching server
would get at half its peak rate, from the batch cost measured by `bench/serve.py`, beside what the real one got.

    python bench/queueing.py bench/results/serve-fused.json                 # classify, 1 replica
    python bench/queueing.py bench/results/serve-fused.json --replicas 2    # 2 replicas, each with half the cores
    python bench/queueing.py --cost 20,1 --rate 300                         # any t(b) = 20 ms + 1 ms x b (a GPU-like curve)

The ideal server: whenever a replica is free and requests wait, it takes up to `--max-batch` of them, oldest first,
and answers all of them after t(b) = fixed + per_row x b seconds; no network, no framework, no client on the same
cores. t(b) is the line through the serve bench's two measured points: batching off (b = 1, 1 / requests per s)
and batching on (b = its mean batch, mean batch / requests per s). With `--replicas R` each replica has 1 / R of the
cores, so each batch costs R times as long (an optimistic assumption: threads seldom scale that well).
It is a model, not a bound: the line is fitted through two points, and the measured tail can land on either side
of it (see docs/serving.md), but when the model is far above p99 <= 2 x p50 no batching policy in front of the same
graph on the same cores comes close. Classification only: a classify batch is one forward, while a generate batch
runs until its longest row ends, which this model does not describe.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BatchCost:
    """t(b) = fixed + per_row x b seconds for a batch of b requests."""

    fixed: float
    per_row: float

    def __post_init__(self):
        if self.fixed < 0 or self.per_row <= 0:
            raise ValueError(f"a batch cost needs fixed >= 0 and per_row > 0 seconds, got {self}")

    def __call__(self, rows: int) -> float:
        return self.fixed + self.per_row * rows

    @classmethod
    def through(cls, single_per_s: float, batched_per_s: float, mean_batch: float) -> "BatchCost":
        """The line through (1, 1 / single_per_s) and (mean_batch, mean_batch / batched_per_s)."""
        one, many = 1 / single_per_s, mean_batch / batched_per_s
        per_row = (many - one) / (mean_batch - 1) if mean_batch > 1 else one
        per_row = max(per_row, 1e-9)
        return cls(max(one - per_row, 0.0), per_row)


def simulate(rate: float, cost: BatchCost, replicas: int = 1, max_batch: int = 32, requests: int = 200_000,
             seed: int = 0) -> list[float]:
    """Sojourn times (s), sorted, of `requests` Poisson arrivals at `rate` per s served by the ideal batcher."""
    rng = random.Random(seed)
    arrivals, clock = [], 0.0
    for _ in range(requests):
        clock += rng.expovariate(rate)
        arrivals.append(clock)
    free = [0.0] * replicas
    sojourn, i = [], 0
    while i < requests:
        start = max(heapq.heappop(free), arrivals[i])
        end_of_batch = i + 1
        while end_of_batch < requests and end_of_batch - i < max_batch and arrivals[end_of_batch] <= start:
            end_of_batch += 1
        done = start + cost(end_of_batch - i)
        sojourn += [done - arrivals[k] for k in range(i, end_of_batch)]
        heapq.heappush(free, done)
        i = end_of_batch
    return sorted(sojourn)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def floor_report(rate: float, cost: BatchCost, replicas: int, max_batch: int) -> dict:
    times = simulate(rate, cost, replicas, max_batch)
    p50, p99 = percentile(times, 0.50), percentile(times, 0.99)
    return {"rate_per_s": round(rate, 3), "fixed_ms": round(1000 * cost.fixed, 1),
            "per_row_ms": round(1000 * cost.per_row, 2), "replicas": replicas, "ideal_p50_ms": round(1000 * p50, 1),
            "ideal_p99_ms": round(1000 * p99, 1), "ideal_p99_over_p50": round(p99 / p50, 2)}


def from_serve_result(result: dict, kind: str, replicas: int, max_batch: int) -> dict | None:
    """The ideal batcher at the serve bench's half-peak rate for `kind`, beside the measured half-peak latencies;
    None when the result lacks the batching on / off runs of that kind."""
    on, off = result.get("batching_on", {}).get(kind), result.get("batching_off", {}).get(kind)
    if not on or not off:
        return None
    cost = BatchCost.through(off["requests_per_s"], on["requests_per_s"], on["mean_batch_rows"])
    cost = BatchCost(cost.fixed * replicas, cost.per_row * replicas)
    report = floor_report(on["requests_per_s"] / 2, cost, replicas, max_batch)
    measured = result.get("half_peak", {}).get(kind)
    if measured:
        report.update(measured_p50_ms=measured["p50_ms"], measured_p99_ms=measured["p99_ms"],
                      measured_p99_over_p50=measured["p99_over_p50"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("serve_result", nargs="?", type=Path, help="a JSON written by bench/serve.py")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--cost", help="FIXED_MS,PER_ROW_MS instead of a serve result (needs --rate)")
    parser.add_argument("--rate", type=float, help="arrivals per second (with --cost)")
    args = parser.parse_args()
    if args.cost:
        if not args.rate:
            parser.error("--cost needs --rate (requests per second)")
        fixed, per_row = (float(x) / 1000 for x in args.cost.split(","))
        print(json.dumps(floor_report(args.rate, BatchCost(fixed, per_row), args.replicas, args.max_batch)))
        return
    if not args.serve_result:
        parser.error("give a serve result JSON (bench/results/serve-*.json) or --cost and --rate")
    result = json.loads(args.serve_result.read_text())
    report = from_serve_result(result, "classify", args.replicas, args.max_batch)
    if report is None:
        raise SystemExit(f"{args.serve_result} has no classify run with batching on and off (bench/serve.py --only compare)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
