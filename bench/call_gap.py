"""What the time between decode calls costs (issue 15, item 1): is our Python loop why decode trails genai?

    python bench/call_gap.py                        # SmolLM2-135M fused fp32 graph, 2 threads, batch 1 and 8
    python bench/call_gap.py --pauses 0 0.1 0.3 1   # milliseconds of busy waiting added after every token

Runs the runtime's own greedy `decode` (the path `Engine.generate` takes) on the fused fp32 graph that
`bench/genai.py` exports, and splits each decode step into the graph call (onnxruntime's `run_with_iobinding`)
and everything else: the loop's time between calls (the argmax, the end-of-sequence check, filling the decode
call's inputs, the generator). Then it widens that gap on purpose, busy-waiting a pause after every token, and reports how much
slower the graph call itself gets, paired by round against no pause. onnxruntime's worker threads spin for a
while after a call before they sleep; if the loop's own gap is past that point, every call pays for waking them,
and a tighter loop (a C++ generator, an argmax inside the graph) would be faster. Writes
bench/results/call_gap-<backbone>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from genai import HERE, TEXT, build_ours, isa_flags
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.source_build import machine
from mpt_edge_runtime.fused_decoder import FusedDecoderSession
from mpt_edge_runtime.generation import decode
from mpt_edge_runtime.sampling import SamplingParams
from mpt_edge_runtime.session import GraphSession
from quality import t_interval


class CallTimer:
    """Wraps a session's `run_with_iobinding` and adds up the seconds spent inside it."""

    def __init__(self, session):
        self.inner, self.seconds = session.run_with_iobinding, 0.0
        session.run_with_iobinding = self

    def __call__(self, *args, **kwargs):
        tick = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - tick


def busy_wait(seconds: float) -> None:
    """Spin (not sleep) for `seconds`: the main thread stays busy, as a slower loop's would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def timed_decode(steps: FusedDecoderSession, timer: CallTimer, prefix, ids: list[int], batch: int, new_tokens: int,
                 pause: float) -> tuple[float, float]:
    """(ms per decode step, ms of it inside the graph call) over the N - 1 steps after the prefill."""
    tokens = decode(steps, [(prefix, ids)] * batch, SamplingParams(max_new_tokens=new_tokens), eos_ids=())
    next(tokens)
    timer.seconds, tick = 0.0, time.perf_counter()
    for _ in tokens:
        busy_wait(pause)
    per_step = 1000 / (new_tokens - 1)
    return (time.perf_counter() - tick) * per_step, timer.seconds * per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pauses", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.5, 1.0],
                        help="milliseconds busy-waited after every token; 0 is the loop as it is")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=HERE / "results" / "work" / "genai")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if 0 not in args.pauses:
        parser.error("--pauses must include 0: every pause is compared with the loop as it is")

    work = args.work / args.backbone.replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.backbone)
    model, dim = backbone.model, backbone.model.get_input_embeddings().embedding_dim
    ids = backbone.tokenizer.encode(TEXT, add_special_tokens=False).ids[:45]
    prompt = model.get_input_embeddings().weight[ids[:20]].detach().float().numpy()
    graph = GraphSession.open(build_ours(model, work, print)["fused-fp32"], "cpu", args.threads)
    steps, timer = FusedDecoderSession.open(graph, dim), CallTimer(graph.session)
    prefix = steps.prefix(prompt)

    rows = []
    for batch in (1, 8):
        samples = {pause: [] for pause in args.pauses}
        for round_ in range(args.rounds + 1):   # round 0 warms up and is not counted
            order = args.pauses if round_ % 2 == 0 else args.pauses[::-1]
            for pause in order:
                step, inside = timed_decode(steps, timer, prefix, ids[20:], batch, args.new_tokens, pause / 1000)
                if round_:
                    samples[pause].append((step, inside))
        base = [inside for _, inside in samples[0]]
        for pause, values in samples.items():
            slower = [inside / b for (_, inside), b in zip(values, base)]
            mean, half = t_interval(slower)
            step = statistics.median(s for s, _ in values)
            inside = statistics.median(i for _, i in values)
            rows.append({"batch": batch, "pause_ms": pause, "step_ms": step, "call_ms": inside,
                         "between_calls_ms": step - inside - pause, "call_vs_no_pause": mean,
                         "call_vs_no_pause_low": mean - half, "call_vs_no_pause_high": mean + half})

    print(f"\n{args.backbone} fused fp32, {args.threads} thread(s), {args.new_tokens} new tokens, median of "
          f"{args.rounds} rounds")
    print(f"{'batch':>5} {'pause ms':>9} {'step ms':>8} {'graph call ms':>14} {'loop between calls ms':>22} "
          f"{'graph call / no pause [95%]':>30}")
    for r in rows:
        print(f"{r['batch']:>5} {r['pause_ms']:>9.2f} {r['step_ms']:>8.2f} {r['call_ms']:>14.2f} "
              f"{r['between_calls_ms']:>22.3f}   {r['call_vs_no_pause']:.3f} [{r['call_vs_no_pause_low']:.3f}, "
              f"{r['call_vs_no_pause_high']:.3f}]")
    report = {"machine": {**machine(), "isa": isa_flags(), "threads": args.threads}, "backbone": args.backbone,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows}
    out = args.out or HERE / "results" / f"call_gap-{args.backbone.replace('/', '_')}.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"→ {out}")


if __name__ == "__main__":
    main()
