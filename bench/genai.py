"""mpt-edge's generation graphs vs onnxruntime-genai, side by side on one CPU (issue 15, item 1).

    python bench/genai.py                          # SmolLM2-135M, 2 threads, fp32 and int4, batch 1 and 8
    python bench/genai.py --threads 1 --rounds 3   # a busy machine: fewer threads, fewer rounds
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/genai.py --out bench/results/genai-smollm2-135m-thp.json
                                                   # weights in transparent huge pages, both sides (decode ~15% faster)

Both sides start from the same Hugging Face folder. onnxruntime-genai's model builder writes its graphs (fp32,
and int4: its CPU default, MatMulNBits block 32, accuracy level 4) and its own runtime runs them; mpt-edge's
exporter writes the fused decoder graph (fp32; `--quantize int4`, the same MatMulNBits recipe) and the traced
graph (the previous default), and mpt-edge's runtime runs them (`decode`, the path `Engine.generate` takes).
Per precision and batch, in alternating rounds (median over rounds):
- decode tokens/s over `--new-tokens` greedy tokens: the N - 1 model steps after the first token, on both
  sides (genai's first `generate_next_token` only picks the token from the prefill's logits);
- prefill: genai over the P + n real tokens; ours from a task's cached prompt KV (the serving path: n tokens
  after P cached prompt vectors) and from scratch (P prompt vectors + n tokens: genai's amount of work);
- fp32 agreement: our fused graph fed the first P tokens' embeddings as the prompt must produce genai's greedy
  tokens;
- genai's own graph run by plain onnxruntime in our kind of loop (I/O binding, KV in place): its decode against
  genai's runtime says how much of a gap is the loop's rather than the graph's (its tokens must equal genai's);
- decode ratios paired by round, with 95% t-intervals: what "≥ 1.0×, reliably" is judged by;
- classification from the same graph: `features` at batch 8 x 64 tokens, fused vs traced.
Writes bench/results/genai-<backbone>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import backbone_folder, load_backbone
from mpt_edge.source_build import machine
from mpt_edge_export import transform
from mpt_edge_export.families.causal import fused as fused_module
from mpt_edge_export.families.causal import graphs as graphs_module
from mpt_edge_export.families.causal.fused import export_fused_decoder
from mpt_edge_export.families.causal.graphs import export_decoder
from mpt_edge_runtime.fused_decoder import FusedDecoderSession
from mpt_edge_runtime.generation import DecoderSession, decode
from mpt_edge_runtime.sampling import SamplingParams
from mpt_edge_runtime.session import GraphSession
from quality import t_interval

HERE = Path(__file__).parent
TEXT = ("Review: a gorgeous, moving film whose actors never put a foot wrong, even when the plot does. The "
        "second half drags a little, and the score is louder than it needs to be, but I would see it again.")


def isa_flags() -> list[str]:
    """The CPU's vector extensions that onnxruntime's kernels pick between (int8 and int4 speed depends on them)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8"})


def huge_pages() -> dict:
    """Whether weights can sit in transparent huge pages: the kernel's mode and glibc's malloc tunable (decode
    speed depends on it, on both sides alike: see docs/performance.md)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    return {"thp": mode, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def build_ours(model, work: Path, log) -> dict[str, Path]:
    """fused fp32, fused int4 (LM head untied so it is quantized too, as genai's is) and traced fp32 graphs."""
    paths = {"fused-fp32": work / "fused-fp32.onnx", "fused-int4": work / "fused-int4.onnx",
             "traced-fp32": work / "traced-fp32.onnx"}
    stamp, exporter = work / "ours.stamp", exporter_digest()
    stale = stamp.read_text() != exporter if stamp.is_file() else any(path.is_file() for path in paths.values())
    if stale:
        log("the exporter changed since these graphs were written: exporting them again")
        for path in paths.values():
            path.unlink(missing_ok=True)
    if not paths["fused-fp32"].is_file():
        log("exporting the fused fp32 graph")
        export_fused_decoder(model, paths["fused-fp32"])
    if not paths["fused-int4"].is_file():
        log("exporting the fused graph with its own LM head weight, quantizing int4")
        untied = work / "fused-untied.onnx"
        export_fused_decoder(model, untied, share_head=False)
        transform.quantize(untied, paths["fused-int4"], "int4")
        untied.unlink()
    if not paths["traced-fp32"].is_file():
        log("exporting the traced fp32 graph")
        export_decoder(model, paths["traced-fp32"])
    stamp.write_text(exporter)
    return paths


def exporter_digest() -> str:
    """A hash of the exporter's sources that write our graphs: a cached graph from other code is not measured."""
    digest = hashlib.sha256()
    for module in (fused_module, graphs_module, transform):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def build_genai(folder: Path, work: Path, precision: str, threads: int, log) -> Path:
    """onnxruntime-genai's builder output for `precision` (fp32 / int4) on CPU, its session set to `threads`."""
    out = work / f"genai-{precision}"
    if not (out / "genai_config.json").is_file():
        log(f"running onnxruntime-genai's model builder ({precision})")
        with open(work / f"genai-{precision}.log", "w") as sink:
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                            "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], check=True, stdout=sink,
                           stderr=subprocess.STDOUT)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=1))
    return out


