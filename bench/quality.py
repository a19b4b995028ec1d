"""Quality suite: does MPT transfer on real offline tasks? Every method, target, k and seed, resumable.

    python bench/quality.py --budget small          # SmolLM2 + MiniLM suites sized for 2 CPU cores
    python bench/quality.py bench/suites/smoke.toml  # any suite file(s)
    python bench/quality.py bench/suites/transfer.toml --work builds/quality --report   # tables so far, trains nothing
    python bench/quality.py bench/suites/transfer-factor-rank2.toml --work builds/quality --report \
        --against bench/suites/transfer.toml         # an ablation beside the same runs of its base suite
    python bench/quality.py bench/suites/ablations/transfer-factors-r6.toml --work builds/quality --report \
        --against bench/suites/transfer.toml --against-method mpt-factors-r2   # a variant beside another method

Stages 1-2 (teachers, distilled source) run once per suite and are cached. Then every (target, k, seed,
method) run trains with the same step budget, keeps the tensors that score best on a fixed dev subset
(evaluated before training and every `eval_every` steps), and is scored on a fixed test subset. Each
finished run is a line in `<work>/<suite>/runs.jsonl` and is never recomputed. Several processes may run
the same suite at once (one per core, OMP_NUM_THREADS=1 each): each claims the next run no other holds. Writes
`bench/results/quality-<suite>.json`, a markdown table (mean ± std over seeds, and paired differences against
vanilla PT) and `bench/results/quality-<suite>.png` (accuracy vs k per method).

Methods: baseline (zero-shot for causal backbones, head-only for encoders), pt, spot (PT from the source
prompt that scores best on the target's dev split untrained), mpt-full, mpt-factors, finetune (every
backbone weight trains; a reference, slow). An MPT method may name its U V rank: "mpt-factors-r4" is factors mode
with rank-4 factors (grown from the source's by the suite's "factor_growth"), beside "mpt-factors" in one suite.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import tomllib
from pathlib import Path

import torch

from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.batching import encode_tasks
from mpt_edge.claim import claimed
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.evaluate import dev_scorer, evaluate, evaluate_trained, evaluate_zero_shot
from mpt_edge.losses import DistillConfig
from mpt_edge.prompt import PromptConfig
from mpt_edge.shipped import resolve_source
from mpt_edge.tasks import first_n
from mpt_edge.precision import resolve_precision
from mpt_edge.training_loop import SOURCE_LR_FACTORS, TrainConfig, fit
from mpt_edge.trained import fixed_prompts, load_trained

from finetune import finetune_run

HERE = Path(__file__).parent
METHODS = ("baseline", "pt", "spot", "mpt-full", "mpt-factors", "finetune")
RANKED_MPT = re.compile(r"mpt-(full|factors)-r([1-9][0-9]*)")   # an MPT method with its own U V rank
BUDGETS = {"small": ("small.toml", "small-minilm.toml"), "medium": ("medium.toml", "medium-minilm.toml"),
           "full": ("full.toml", "full-minilm.toml")}
# optional suite keys: ablations reuse another suite's stages ("teachers_from", "source_from": a suite name);
# "shipped_source" (a name or folder, see `mpt_edge.shipped`) replaces stages 1-2: SPoT then starts from the
# source-task prompt of the shipped source that scores best on the target's dev split; "lr_grid" (list of
# {"lr_prompt", "lr_factors", "warmup"} dicts) trains every method once per entry and keeps the entry whose
# best dev score is highest (ties: the first), so learning rates are selected on dev, never on test.
DEFAULTS = {"eval_every": 0, "dev_limit": 100, "source_distill": 0.9, "lr_factors": TrainConfig.lr_factors,
            "lr_prompt": TrainConfig.lr_prompt, "warmup": TrainConfig.warmup, "teachers_from": None,
            "source_from": None, "shipped_source": None, "lr_grid": None, "curve": False, "precision": "fp32",
            "factor_rank": 0, "factor_growth": "extend"}
# "curve": every dev evaluation also scores the test subset and records both (learning curves); only the dev
# score selects anything. "precision" of the target runs' training forward: fp32, bf16 or auto (resolved per
# run on the machine that runs it and recorded in the run's extra). "factor_rank": rank of the mpt methods' U V
# (0 = the shipped or trained source's; see `mpt-edge train target --factor-rank`), grown by "factor_growth"
# ("extend", or "split": the first rank-2 ablation's init)


def source_stage(suite: dict, backbone, work: Path) -> tuple:
    """Teachers and the distilled source checkpoint, trained once per suite (resumed when interrupted), or
    taken from the suites named by `teachers_from` / `source_from`."""
    if suite["shipped_source"]:
        source = resolve_source(suite["shipped_source"])
        source.check_backbone(backbone, suite["shipped_source"])
        return source, source
    data = default_data_dir()
    train = load_split(suite["sources"], data, "train", k_per_class=suite["source_k"], seed=0)
    encoded = encode_tasks(train, backbone.tokenizer, suite["max_length"])
    teachers_dir = work.parent / suite["teachers_from"] / "teachers" if suite["teachers_from"] else work / "teachers"
    if not suite["teachers_from"]:
        teacher_cfg = TrainConfig(steps=suite["teacher_steps"], max_length=suite["max_length"], checkpoint_every=20)
        fit(stages.prompt_tuning("teachers", backbone, encoded, teacher_cfg, PromptConfig(length=suite["prompt_length"])),
            encoded, teacher_cfg, teachers_dir, resume=True)
    teachers = load_trained(teachers_dir)
    if suite["source_from"]:
        return teachers, load_trained(work.parent / suite["source_from"] / "source")
    source_cfg = TrainConfig(steps=suite["source_steps"], max_length=suite["max_length"], checkpoint_every=20,
                             lr_factors=SOURCE_LR_FACTORS)
    distill = DistillConfig(weight=suite["source_distill"])
    fit(stages.source(backbone, encoded, teachers, source_cfg, distill=distill), encoded, source_cfg,
        work / "source", resume=True)
    return teachers, load_trained(work / "source")


def best_source_prompt(backbone, teachers, target: str, max_length: int, work: Path) -> str:
    """SPoT's pick: the source task whose teacher prompt scores best on the target's dev split, untrained
    (causal backbones score any prompt with the target's verbalizers; encoders have no head yet: first source).
    Cached per target in `<work>/spot.json`."""
    if backbone.family.uses_heads:
        return teachers.task_names[0]
    cache = work / "spot.json"
    picks = json.loads(cache.read_text()) if cache.is_file() else {}
    if target not in picks:
        picks[target] = _score_sources(backbone, teachers, target, max_length)
        write_text_atomic(cache, json.dumps(picks, indent=2) + "\n")
    return max(picks[target], key=picks[target].get)


def _score_sources(backbone, teachers, target: str, max_length: int) -> dict[str, float]:
    dev = load_split([target], default_data_dir(), "dev", limit=100, seed=0)
    classifier = stages.classifier_for(backbone, [dev[0].spec], None)
    encoded = encode_tasks(dev, backbone.tokenizer, max_length)
    prompts = fixed_prompts(teachers)
    return {name: evaluate(classifier, lambda ids, k=k: prompts[k].expand(len(ids), -1, -1), encoded)[target]["accuracy"]
            for k, name in enumerate(teachers.task_names)}


def one_run(suite: dict, backbone, teachers, source, target: str, k, seed: int, method: str, work: Path) -> dict:
    """Train one method on one target/k/seed and score it on the fixed test subset; with an `lr_grid`, once
    per grid entry, keeping the entry with the best dev score."""
    if not suite["lr_grid"] or method == "baseline":
        return _one_run(suite, backbone, teachers, source, target, k, seed, method, work)
    tried = []
    for i, rates in enumerate(suite["lr_grid"]):
        result = _one_run({**suite, **rates}, backbone, teachers, source, target, k, seed, method, work, f"-lr{i}")
        tried.append({**rates, "dev": result["extra"]["best"]["score"], "test": result["scores"]["accuracy"]})
        if i == 0 or tried[-1]["dev"] > max(t["dev"] for t in tried[:-1]):
            chosen = result
    chosen["extra"]["lr_grid"] = tried
    return chosen


def _one_run(suite: dict, backbone, teachers, source, target: str, k, seed: int, method: str, work: Path,
             tag: str = "") -> dict:
    data = default_data_dir()
    if k == "full":
        train = [first_n(t, suite["full_cap"], seed) for t in load_split([target], data, "train", seed=seed)]
    else:
        train = load_split([target], data, "train", k_per_class=int(k), seed=seed)
    test = load_split([target], data, "test", limit=suite["test_limit"], seed=0)
    dev = load_split([target], data, "dev", limit=suite["dev_limit"], seed=0)
    config = TrainConfig(steps=suite["steps"], max_length=suite["max_length"], seed=seed, checkpoint_every=10**6,
                         eval_every=suite["eval_every"], lr_factors=suite["lr_factors"], lr_prompt=suite["lr_prompt"],
                         warmup=suite["warmup"], precision=resolve_precision(suite["precision"]))
    encoded = encode_tasks(train, backbone.tokenizer, config.max_length)
    out = work / "runs" / f"{target}-k{k}-s{seed}-{method}{tag}"
    extra = {"precision": config.precision}
    if method == "baseline" and not backbone.family.uses_heads:
        return {"scores": evaluate_zero_shot(backbone, test, max_length=config.max_length)[target], "extra": extra}
    if method == "finetune":
        return finetune_run(backbone, train, dev, test, steps=config.steps, batch_size=config.batch_size,
                            max_length=config.max_length, eval_every=config.eval_every or config.steps, seed=seed)
    if method == "baseline":
        plan = stages.head_only(backbone, encoded, config)
    elif method == "pt":
        plan = stages.prompt_tuning("pt", backbone, encoded, config, PromptConfig(length=suite["prompt_length"]))
    elif method == "spot":
        pick = best_source_prompt(backbone, teachers, target, config.max_length, work)
        initial = fixed_prompts(teachers)[teachers.index_of(pick)]
        plan = stages.prompt_tuning("spot", backbone, encoded, config, PromptConfig(length=initial.shape[0]),
                                    initial=initial[None])
        extra["spot_source"] = pick
    else:
        mode, rank = mpt_variant(method, suite["factor_rank"])
        plan = stages.target(backbone, encoded, source, config, mode=mode, factor_rank=rank,
                             factor_growth=suite["factor_growth"])
    validate = dev_scorer(backbone, plan, dev, max_length=config.max_length) if config.eval_every else None
    if validate is not None and suite["curve"]:
        validate = with_test_curve(validate, dev_scorer(backbone, plan, test, max_length=config.max_length))
    index = fit(plan, encoded, config, out, resume=True, progress=False, validate=validate)
    if "best" in index:
        extra["best"] = {"step": index["best"]["step"], "score": index["best"]["score"]}
        extra["evals"] = index["best"]["evals"]
    return {"scores": evaluate_trained(backbone, load_trained(out), test, max_length=config.max_length)[target],
            "extra": extra}


def mpt_variant(method: str, suite_rank: int) -> tuple[str, int]:
    """An MPT method's (target mode, U V rank): "mpt-factors-r4" → ("factors", 4); "mpt-full" → ("full", the
    suite's "factor_rank", 0 = the source's)."""
    ranked = RANKED_MPT.fullmatch(method)
    return (ranked[1], int(ranked[2])) if ranked else (method.removeprefix("mpt-"), suite_rank)


def with_test_curve(dev_validate, test_validate):
    """A validate that selects on dev and records test beside it: (dev, {"dev": dev, "test": test})."""
    def validate():
        dev, _ = dev_validate()
        test, _ = test_validate()
        return dev, {"dev": dev, "test": test}

    return validate


def accuracies(runs: list[dict], target: str, k, method: str) -> dict[int, float]:
    """{seed: test accuracy in %} of the finished runs of one cell."""
    return {r["seed"]: 100 * r["scores"]["accuracy"] for r in runs
            if (r["target"], str(r["k"]), r["method"]) == (target, str(k), method)}


def mean_std(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}" if values else "–"


def table(suite: dict, runs: list[dict]) -> str:
    """Markdown: one row per (target, k), one column per method, accuracy mean ± std over seeds; then the
    paired difference (same seed, same examples) of every prompt-transfer method against vanilla PT."""
    methods = suite["methods"]
    lines = [f"| target | k | {' | '.join(methods)} |", "|" + " --- |" * (2 + len(methods))]
    rows = [(t, k) for t in suite["targets"] for k in suite["k"]]
    for target, k in rows:
        cells = [mean_std(accuracies(runs, target, k, m).values()) for m in methods]
        lines.append(f"| {target} | {k} | {' | '.join(cells)} |")
    pairs = [(m, "pt") for m in methods if m not in ("baseline", "pt")] if "pt" in methods else []
    if "spot" in methods:                       # the "MPT >= SPoT": each MPT mode against SPoT too
        pairs += [(m, "spot") for m in methods if m.startswith("mpt")]
    if pairs:
        lines += ["", "Paired differences (points, same seed and examples): mean [95% t-interval over seeds]; "
                  f"'all targets' averages each seed over the targets first; n = {len(suite['seeds'])} when done:", "",
                  f"| target | k | {' | '.join(f'{m} − {b}' for m, b in pairs)} |", "|" + " --- |" * (2 + len(pairs))]
        groups = [([t], t, k) for t in suite["targets"] for k in suite["k"]]
        if len(suite["targets"]) > 1:
            groups += [(suite["targets"], "all targets", k) for k in suite["k"]]
        for targets, label, k in groups:
            cells = [mean_interval(paired(runs, targets, k, m, b).values()) for m, b in pairs]
            lines.append(f"| {label} | {k} | {' | '.join(cells)} |")
    return "\n".join(lines)


def selection_table(suite: dict, runs: list[dict]) -> str:
    """Markdown: per trained method and k, the target step dev selection kept (over targets, seeds and grid
    entries' winners): how often it kept the untrained step 0, and the median step. Empty if no run records one."""
    picked = {}
    for r in runs:
        best = r.get("extra", {}).get("best")
        if best is not None:
            picked.setdefault((r["method"], str(r["k"])), []).append(best["step"])
    if not picked:
        return ""
    methods = [m for m in suite["methods"] if any(m == method for method, _ in picked)]
    lines = ["Target step kept by dev selection (step 0 = untrained: PT's initial prompt, SPoT's and MPT's "
             "transferred one): runs that kept step 0 of the runs done, and the median step kept", "",
             f"| method | {' | '.join(f'k = {k}' for k in suite['k'])} |", "|" + " --- |" * (1 + len(suite["k"]))]
    for method in methods:
        cells = []
        for k in suite["k"]:
            steps = picked.get((method, str(k)), [])
            cells.append(f"{sum(s == 0 for s in steps)} of {len(steps)}, {statistics.median(steps):g}" if steps else "–")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return "\n".join(lines)


def paired(runs: list[dict], targets: list[str], k, method: str, against: str = "pt") -> dict[int, float]:
    """{seed: method − against accuracy (points), averaged over `targets`} for the seeds every target has."""
    per_target = []
    for target in targets:
        base, other = accuracies(runs, target, k, against), accuracies(runs, target, k, method)
        per_target.append({s: other[s] - base[s] for s in other if s in base})
    seeds = set.intersection(*(set(d) for d in per_target)) if per_target else set()
    return {s: statistics.mean(d[s] for d in per_target) for s in sorted(seeds)}


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% Student-t interval) of n ≥ 2 values."""
    return (statistics.mean(values),
            T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5)


def mean_interval(values) -> str:
    """'mean [lo, hi]': the 95% Student-t interval of the mean (n ≥ 2), else the mean alone."""
    values = list(values)
    if not values:
        return "–"
    if len(values) < 2:
        return f"{values[0]:+.1f}"
    mean, half = t_interval(values)
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def plot(suite: dict, runs: list[dict], path: Path) -> None:
    """Accuracy vs k (categorical axis) per method, one panel per target, error bars = std over seeds."""
    def draw(ax, target):
        for offset, method in enumerate(suite["methods"]):
            xs, means, stds = [], [], []
            for i, k in enumerate(suite["k"]):
                accs = list(accuracies(runs, target, k, method).values())
                if accs:
                    xs.append(i + 0.06 * (offset - len(suite["methods"]) / 2))
                    means.append(statistics.mean(accs))
                    stds.append(statistics.pstdev(accs))
            if xs:
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(suite["k"])), [str(k) for k in suite["k"]])
        ax.set_xlabel("training examples per class (k)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{target} ({suite['backbone']})")

    save_panels(suite["targets"], draw, path)


def save_panels(targets: list[str], draw, path: Path) -> None:
    """One matplotlib panel per target, filled by `draw(ax, target)`, saved as a PNG at `path` (skipped, with a
    message, without matplotlib: hours of runs must not end in an ImportError)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): {path.name} not drawn", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        draw(ax, target)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_table(suite: dict, runs: list[dict]) -> str:
    """Markdown: mean dev and test accuracy (%) over seeds at every evaluated step, per target, k and method."""
    lines = []
    for target in suite["targets"]:
        for k in suite["k"]:
            points = _curve_points(runs, target, k, suite["methods"])
            steps = sorted({step for by_step in points.values() for step in by_step})
            if not steps:   # no run of this target and k has finished yet
                continue
            lines += ["", f"{target}, k = {k}: dev / test accuracy (%) by target step, mean over seeds", "",
                      "| method | " + " | ".join(str(s) for s in steps) + " |", "|" + " --- |" * (1 + len(steps))]
            for method, by_step in points.items():
                cells = [f"{statistics.mean(by_step[s]['dev']):.1f} / {statistics.mean(by_step[s]['test']):.1f}"
                         if s in by_step else "–" for s in steps]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve_points(runs: list[dict], target: str, k, methods) -> dict[str, dict[int, dict[str, list[float]]]]:
    points: dict = {}
    for r in runs:
        if (r["target"], str(r["k"])) != (target, str(k)) or r["method"] not in methods:
            continue
        for e in r["extra"].get("evals", []):
            if "details" in e and "test" in e["details"]:
                cell = points.setdefault(r["method"], {}).setdefault(e["step"], {"dev": [], "test": []})
                cell["dev"].append(100 * e["details"]["dev"])
                cell["test"].append(100 * e["details"]["test"])
    return points


