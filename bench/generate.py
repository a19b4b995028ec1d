"""Generation speed on CPU: the runtime's KV-cache graph vs PyTorch eager `generate`, with the same prompt.

    python bench/generate.py                          # SmolLM2-135M, 2 threads
    python bench/generate.py --backbone tiny --reps 3 # a tiny random Llama: seconds, checks the code paths

Measured side by side in one process (same thread count, greedy, a fixed number of new tokens):
- prefill latency and decode tokens/s at batch 1: runtime (from the task's cached prompt KV) vs
  `model.generate(inputs_embeds=[prompt | text])`; the greedy tokens must agree;
- prefill with the cached prompt KV vs recomputing the prompt per request, at prompt lengths 20 and 100;
- a batch whose rows mix two tasks vs a single-task batch (tokens/s).
Writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.prompt_init import init_prompt
from mpt_edge_export.families.causal.graphs import export_decoder
from mpt_edge_runtime.generation import DecoderSession, decode, prefill_inputs, prompt_cache
from mpt_edge_runtime.sampling import SamplingParams
from mpt_edge_runtime.session import GraphSession

HERE = Path(__file__).parent
TEXTS = ["Review: a gorgeous, moving film whose actors never put a foot wrong, even when the plot does.\nSentiment:",
         "Question: Could a sloth walk from Lisbon to Madrid in a week without stopping to sleep?\nAnswer:",
         "Post: my car makes a rattling noise at low speed whenever I turn left, any idea what it could be?\nTopic:",
         "Article: the company said quarterly earnings rose sharply on higher oil prices and lower costs.\nTopic:"]


def tiny_backbone():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval().requires_grad_(False), None


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return times


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def runtime_generate(decoder, rows, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds, decode seconds, tokens per row) for one greedy generation from cached prompt KV."""
    config = SamplingParams(max_new_tokens=new_tokens)
    tick = time.perf_counter()
    steps = decode(decoder, rows, config, eos_ids=())
    first = next(steps)
    mid = time.perf_counter()
    rest = list(steps)
    end = time.perf_counter()
    return mid - tick, end - mid, np.stack([first, *rest], axis=1).tolist()


