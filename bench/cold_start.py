"""Cold start: a fresh Python process, from spawn to the first answer, with every bundle file verified.

    python bench/cold_start.py BUNDLE [BUNDLE ...] [--rounds 5] [--threads 2] [--baseline DIR] [--out FILE]

Each round spawns, for every bundle and mode in turn (so a busy machine slows all modes alike), a process that
runs `import mpt_edge_runtime; load(bundle, "cpu", threads=N); classify one text` and reports: the import, the
load split by `engine.load_report` (hashing, which overlaps the session; session creation; tasks + tokenizer;
waiting for hashing; task prefixes), the first answer, and spawn → first answer (wall, interpreter start
included). Modes: `full` hashes every file (the default, beside the session's start), `stamped` (stamps=True)
finds a verified stamp written by a warm-up load (no file changed since), and `baseline` (with
--baseline DIR: a folder holding another `mpt_edge_runtime`, e.g. the previous commit's, loaded with its
defaults). Prints medians and the ratio to the goal (issue 15: MiniLM <= 0.5 s, SmolLM2 <= 1.5 s); writes JSON
to bench/results/cold_start.json. Stamps go to a temporary cache folder (MPT_EDGE_RUNTIME_CACHE), not ~/.cache.

Real bundles, built with the kit (backbones and data come from ~/.cache/mpt-edge):

    mpt-edge train target --tasks tweet_sentiment --backbone minilm-l6 --method pt --steps 2 --prompt-length 20 \\
        --max-length 64 --quiet --out /tmp/cs/pt-minilm-l6
    mpt-edge export /tmp/cs/pt-minilm-l6 --out /tmp/cs/bundle-minilm-l6      # same with --backbone smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
GOALS = {"minilm": 0.5, "smollm2": 1.5}      # seconds, spawn → first answer (issue 15, item 4)
TEXT = "a gorgeous, moving film whose actors never put a foot wrong"

PROBE = r"""
import json, sys, time
started = time.perf_counter()
import mpt_edge_runtime as mer
imported = time.perf_counter()
bundle, threads, mode, text = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
options = {"stamps": mode == "stamped"} if mode != "baseline" else {}
engine = mer.load(bundle, "cpu", threads=threads, **options)
loaded = time.perf_counter()
engine.classify(next(t for t in engine.tasks if engine.task(t).kind == "classify"), [text])
answered = time.perf_counter()
report = getattr(engine, "load_report", None)
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "answer_s": answered - loaded,
                  "answered_at": time.time(), "report": None if report is None else {
                      k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(report).items()},
                  "torch_loaded": "torch" in sys.modules}))
"""


def probe(bundle: Path, mode: str, threads: int, env: dict) -> dict:
    """One fresh process; its timings plus spawn → first answer (wall clock, so interpreter start counts)."""
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(bundle), str(threads), mode, TEXT], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {mode} probe of {bundle} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["first_answer_s"] = result.pop("answered_at") - spawned
    return result


def medians(runs: list[dict]) -> dict:
    """Median of every timing over the runs (load_report's fields under report_*)."""
    flat = [{**{k: v for k, v in r.items() if isinstance(v, float)},
             **{f"report_{k}": v for k, v in (r["report"] or {}).items() if isinstance(v, float)}} for r in runs]
    return {key: statistics.median(f[key] for f in flat) for key in flat[0]}


def goal_for(bundle: Path) -> float | None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = str(manifest.get("backbone", {}).get("name") or bundle.name).lower()
    return next((goal for key, goal in GOALS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="folder holding another mpt_edge_runtime package to compare")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cold_start.json")
    args = parser.parse_args()
    modes = ["full", "stamped"] + (["baseline"] if args.baseline else [])
    with tempfile.TemporaryDirectory(prefix="cold-start-stamps-") as cache:
        env = {**os.environ, "MPT_EDGE_RUNTIME_CACHE": cache}
        base_env = {**env, "PYTHONPATH": os.pathsep.join([str(args.baseline.resolve()), env.get("PYTHONPATH", "")])
                    } if args.baseline else None
        for bundle in args.bundles:               # warm-up: page cache, and the stamp for `stamped`
            probe(bundle, "stamped", args.threads, env)
        runs = {str(b): {m: [] for m in modes} for b in args.bundles}
        for round_ in range(args.rounds):
            for bundle in args.bundles:
                for mode in modes:
                    run = probe(bundle, mode, args.threads, base_env if mode == "baseline" else env)
                    if mode == "stamped" and run["report"]["hashed"]:
                        sys.exit(f"error: the stamped load of {bundle} hashed {run['report']['hashed']}")
                    runs[str(bundle)][mode].append(run)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    results = {}
    for bundle in args.bundles:
        goal = goal_for(bundle)
        entry = {"goal_s": goal, "bytes": sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()), "modes": {}}
        print(f"\n{bundle} ({entry['bytes'] / 2**20:.0f} MiB), medians of {args.rounds}, seconds:")
        print(f"  {'mode':9} {'import':>7} {'load':>6} {'hash':>6} {'session':>8} {'tasks':>6} {'wait':>6} "
              f"{'answer':>7} {'spawn→answer':>13} {'vs goal':>8}")
        for mode in modes:
            m = medians(runs[str(bundle)][mode])
            ratio = m["first_answer_s"] / goal if goal else None
            entry["modes"][mode] = {"median": m, "goal_ratio": ratio, "runs": runs[str(bundle)][mode]}
            cell = lambda key: f"{m[key]:.3f}" if key in m else "-"   # noqa: E731
            print(f"  {mode:9} {cell('import_s'):>7} {cell('load_s'):>6} {cell('report_hash_s'):>6} "
                  f"{cell('report_session_s'):>8} {cell('report_tasks_s'):>6} {cell('report_wait_s'):>6} "
                  f"{cell('answer_s'):>7} {m['first_answer_s']:>13.3f} {f'{ratio:.2f}x' if ratio else '-':>8}")
        results[str(bundle)] = entry
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg(),
           "nice": os.nice(0), "threads": args.threads, "rounds": args.rounds, "bundles": results,
           "baseline": str(args.baseline) if args.baseline else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=".cold_start-")
    with os.fdopen(fd, "w") as handle:
        json.dump(out, handle, indent=2)
    os.replace(tmp, args.out)
    print(f"\n→ {args.out}")


if __name__ == "__main__":
    main()