def curve_plot(suite: dict, runs: list[dict], path: Path) -> None:
    """Test accuracy (solid) and dev accuracy (dashed) against target steps, one panel per target (first k)."""
    def draw(ax, target):
        for method, by_step in _curve_points(runs, target, suite["k"][0], suite["methods"]).items():
            steps = sorted(by_step)
            line, = ax.plot(steps, [statistics.mean(by_step[s]["test"]) for s in steps], marker="o", label=method)
            ax.plot(steps, [statistics.mean(by_step[s]["dev"]) for s in steps], linestyle="--", color=line.get_color())
        ax.set_xlabel("target steps")
        ax.set_ylabel("accuracy (%): test solid, dev dashed")
        ax.set_title(f"{target} ({suite['backbone']}, k = {suite['k'][0]})")

    save_panels(suite["targets"], draw, path)


def read_suite(path: Path) -> dict:
    suite = {**DEFAULTS, **tomllib.loads(path.read_text())}
    unknown = [m for m in suite["methods"] if m not in METHODS and not RANKED_MPT.fullmatch(m)]
    if unknown:
        raise SystemExit(f"error: {path}: unknown method(s) {unknown}; allowed: {', '.join(METHODS)}, or "
                         "mpt-full-rN / mpt-factors-rN (U V of rank N)")
    if (suite["lr_grid"] or suite["curve"]) and not suite["eval_every"]:
        raise SystemExit(f"error: {path}: lr_grid and curve select or record on dev: set eval_every > 0")
    return suite