def genai_generate(model, ids: list[int], batch: int, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill s, decode s per step, first row's tokens) for one greedy generation by onnxruntime-genai. Its first
    `generate_next_token` only picks the token from the prefill's logits (0.05 ms measured), so N calls run the
    model N - 1 times: the same count as ours."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False, batch_size=batch)
    generator = og.Generator(model, params)
    tick = time.perf_counter()
    generator.append_tokens(np.array([ids] * batch, np.int32))
    mid = time.perf_counter()
    for _ in range(new_tokens):
        generator.generate_next_token()
    end = time.perf_counter()
    tokens = list(generator.get_sequence(0))[len(ids):]
    return mid - tick, (end - mid) / (new_tokens - 1), tokens


def genai_graph_generate(graph: GraphSession, head_size: int, ids: list[int], batch: int,
                         new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill s, decode s per step, first row's tokens) of onnxruntime-genai's own graph run by plain onnxruntime
    in our kind of loop: I/O binding, the KV written in place into buffers of the final length (as genai's runtime
    shares past and present), a growing attention mask. Beside both runtimes it tells a graph's share of a decode
    gap from the loop's."""
    inputs = {i.name: i.shape for i in graph.session.get_inputs()}
    past = [name for name in inputs if name.startswith("past_key_values.")]
    kv_heads = inputs[past[0]][1]   # the head size is symbolic in its graph: from its genai_config.json
    vocab = {o.name: o.shape for o in graph.session.get_outputs()}["logits"][-1]
    length, capacity = len(ids), len(ids) + new_tokens
    buffers = {name: np.zeros((batch, kv_heads, capacity, head_size), np.float32) for name in past}
    aliases = {name.replace("past_key_values.", "present."): name for name in past}
    prefill_logits, step_logits = np.zeros((batch, length, vocab), np.float32), np.zeros((batch, 1, vocab), np.float32)
    tick = time.perf_counter()
    graph.bind(buffers, aliases, {"logits": prefill_logits})({"input_ids": np.array([ids] * batch, np.int64),
                                                              "attention_mask": np.ones((batch, length), np.int64)})
    token = prefill_logits[:, -1].argmax(axis=-1)
    step, tokens = graph.bind(buffers, aliases, {"logits": step_logits}), [int(token[0])]
    mid = time.perf_counter()
    for n in range(1, new_tokens):
        step({"input_ids": token[:, None].astype(np.int64), "attention_mask": np.ones((batch, length + n), np.int64)})
        token = step_logits[:, 0].argmax(axis=-1)
        tokens.append(int(token[0]))
    return mid - tick, (time.perf_counter() - mid) / (new_tokens - 1), tokens


def ours_generate(steps, prefix, ids: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s per step) of the runtime's `decode` from a task's cached prompt KV."""
    tick = time.perf_counter()
    tokens = decode(steps, [(prefix, ids)] * batch, SamplingParams(max_new_tokens=new_tokens), eos_ids=())
    next(tokens)
    mid = time.perf_counter()
    for _ in tokens:
        pass
    return mid - tick, (time.perf_counter() - mid) / (new_tokens - 1)


def ours_from_scratch(steps: FusedDecoderSession, prompt: np.ndarray, ids: list[int], batch: int,
                      new_tokens: int = 0) -> tuple[float, list[int]]:
    """(prefill s, greedy tokens) with the prompt vectors fed through the graph, no cache: genai's work."""
    prompts = np.repeat(prompt[None], batch, 0)
    tick = time.perf_counter()
    logits, _, state = steps.start_from_prompts(prompts, [ids] * batch)
    elapsed, out = time.perf_counter() - tick, []
    for _ in range(new_tokens):
        token = logits.argmax(axis=-1)
        out.append(int(token[0]))
        logits, state = steps.advance(state, token)
    return elapsed, out


def features_ms(runner, prefix, ids: list[int], reps: int) -> float:
    rows = [(prefix, ids)] * 8
    runner.features(rows)
    times = []
    for _ in range(reps):
        tick = time.perf_counter()
        runner.features(rows)
        times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def paired_ratios(ours: list[float], genai: list[float]) -> dict:
    """Per-round ratios ours / genai (each round runs both back to back, so the pair shares the machine's state):
    their mean with a 95% Student-t interval, and the rounds ours won: what "at least 1.0, reliably" is judged by."""
    ratios = [a / b for a, b in zip(ours, genai)]
    mean, half = t_interval(ratios) if len(ratios) > 1 else (ratios[0], 0.0)
    return {"ratios": ratios, "mean": mean, "low": mean - half, "high": mean + half, "rounds": len(ratios),
            "won": sum(r >= 1.0 for r in ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=20, help="P: soft prompt vectors (ours) = first P tokens (genai)")
    parser.add_argument("--input-tokens", type=int, default=25, help="n: request tokens after the prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=HERE / "results" / "work" / "genai")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import onnxruntime_genai as og

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    work = args.work / args.backbone.replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.backbone)
    model, dim = backbone.model, backbone.model.get_input_embeddings().embedding_dim
    ids_all = backbone.tokenizer.encode(TEXT, add_special_tokens=False).ids
    p, n = args.prompt_length, args.input_tokens
    if len(ids_all) < p + n:
        raise SystemExit(f"the bench text has {len(ids_all)} tokens, fewer than --prompt-length + --input-tokens")
    ids_all = ids_all[:p + n]
    prompt = model.get_input_embeddings().weight[ids_all[:p]].detach().float().numpy()   # = the first P tokens
    request = ids_all[p:]
    ours_paths = build_ours(model, work, log)
    genai_paths = {precision: build_genai(backbone_folder(args.backbone), work, precision, args.threads, log)
                   for precision in ("fp32", "int4")}
    sessions = {name: FusedDecoderSession.open(GraphSession.open(path, "cpu", args.threads), dim)
                for name, path in ours_paths.items() if name.startswith("fused")}
    traced = DecoderSession.open(GraphSession.open(ours_paths["traced-fp32"], "cpu", args.threads), dim)
    genai_models = {precision: og.Model(str(path)) for precision, path in genai_paths.items()}
    genai_graphs = {precision: (GraphSession.open(path / "model.onnx", "cpu", args.threads),
                                json.loads((path / "genai_config.json").read_text())["model"]["decoder"]["head_size"])
                    for precision, path in genai_paths.items()}

    samples: dict[str, list[float]] = {}
    agreement = {}
    for round_ in range(args.rounds + 1):   # round 0 warms every session up and is not counted
        for precision in ("fp32", "int4"):
            steps = sessions[f"fused-{precision}"]
            prefix = steps.prefix(prompt)
            for batch in (1, 8):
                key = f"{precision}/b{batch}"
                sides = ["genai", "ours", "genai_graph"][::1 if round_ % 2 == 0 else -1]
                for side in sides:
                    if side == "genai":
                        prefill, step, tokens = genai_generate(genai_models[precision], ids_all, batch, args.new_tokens)
                        if batch == 1:
                            agreement.setdefault(precision, {})["genai"] = tokens
                    elif side == "genai_graph":
                        prefill, step, tokens = genai_graph_generate(*genai_graphs[precision], ids_all, batch,
                                                                     args.new_tokens)
                        if batch == 1:
                            agreement.setdefault(precision, {})["genai_graph"] = tokens
                    else:
                        prefill, step = ours_generate(steps, prefix, request, batch, args.new_tokens)
                        scratch, tokens = ours_from_scratch(steps, prompt, request, batch,
                                                            args.new_tokens if batch == 1 else 0)
                        if batch == 1:
                            agreement.setdefault(precision, {})["ours"] = tokens
                        if round_:
                            samples.setdefault(f"{key}/ours_scratch_prefill_ms", []).append(1000 * scratch)
                    if round_:
                        samples.setdefault(f"{key}/{side}_prefill_ms", []).append(1000 * prefill)
                        samples.setdefault(f"{key}/{side}_decode_tok_s", []).append(batch / step)
        if round_:
            log(f"round {round_} of {args.rounds} done")
    medians = {k: statistics.median(v) for k, v in samples.items()}
    keys = [f"{precision}/b{batch}" for precision in ("fp32", "int4") for batch in (1, 8)]
    paired = {key: paired_ratios(samples[f"{key}/ours_decode_tok_s"], samples[f"{key}/genai_decode_tok_s"]) for key in keys}
    paired_graph = {key: paired_ratios(samples[f"{key}/genai_graph_decode_tok_s"], samples[f"{key}/genai_decode_tok_s"])
                    for key in keys}

    rows = []
    for precision in ("fp32", "int4"):
        for batch in (1, 8):
            key = f"{precision}/b{batch}"
            m = {k.split("/", 2)[2]: v for k, v in medians.items() if k.startswith(key + "/")}
            rows.append({"precision": precision, "batch": batch, **m,
                         "decode_ratio": m["ours_decode_tok_s"] / m["genai_decode_tok_s"],
                         "decode_ratio_paired": paired[key],
                         "genai_graph_in_our_loop_paired": paired_graph[key],
                         "prefill_ratio_cached": m["genai_prefill_ms"] / m["ours_prefill_ms"],
                         "prefill_ratio_scratch": m["genai_prefill_ms"] / m["ours_scratch_prefill_ms"]})
    prefix = sessions["fused-fp32"].prefix(prompt)
    cls_ids = (request * 4)[:64]
    classify = {"fused_ms": statistics.median(features_ms(sessions["fused-fp32"], prefix, cls_ids, 5)
                                              for _ in range(args.rounds)),
                "traced_ms": statistics.median(features_ms(traced, traced.prefix(prompt), cls_ids, 5)
                                               for _ in range(args.rounds))}
    classify["fused_over_traced"] = classify["traced_ms"] / classify["fused_ms"]
    agree = {precision: sides["ours"] == sides["genai"] for precision, sides in agreement.items()}
    loop_agrees = {precision: sides["genai_graph"] == sides["genai"] for precision, sides in agreement.items()}

    print(f"\n{args.backbone}, {args.threads} thread(s), prompt {p} + {n} tokens, {args.new_tokens} new tokens, "
          f"median of {args.rounds} rounds; goal: every ratio >= 1.0")
    print(f"{'':>10} {'decode tok/s':>22} {'ratio':>6} {'prefill ms (genai / ours cached / ours scratch)':>48} {'ratios':>12}")
    for r in rows:
        print(f"{r['precision']:>5} b{r['batch']:<3} {r['ours_decode_tok_s']:>9.1f} vs {r['genai_decode_tok_s']:>8.1f} "
              f"{r['decode_ratio']:>6.2f} {r['genai_prefill_ms']:>20.1f} / {r['ours_prefill_ms']:>8.1f} / "
              f"{r['ours_scratch_prefill_ms']:>8.1f} {r['prefill_ratio_cached']:>6.2f} {r['prefill_ratio_scratch']:>5.2f}")
    print("decode ratios paired by round (the sides run back to back): mean [95% t-interval], rounds won; "
          "ours / genai, then genai's graph in our loop / genai (the loop's share of a gap)")
    for r in rows:
        d, g = r["decode_ratio_paired"], r["genai_graph_in_our_loop_paired"]
        print(f"{r['precision']:>5} b{r['batch']:<3} {d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}], "
              f"{d['won']} of {d['rounds']}   |   {g['mean']:.3f} [{g['low']:.3f}, {g['high']:.3f}], "
              f"{g['won']} of {g['rounds']}")
    print(f"classify b8x64 from the generation graph: fused {classify['fused_ms']:.1f} ms, traced "
          f"{classify['traced_ms']:.1f} ms → {classify['fused_over_traced']:.2f}x")
    print(f"greedy tokens equal genai's (ours from scratch, prompt = first {p} token embeddings): {agree}; "
          f"genai's graph in our loop: {loop_agrees}")
    report = {"machine": {**machine(), "isa": isa_flags(), "threads": args.threads, "huge_pages": huge_pages()},
              "versions": {"onnxruntime_genai": og.__version__ if hasattr(og, "__version__") else "?"},
              "backbone": args.backbone, "prompt_length": p, "input_tokens": n, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "rows": rows, "classify_b8x64": classify, "greedy_tokens_equal": agree,
              "genai_graph_in_our_loop_tokens_equal": loop_agrees}
    out = args.out or HERE / "results" / f"genai-{args.backbone.replace('/', '_')}.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"→ {out}")


if __name__ == "__main__":
    main()