@torch.no_grad()
def torch_generate(model, prompt: torch.Tensor, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, tokens) of eager `generate`: prefill = a 1-token generate, decode =
    the rest of an N-token generate (N - 1 tokens)."""
    embeds = torch.cat([prompt[None], model.get_input_embeddings()(torch.tensor([ids]))], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    options = {"inputs_embeds": embeds, "attention_mask": mask, "do_sample": False, "pad_token_id": 0}
    tick = time.perf_counter()
    model.generate(**options, max_new_tokens=1, min_new_tokens=1)
    prefill = time.perf_counter() - tick
    tick = time.perf_counter()
    out = model.generate(**options, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    total = time.perf_counter() - tick
    return prefill, max(total - prefill, 1e-9), out[0, -new_tokens:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m", help="a named backbone, a local folder, or 'tiny'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=HERE / "results" / "work" / "generate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backbone == "tiny":
        model, tokenizer = tiny_backbone()
        encode = lambda text: [(ord(c) % 500) + 1 for c in text][:48]  # noqa: E731 (no tokenizer for random weights)
    else:
        backbone = load_backbone(args.backbone)
        model, tokenizer = backbone.model, backbone.tokenizer
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    graph = args.work / args.backbone.replace("/", "_") / "decoder.onnx"
    if not graph.is_file():
        graph.parent.mkdir(parents=True, exist_ok=True)
        tick = time.perf_counter()
        export_decoder(model, graph)
        print(f"exported the generation graph in {time.perf_counter() - tick:.1f} s → {graph}")
    dim = model.get_input_embeddings().embedding_dim
    decoder = DecoderSession.open(GraphSession.open(graph, "cpu", args.threads), dim)
    generator = torch.Generator().manual_seed(0)
    embeddings = model.get_input_embeddings().weight
    prompts = {length: [init_prompt("vocab", embeddings, length, generator) for _ in range(2)] for length in (20, 100)}
    caches = {length: [prompt_cache(decoder, p.numpy()) for p in ps] for length, ps in prompts.items()}
    ids = [encode(t) for t in TEXTS]
    report = {"machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__}, "backbone": args.backbone, "new_tokens": args.new_tokens}

    # 1. batch 1: runtime vs eager generate, same prompt (l = 20)
    rows = [(caches[20][0], ids[0])]
    ours = [runtime_generate(decoder, rows, args.new_tokens) for _ in range(args.reps + 1)][1:]
    eager = [torch_generate(model, prompts[20][0], ids[0], args.new_tokens) for _ in range(args.reps + 1)][1:]
    agree = ours[0][2][0] == eager[0][2]
    ours_prefill, eager_prefill = median_ms([o[0] for o in ours]), median_ms([e[0] for e in eager])
    ours_tps = (args.new_tokens - 1) / statistics.median([o[1] for o in ours])
    eager_tps = (args.new_tokens - 1) / statistics.median([e[1] for e in eager])
    report["batch1"] = {"runtime_prefill_ms": ours_prefill, "eager_prefill_ms": eager_prefill,
                        "runtime_decode_tok_s": ours_tps, "eager_decode_tok_s": eager_tps,
                        "decode_speedup": ours_tps / eager_tps, "prefill_speedup": eager_prefill / ours_prefill,
                        "greedy_tokens_agree": agree, "input_tokens": len(ids[0])}
    print(f"batch 1, {len(ids[0])} input tokens, prompt 20: prefill {ours_prefill:.1f} ms (eager {eager_prefill:.1f} ms), "
          f"decode {ours_tps:.1f} tok/s (eager {eager_tps:.1f}) → {ours_tps / eager_tps:.2f}×; greedy tokens agree: {agree}")

    # 2. prefill: cached prompt KV vs recomputing the prompt, prompt lengths 20 and 100
    report["prefill"] = {}
    for length in (20, 100):
        cached = prefill_inputs([(caches[length][0], ids[0])], dim)
        run_cached = lambda c=cached: decoder.step(c["input_ids"], c["attention_mask"], c["position_ids"],  # noqa: E731
                                                   c["prompts"], c["past"])
        n = len(ids[0])
        full = (np.array([ids[0]]), np.ones((1, length + n), np.int64), np.arange(length + n)[None],
                prompts[length][0].numpy()[None], decoder.empty_past(1))
        run_full = lambda f=full: decoder.step(*f)  # noqa: E731
        report["prefill"][length] = {"cached_ms": median_ms(timed(run_cached, args.reps * 2)),
                                     "recomputed_ms": median_ms(timed(run_full, args.reps * 2))}
    flat = report["prefill"][100]["cached_ms"] / report["prefill"][20]["cached_ms"]
    report["prefill_cached_100_over_20"] = flat
    for length, r in report["prefill"].items():
        print(f"prefill, prompt {length}: cached prompt KV {r['cached_ms']:.1f} ms vs recomputed {r['recomputed_ms']:.1f} ms")
    print(f"cached prefill at prompt 100 / prompt 20: {flat:.3f} (goal: within 1.10)")

    # 3. mixed-task vs single-task batch of 8
    single = [(caches[20][0], ids[k % len(ids)]) for k in range(8)]
    mixed = [(caches[20][k % 2], ids[k % len(ids)]) for k in range(8)]
    tps = {}
    for name, batch_rows in (("single", single), ("mixed", mixed)):
        runs = [runtime_generate(decoder, batch_rows, args.new_tokens) for _ in range(args.reps + 1)][1:]
        tps[name] = 8 * args.new_tokens / statistics.median([r[0] + r[1] for r in runs])
    report["batch8_tok_s"] = {**tps, "mixed_over_single": tps["mixed"] / tps["single"]}
    print(f"batch 8: single task {tps['single']:.1f} tok/s, mixed tasks {tps['mixed']:.1f} tok/s "
          f"({tps['mixed'] / tps['single']:.2f}×)")
    out = HERE / "results" / f"generate-{args.backbone.replace('/', '_')}.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"→ {out}")


if __name__ == "__main__":
    main()