def read_runs(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _key(run: dict) -> tuple:
    return run["target"], str(run["k"]), run["seed"], run["method"]


def run_suite(suite: dict, work_root: Path) -> None:
    work = work_root / suite["name"]
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone = load_backbone(suite["backbone"])
    started = time.perf_counter()
    with claimed(work / "stages.lock", wait=True):  # processes sharing the suite train its stages once
        teachers, source = source_stage(suite, backbone, work)
    print(f"[{suite['name']}] source stage ready after {time.perf_counter() - started:.0f} s", flush=True)
    log = work / "runs.jsonl"
    # seeds outermost: a suite stopped part-way (they run for days on CPU) has every target and k at the seeds done
    keys = [(target, k, seed, method) for seed in suite["seeds"] for target in suite["targets"] for k in suite["k"]
            for method in suite["methods"]]
    elsewhere = []
    for target, k, seed, method in keys:
        with claimed(work / "locks" / f"{target}-k{k}-s{seed}-{method}.lock") as mine:
            if not mine:
                elsewhere.append((target, k, seed, method))
                continue
            if (target, str(k), seed, method) in {_key(r) for r in read_runs(log)}:
                continue
            tick = time.perf_counter()
            result = one_run(suite, backbone, teachers, source, target, k, seed, method, work)
            row = {"target": target, "k": k, "seed": seed, "method": method, **result,
                   "seconds": round(time.perf_counter() - tick, 1)}
            with claimed(work / "runs.lock", wait=True), log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"[{suite['name']}] {target} k={k} seed={seed} {method}: "
                  f"{100 * result['scores']['accuracy']:.1f} ({row['seconds']:.0f} s)", flush=True)
    for target, k, seed, method in elsewhere:  # another process runs these: wait for it, then report them all
        with claimed(work / "locks" / f"{target}-k{k}-s{seed}-{method}.lock", wait=True):
            pass
    runs = read_runs(log)
    markdown = report_markdown(suite, runs)
    report = {"suite": suite, "runs": runs, "table": markdown, "seconds_this_call": round(time.perf_counter() - started),
              "seconds_all_runs": round(sum(r["seconds"] for r in runs))}
    write_text_atomic(HERE / "results" / f"quality-{suite['name']}.json", json.dumps(report, indent=2) + "\n")
    if suite["curve"]:
        curve_plot(suite, runs, HERE / "results" / f"quality-{suite['name']}-curve.png")
    plot(suite, runs, HERE / "results" / f"quality-{suite['name']}.png")
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", type=Path, nargs="*", help="suite TOML files (default: those of --budget)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), help="small: under an hour on 2 CPU cores; medium: two targets, ~2 h; full: hours or a GPU")
    parser.add_argument("--work", type=Path, default=HERE / "results" / "work" / "quality")
    parser.add_argument("--report", action="store_true",
                        help="print the tables of the runs finished so far (a suite in progress) and train nothing")
    parser.add_argument("--against", type=Path, default=None,
                        help="with --report: an ablation's runs beside the same runs (target, k, seed, method) of "
                             "this other suite file, dev and test, with paired differences")
    parser.add_argument("--against-method", default=None,
                        help="with --against: pair each run with this method's run in the other suite (a variant "
                             "under its own name, e.g. mpt-factors-r6 beside mpt-factors-r2)")
    args = parser.parse_args()
    if bool(args.suites) == bool(args.budget):
        parser.error("give suite files or --budget (one of the two)")
    if args.against and not args.report:
        parser.error("--against compares finished runs: use it with --report")
    if args.against_method and not args.against:
        parser.error("--against-method names the other suite's method: use it with --against")
    paths = args.suites or [HERE / "suites" / name for name in BUDGETS[args.budget]]
    for suite in [read_suite(p) for p in paths]:
        if args.against:
            other = read_suite(args.against)
            print(ablation_table(suite["name"], read_runs(args.work / suite["name"] / "runs.jsonl"), other["name"],
                                 read_runs(args.work / other["name"] / "runs.jsonl"), args.against_method))
        elif args.report:
            print(report_so_far(suite, args.work))
        else:
            run_suite(suite, args.work)


