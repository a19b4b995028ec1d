"""`bench/quality.py --report`: the tables of a suite in progress, from its runs.jsonl, training nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402


def run(target: str, seed: int, method: str, accuracy: float, evals=()) -> dict:
    return {"target": target, "k": 16, "seed": seed, "method": method, "scores": {"accuracy": accuracy},
            "extra": {"evals": [{"step": s, "score": d, "details": {"dev": d, "test": t}} for s, d, t in evals]},
            "seconds": 1800.0}


def test_report_counts_the_runs_done_and_skips_targets_without_any(tmp_path):
    suite = {**quality.DEFAULTS, "name": "demo", "targets": ["alpha", "beta"], "k": [16], "seeds": [0, 1],
             "methods": ["pt", "mpt-full"], "curve": True, "eval_every": 25}
    runs = [run("alpha", 0, "pt", 0.5, [(0, 0.4, 0.41), (25, 0.6, 0.62)]),
            run("alpha", 0, "mpt-full", 0.7, [(0, 0.5, 0.52), (25, 0.8, 0.79)]),
            run("alpha", 0, "mpt-factors", 0.6)]   # a method the suite no longer runs: kept, not counted
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    report = quality.report_so_far(suite, tmp_path)
    assert report.startswith("demo: 2 of 8 runs done (1.0 h of runs)")
    assert "| alpha | 16 | 50.0 ± 0.0 | 70.0 ± 0.0 |" in report
    assert "| mpt-full | 50.0 / 52.0 | 80.0 / 79.0 |" in report
    assert "alpha, k = 16: dev / test" in report and "beta, k = 16: dev / test" not in report


def test_selection_table_counts_the_runs_that_kept_the_untrained_step():
    suite = {**quality.DEFAULTS, "name": "demo", "targets": ["alpha"], "k": [16, 64], "seeds": [0, 1, 2],
             "methods": ["baseline", "pt", "mpt-full"]}
    runs = [{**run("alpha", seed, "mpt-full", 0.5), "extra": {"best": {"step": step, "score": 0.5}}}
            for seed, step in enumerate([0, 50, 0])]
    runs.append({**run("alpha", 0, "pt", 0.5), "extra": {"best": {"step": 100, "score": 0.5}}})
    runs.append(run("alpha", 0, "baseline", 0.3))   # zero-shot: no step to keep
    table = quality.selection_table(suite, runs)
    assert "| pt | 0 of 1, 100 | – |" in table and "| mpt-full | 2 of 3, 0 | – |" in table
    assert "| baseline |" not in table
    assert quality.selection_table(suite, [run("alpha", 0, "baseline", 0.3)]) == ""


def test_ablation_table_pairs_runs_with_the_base_suite_and_reports_dev_and_test():
    def graded(target, seed, dev, test):
        return {**run(target, seed, "mpt-factors", test), "extra": {"best": {"step": 100, "score": dev}}}

    base = [graded("alpha", 0, 0.50, 0.40), graded("beta", 0, 0.60, 0.70), graded("gamma", 0, 0.1, 0.1)]
    ablation = [graded("alpha", 0, 0.56, 0.45), graded("beta", 0, 0.62, 0.68), graded("delta", 0, 0.9, 0.9)]
    table = quality.ablation_table("rank2", ablation, "transfer", base)
    assert "| alpha | 16 | 0 | mpt-factors | 50.0 | 56.0 | 40.0 | 45.0 |" in table
    assert "delta" not in table and "gamma" not in table                       # only runs both suites finished
    assert "over 2 pairs: dev +4.0 [" in table and ", test +1.5 [" in table
    assert "none of its 1 runs" in quality.ablation_table("rank2", ablation[2:], "transfer", base)
    assert "rank2's kept in 2 of 2; test of the kept − transfer: +1.5 [" in table
    assert "Against transfer's PT" not in table                                  # the base ran no PT
    with_pt = quality.ablation_table("rank2", ablation, "transfer", base + [run("alpha", 0, "pt", 0.42)])
    assert "Against transfer's PT on the same 1 (target, k, seed): transfer -2.0, the kept +3.0" in with_pt
    tie = quality.ablation_table("rank2", [graded("alpha", 0, 0.50, 0.90)], "transfer", base)
    assert "rank2's kept in 0 of 1; test of the kept − transfer: +0.0" in tie   # a dev tie keeps the base
    renamed = [{**r, "method": "mpt-factors-r6"} for r in ablation]               # a variant under its own name
    assert "none of its 3 runs" in quality.ablation_table("r6", renamed, "transfer", base)
    beside = quality.ablation_table("r6", renamed, "transfer", base, base_method="mpt-factors")
    assert "| alpha | 16 | 0 | mpt-factors-r6 / mpt-factors | 50.0 | 56.0 | 40.0 | 45.0 |" in beside
    assert "over 2 pairs: dev +4.0 [" in beside


def test_table_pairs_every_method_with_pt_and_each_mpt_mode_with_spot():
    suite = {**quality.DEFAULTS, "name": "demo", "targets": ["alpha", "beta"], "k": [16], "seeds": [0, 1],
             "methods": ["baseline", "pt", "spot", "mpt-full"]}
    accuracy = {("alpha", "pt"): (0.50, 0.60), ("alpha", "spot"): (0.55, 0.61), ("alpha", "mpt-full"): (0.60, 0.64),
                ("beta", "pt"): (0.70, 0.70), ("beta", "spot"): (0.70, 0.74), ("beta", "mpt-full"): (0.66, 0.80)}
    runs = [run(t, seed, m, a[seed]) for (t, m), a in accuracy.items() for seed in (0, 1)]
    table = quality.table(suite, runs)
    assert "| target | k | spot − pt | mpt-full − pt | mpt-full − spot |" in table
    assert "| alpha | 16 | +3.0 [" in table                 # spot − pt: seeds +5, +1
    # all targets, mpt-full − spot: seed 0 ((60 − 55) + (66 − 70)) / 2 = +0.5, seed 1 ((64 − 61) + (80 − 74)) / 2 = +4.5
    diffs = quality.paired(runs, ["alpha", "beta"], 16, "mpt-full", "spot")
    assert diffs.keys() == {0, 1} and abs(diffs[0] - 0.5) < 1e-9 and abs(diffs[1] - 4.5) < 1e-9
    assert "| all targets | 16 | " in table and "| +2.5 [" in table.splitlines()[-1]


def test_an_mpt_method_may_name_its_factor_rank(tmp_path):
    assert quality.mpt_variant("mpt-factors-r4", 0) == ("factors", 4)
    assert quality.mpt_variant("mpt-full-r2", 3) == ("full", 2)
    assert quality.mpt_variant("mpt-factors", 3) == ("factors", 3)          # the suite's factor_rank
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\nmethods = ["pt", "mpt-factors-r4"]\n')
    assert quality.read_suite(suite)["methods"] == ["pt", "mpt-factors-r4"]
    for bad in ("mpt-factors-r0", "mpt-group-r2", "mpt-factors-4", "pt-r2"):
        suite.write_text(f'name = "s"\nmethods = ["{bad}"]\n')
        with pytest.raises(SystemExit, match="unknown method"):
            quality.read_suite(suite)
