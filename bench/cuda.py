"""The runtime on CUDA beside the CPU in one process (issue 15, item 6): classification and greedy generation of
real bundles on every device asked for, alternating, with the ratio to the CPU.

    python bench/cuda.py BUNDLE [BUNDLE ...] [--devices cuda,cpu] [--rounds 3] [--out bench/results/cuda.json]

Per bundle and device: classify p50 in ms at batch 1, 8 and 32 (one 64-token text repeated, the bundle's first
classify task) and, for a bundle that generates, the p50 of one greedy `generate` call of 32 new tokens at batch
1 and 8 (the same text; the call's generated characters are recorded, so a device that stopped early shows).
`bench/gpu_check.sh` builds the bundles and runs this after the CUDA tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import onnxruntime as ort

import mpt_edge_runtime as mer

TEXT = ("a gorgeous, moving film whose actors never put a foot wrong, even when the plot does; the second half "
        "drags a little and the score is louder than it needs to be, but I would see it again tomorrow")


def p50_ms(call, reps: int) -> tuple[float, object]:
    """(p50 ms of `reps` timed calls after one untimed, the last call's answer)."""
    answer = call()
    times = []
    for _ in range(reps):
        tick = time.perf_counter()
        answer = call()
        times.append(time.perf_counter() - tick)
    return round(1000 * statistics.median(times), 2), answer


def measure(engine, reps: int) -> dict:
    """{shape: p50 ms} for one loaded engine (and generated characters for the generate shapes)."""
    kinds = {task: engine.task(task).kind for task in engine.tasks}
    result = {}
    classify = next((t for t, kind in kinds.items() if kind == "classify"), None)
    if classify:
        for batch in (1, 8, 32):
            result[f"classify b{batch}"], _ = p50_ms(lambda: engine.classify(classify, [TEXT] * batch), reps)
    generate = next((t for t, kind in kinds.items() if kind == "generate"), None)
    if generate:
        params = mer.SamplingParams(max_new_tokens=32)
        for batch in (1, 8):
            result[f"generate b{batch}"], texts = p50_ms(lambda: engine.generate(generate, [TEXT] * batch, params), reps)
            result[f"generate b{batch} chars"] = len(texts[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--devices", type=lambda s: s.split(","), default=["cuda", "cpu"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the devices; medians")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per shape and round")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cuda.json")
    args = parser.parse_args()
    report = {"machine": {"platform": platform.platform(), "onnxruntime": ort.__version__,
                          "providers": ort.get_available_providers()}, "bundles": {}}
    for bundle in args.bundles:
        engines = {device: mer.load(bundle, device=device) for device in args.devices}
        rounds = {device: [] for device in args.devices}
        for round_ in range(args.rounds):
            for device in args.devices if round_ % 2 == 0 else list(reversed(args.devices)):
                rounds[device].append(measure(engines[device], args.reps))
        medians = {device: {shape: statistics.median(r[shape] for r in runs) for shape in runs[0]}
                   for device, runs in rounds.items()}
        reference = args.devices[-1]
        ratios = {device: {shape: round(medians[reference][shape] / value, 2)
                           for shape, value in medians[device].items() if not shape.endswith("chars") and value}
                  for device in args.devices[:-1]}
        report["bundles"][str(bundle)] = {"p50_ms": medians, f"speed-up over {reference}": ratios}
        print(bundle, json.dumps(report["bundles"][str(bundle)]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