def report_so_far(suite: dict, work_root: Path) -> str:
    """The suite's tables from the runs in its runs.jsonl so far, headed by how many of its runs are done."""
    cells = {(t, str(k), s, m) for t in suite["targets"] for k in suite["k"] for s in suite["seeds"]
             for m in suite["methods"]}
    runs = [r for r in read_runs(work_root / suite["name"] / "runs.jsonl") if _key(r) in cells]   # not a dropped method's
    total = len(cells)
    hours = sum(r["seconds"] for r in runs) / 3600
    return f"{suite['name']}: {len(runs)} of {total} runs done ({hours:.1f} h of runs)\n\n" + report_markdown(suite, runs)


def ablation_table(name: str, runs: list[dict], base_name: str, base_runs: list[dict],
                   base_method: str | None = None) -> str:
    """Markdown: every run of an ablation beside the run of the same (target, k, seed, method) in its base suite
    (or of `base_method` there: a variant with its own name, "mpt-factors-r6" beside "mpt-factors-r2"): the dev
    score selection kept and the test accuracy of each (points), then the mean paired difference, ablation − base,
    with its 95% interval. Dev is what a choice between them may use; test is shown, not used."""
    base = {_key(r): r for r in base_runs}

    def counterpart(run: dict) -> tuple:
        return _key(run)[:3] + (base_method or run["method"],)

    pairs = [(r, base[counterpart(r)]) for r in runs if counterpart(r) in base]
    if not pairs:
        return f"{name}: none of its {len(runs)} runs has a finished counterpart in {base_name} yet"

    def dev(r: dict) -> float:
        return 100 * r["extra"]["best"]["score"]

    def test(r: dict) -> float:
        return 100 * r["scores"]["accuracy"]

    lines = [f"{name} against {base_name}, run by run (points; dev = the score dev selection kept)", "",
             f"| target | k | seed | method | dev {base_name} | dev {name} | test {base_name} | test {name} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, b in pairs:
        method = r["method"] if r["method"] == b["method"] else f"{r['method']} / {b['method']}"
        lines.append(f"| {r['target']} | {r['k']} | {r['seed']} | {method} | {dev(b):.1f} | {dev(r):.1f} | "
                     f"{test(b):.1f} | {test(r):.1f} |")
    lines += ["", f"{name} − {base_name}, mean [95% interval] over {len(pairs)} pairs: dev "
              f"{mean_interval(dev(r) - dev(b) for r, b in pairs)}, test {mean_interval(test(r) - test(b) for r, b in pairs)}"]
    kept = [r if dev(r) > dev(b) else b for r, b in pairs]        # dev chooses per run; a tie keeps the base's
    lines.append(f"Dev choosing between the two per run (a tie keeps {base_name}'s): {name}'s kept in "
                 f"{sum(k is r for k, (r, _) in zip(kept, pairs))} of {len(pairs)}; test of the kept − {base_name}: "
                 f"{mean_interval(test(k) - test(b) for k, (_, b) in zip(kept, pairs))}")
    pt = {_key(r)[:3]: r for r in base_runs if r["method"] == "pt"}
    with_pt = [(k, b, pt[_key(b)[:3]]) for k, (_, b) in zip(kept, pairs) if _key(b)[:3] in pt]
    if with_pt:
        lines.append(f"Against {base_name}'s PT on the same {len(with_pt)} (target, k, seed): {base_name} "
                     f"{mean_interval(test(b) - test(p) for _, b, p in with_pt)}, the kept "
                     f"{mean_interval(test(k) - test(p) for k, _, p in with_pt)}")
    return "\n".join(lines)


def report_markdown(suite: dict, runs: list[dict]) -> str:
    """The suite's tables: accuracy and paired differences, the steps dev selection kept, and curves if recorded."""
    selection = selection_table(suite, runs)
    markdown = table(suite, runs) + ("\n\n" + selection if selection else "")
    return markdown + ("\n" + curve_table(suite, runs) if suite["curve"] else "")


if __name__ == "__main__":
    main()
