"""Training step time and peak memory: our stages vs PEFT's MultitaskPromptTuning, same backbone and batch.

    python bench/train_speed.py [--backbone smollm2-135m] [--prompt-lengths 20,100] [--steps 6]

Each implementation runs in its own process (peak RSS is per process), on the same real batches (Rotten
Tomatoes + tweet sentiment, every row padded to --seq tokens), batch 8, Adafactor. PEFT classifies the way a
PEFT user would with a causal LM: labels are -100 except the verbalizer token after the input, and the model
computes logits over the whole vocabulary at every position. Ours scores only the label tokens at the last
position. Prints s/step, steps/s and peak RSS, with ratios; writes bench/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
TASKS = ("rotten_tomatoes", "tweet_sentiment")


def batches(backbone, seq: int, batch: int, steps: int):
    """Real examples, each row exactly `seq` tokens (template + text, truncated or repeated), label token ids."""
    import torch

    from mpt_edge.batching import Batch, encode_tasks
    from mpt_edge.data.fetch import default_data_dir
    from mpt_edge.datasets import load_split
    from mpt_edge.scoring import verbalizer_ids

    tasks = load_split(list(TASKS), default_data_dir(), "train", k_per_class=32)
    encoded = encode_tasks(tasks, backbone.tokenizer, seq)
    out = []
    for step in range(steps):
        rows, labels, task_ids, words = [], [], [], []
        for b in range(batch):
            t = (step + b) % len(encoded)
            i = (step * batch + b) % len(encoded[t])
            ids = (encoded[t].ids[i] * seq)[-seq:]  # keep the template's end ("Sentiment:") last
            rows.append(ids)
            labels.append(encoded[t].labels[i])
            task_ids.append(t)
            words.append(verbalizer_ids(encoded[t].spec, backbone.tokenizer)[encoded[t].labels[i]])
        ids = torch.tensor(rows)
        out.append((Batch(ids, torch.ones_like(ids), torch.tensor(labels), torch.tensor(task_ids)), torch.tensor(words)))
    return [e.spec for e in encoded], out


def run_ours(args) -> dict:
    import torch

    from mpt_edge import stages
    from mpt_edge.backbones import load_backbone
    from mpt_edge.prompt_init import identity_factors
    from mpt_edge.prompt import MultitaskPrompt
    from mpt_edge.training_loop import TrainConfig

    backbone = load_backbone(args.backbone)
    specs, data = batches(backbone, args.seq, args.batch, args.steps + args.warmup)
    dim = backbone.model.get_input_embeddings().embedding_dim
    generator = torch.Generator().manual_seed(0)
    u, v = identity_factors(len(specs), args.prompt_length, 1, dim, generator)
    prompt = MultitaskPrompt(torch.randn(1, args.prompt_length, dim) * 0.05, u, v, [0] * len(specs))
    classifier = stages.classifier_for(backbone, specs, None)
    loss_fn = stages.supervised_loss(classifier, prompt)
    config = TrainConfig()
    optimizer = torch.optim.Adafactor([{"params": list(prompt.shared), "lr": config.lr_prompt},
                                       {"params": [*prompt.u, *prompt.v], "lr": config.lr_factors}])
    return timed(lambda batch, _: loss_fn(batch)[0], optimizer, data, args.warmup)


def run_peft(args) -> dict:
    import torch
    from peft import MultitaskPromptTuningConfig, TaskType, get_peft_model

    from mpt_edge.backbones import load_backbone

    backbone = load_backbone(args.backbone)
    specs, data = batches(backbone, args.seq, args.batch, args.steps + args.warmup)
    config = MultitaskPromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.prompt_length,
                                         num_tasks=len(specs), num_ranks=1,
                                         token_dim=backbone.model.get_input_embeddings().embedding_dim)
    model = get_peft_model(backbone.model, config)
    model.train()
    optimizer = torch.optim.Adafactor([p for p in model.parameters() if p.requires_grad], lr=0.03)

    def loss(batch, words):
        labels = torch.full_like(batch.input_ids, -100)
        # next-token loss: the verbalizer is the token after the input, so append it as the last label position
        ids = torch.cat([batch.input_ids, words[:, None]], dim=1)
        labels = torch.cat([labels, words[:, None]], dim=1)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, task_ids=batch.task_ids).loss

    return timed(loss, optimizer, data, args.warmup)


def timed(loss_fn, optimizer, data, warmup: int) -> dict:
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step, (batch, words) in enumerate(data):
        tick = time.perf_counter()
        loss = loss_fn(batch, words)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - tick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"s_per_step": times[len(times) // 2], "peak_rss_mb": peak / 1024, "train_rss_mb": (peak - baseline) / 1024,
            "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--prompt-lengths", default="20,100")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impl", choices=("ours", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--prompt-length", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:  # child process: one measurement, JSON on stdout
        print(json.dumps((run_ours if args.impl == "ours" else run_peft)(args)))
        return
    report = {"backbone": args.backbone, "batch": args.batch, "seq": args.seq, "runs": {}}
    print(f"{args.backbone}, batch {args.batch} × {args.seq} tokens, median of {args.steps} steps after {args.warmup}")
    print(f"{'l':>4} {'impl':<6} {'s/step':>8} {'steps/s':>8} {'peak RSS MB':>12} {'train RSS MB':>13}")
    for length in map(int, args.prompt_lengths.split(",")):
        row = {}
        for impl in ("peft", "ours"):
            cmd = [sys.executable, __file__, "--impl", impl, "--prompt-length", str(length), "--backbone", args.backbone,
                   "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{impl} failed:\n{proc.stderr[-2000:]}")
            row[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = row[impl]
            print(f"{length:>4} {impl:<6} {r['s_per_step']:>8.3f} {1 / r['s_per_step']:>8.3f} {r['peak_rss_mb']:>12.0f} "
                  f"{r['train_rss_mb']:>13.0f}", flush=True)
        row["throughput_ratio"] = row["peft"]["s_per_step"] / row["ours"]["s_per_step"]
        row["peak_memory_ratio"] = row["ours"]["peak_rss_mb"] / row["peft"]["peak_rss_mb"]
        print(f"{length:>4} ours vs PEFT: {row['throughput_ratio']:.2f}× step throughput, "
              f"{100 * row['peak_memory_ratio']:.0f}% of its peak RSS", flush=True)
        report["runs"][str(length)] = row
    out = HERE / "results" / "train_speed.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
