"""Runtime speed, accuracy and footprint on CPU: onnxruntime bundles (fp32, quantization recipes) vs PyTorch eager.

    python bench/runtime.py [--backbones smollm2-135m,minilm-l6] [--batches 1,8,32] [--sequences 64,128]
        [--threads N] [--reps 15] [--checkpoint DIR] [--work DIR] [--runtime-env-size]
    python bench/runtime.py --quick --backbones minilm-l6      # smoke test: one shape, tiny repetition counts
    python bench/runtime.py --backbones smollm2-135m --checkpoint builds/smollm2-135m/teachers/rotten_tomatoes \
        --batches 1,8 --sequences 64 --variants int8-mixed,int4 --kv-cache --out bench/results/quantization-smollm2-fused.json
    python bench/runtime.py --backbones smollm2-135m --checkpoint builds/smollm2-135m/teachers/rotten_tomatoes \
        --batches 1,8 --sequences 64 --variants int8-mixed,int4,int8-block   # the quantization table

Trains a small real prompt checkpoint (or takes --checkpoint), exports fp32 and every --quantize recipe (or
--variants) into --work
(reused when present), then measures side by side in one process: graph forward (features) of every variant vs
eager PyTorch with the same prompts and thread count, the full `engine.run` path, dev accuracy, mixed vs
single-task batches, task hot-loading, cold start in a fresh process, installed size, bytes per task and the
machine's matmul peak. Prints tables and the goals; writes bench/results/runtime.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from packaging.requirements import Requirement
from safetensors.numpy import load_file

import mpt_edge_runtime as mer
from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.backbones import load_backbone
from mpt_edge.batching import encode_tasks
from mpt_edge.bundle_source import bundle_source, calibration_rows
from mpt_edge.checkpoint import has_checkpoint
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.prompt import PromptConfig
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import ExportOptions, write_bundle, write_task_file
from mpt_edge_export.graph import PromptedFeatures
from mpt_edge_export.transform import CALIBRATED, QUANT_RECIPES
from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.bundle import task_tensors
from mpt_edge_runtime.text import encode_example, special_tokens

HERE = Path(__file__).parent
TASK, OTHER = "rotten_tomatoes", "tweet_sentiment"
RUNTIME_DEPS = ("numpy", "tokenizers", "safetensors", "onnxruntime")


# ---------------------------------------------------------------- setup: checkpoint and bundles

def setup(name: str, args) -> tuple:
    """Backbone, bundle source and {variant: bundle folder}; checkpoint and bundles are made once, then reused."""
    backbone = load_backbone(name)
    folder = Path(args.checkpoint) if args.checkpoint else args.work / name / f"pt-k{args.train_k}-s{args.train_steps}"
    if not has_checkpoint(folder):
        config = TrainConfig(steps=args.train_steps, batch_size=8, max_length=128, checkpoint_every=10**6)
        train = load_split([TASK, OTHER], default_data_dir(), "train", k_per_class=args.train_k)
        encoded = encode_tasks(train, backbone.tokenizer, config.max_length)
        fit(stages.prompt_tuning("pt", backbone, encoded, config, PromptConfig(length=20)), encoded, config, folder,
            progress=False)
    trained = load_trained(folder)
    if TASK not in trained.task_names:
        sys.exit(f"error: {folder} has tasks {trained.task_names}; the benchmark needs {TASK!r}")
    source = bundle_source(trained, backbone)
    tag = f"{trained.meta.extra['sha256'][:10]}{'-opt' if args.optimize else ''}{'-kv' if args.kv_cache else ''}"
    bundles = {}
    for variant in ("fp32", *args.variants):
        out = args.work / name / f"bundle-{tag}-{variant}"
        if not (out / fmt.MANIFEST).is_file():
            print(f"  exporting {variant} → {out}", flush=True)
            calibrated = replace(source, calibration=calibration_rows(trained, backbone, default_data_dir())) \
                if variant in CALIBRATED else source
            write_bundle(calibrated, out, ExportOptions(optimize=args.optimize, quantize=None if variant == "fp32" else variant,
                                                    kv_cache=args.kv_cache or None))
        bundles[variant] = out
    return backbone, source, bundles


# ---------------------------------------------------------------- timing helpers

def time_block(fn, warmup: int, reps: int, budget: float) -> list[float]:
    """Seconds per call: `warmup` untimed calls, then up to `reps` timed ones (at least one; none past `budget` s)."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < reps and (not times or sum(times) < budget):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return times


def side_by_side(variants: dict, args) -> dict[str, list[float]]:
    """Every variant in turn, in `rounds` blocks each, so drift and neighbours' load hit them alike."""
    times = {k: [] for k in variants}
    per_round = max(1, args.reps // args.rounds)
    for _ in range(args.rounds):
        for key, fn in variants.items():
            times[key] += time_block(fn, args.warmup, per_round, args.budget / args.rounds)
    return times


def stats(times: list[float], rows: int) -> dict:
    ordered = sorted(times)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": p50 * 1e3, "p95_ms": p95 * 1e3, "rows_per_s": rows / p50, "calls": len(times)}


def token_rows(tokenizer, texts: list[str], batch: int, seq: int) -> np.ndarray:
    """(batch, seq) ids cut from the concatenated real texts (no padding: every row has exactly seq tokens)."""
    stream, i = [], 0
    while len(stream) < batch * seq:
        stream += tokenizer.encode(texts[i % len(texts)], add_special_tokens=False).ids
        i += 1
    return np.array(stream[:batch * seq], dtype=np.int64).reshape(batch, seq)


# ---------------------------------------------------------------- measurements

def measure_speed(engines: dict, wrapper, test_texts: list[str], args) -> dict:
    """Features forward of every variant vs eager, and fp32 `engine.run` at the same shape, per (batch, seq)."""
    fp32 = engines["fp32"]
    entry, tok = fp32.task(TASK), fp32.request_encoder.tokenizer
    specials = special_tokens(tok)
    frame = len(encode_example(tok, entry.template, {"text": ""}, 10**6, specials))  # template + special tokens
    results = {}
    for batch in args.batches:
        for seq in args.sequences:
            ids = token_rows(tok, test_texts, batch, seq)
            mask = np.ones_like(ids)
            prompts = np.ascontiguousarray(np.repeat(entry.prompt[None], batch, axis=0))
            tensors = [torch.from_numpy(x) for x in (ids, mask, prompts)]
            texts = [tok.decode(row[:max(1, seq - frame)].tolist()) for row in ids]
            requests = [(TASK, t) for t in texts]
            variants = {"eager": lambda: wrapper(*tensors)}
            variants |= {k: (lambda e=e: graph_features(e, ids, mask, prompts)) for k, e in engines.items()}
            variants["fp32 run"] = lambda: fp32.run(requests)
            with torch.no_grad():
                times = side_by_side(variants, args)
            row = {k: stats(t, batch) for k, t in times.items()}
            for k in row:
                row[k]["speedup"] = row["eager"]["p50_ms"] / row[k]["p50_ms"]
            row["run_overhead_ms"] = row["fp32 run"]["p50_ms"] - row["fp32"]["p50_ms"]
            row["run_tokens"] = statistics.mean(len(encode_example(tok, entry.template, {"text": t}, entry.max_length,
                                                                   specials)) for t in texts)
            results[f"{batch}x{seq}"] = row
            print(f"  {batch} × {seq}: run path {row['run_tokens']:.0f} tokens/row, overhead "
                  f"{row['run_overhead_ms']:+.1f} ms over the fp32 forward", flush=True)
            for k, v in row.items():
                if isinstance(v, dict):
                    print(f"    {k:<17} {v['p50_ms']:9.1f} {v['p95_ms']:9.1f} {v['rows_per_s']:9.1f} "
                          f"{v['speedup']:7.2f}× ({v['calls']} calls)", flush=True)
    return results


def measure_accuracy(engines: dict, dev, cosine_rows: int) -> dict:
    """Dev accuracy through `engine.classify` per variant; points vs fp32; min feature cosine vs fp32."""
    texts = [e.fields["text"] for e in dev.examples]
    gold = [dev.spec.labels[e.label] for e in dev.examples]
    fp32 = engines["fp32"]
    tokenizer = fp32.request_encoder.tokenizer
    entry, specials = fp32.task(TASK), special_tokens(tokenizer)
    encoded = sorted(encode_example(tokenizer, entry.template, {"text": t}, entry.max_length, specials)
                     for t in texts[:cosine_rows])
    features = {k: _features(e, entry.prompt, encoded) for k, e in engines.items()}
    predicted = {k: np.array([p.label for p in e.classify(TASK, texts)]) for k, e in engines.items()}
    right = {k: (p == np.array(gold)).astype(float) for k, p in predicted.items()}
    results = {}
    for key in engines:
        a, b = features[key], features["fp32"]
        cosine = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        change = right[key] - right["fp32"]    # per example: +1 fixed, -1 broken, 0 same
        results[key] = {"accuracy": 100 * float(right[key].mean()), "min_cosine_vs_fp32": float(cosine.min()),
                        "points_vs_fp32": 100 * float(change.mean()),
                        "points_vs_fp32_95": 100 * 1.96 * float(change.std(ddof=1) / np.sqrt(len(change))),
                        "flipped_vs_fp32": 100 * float(np.mean(predicted[key] != predicted["fp32"]))}
    return {"examples": len(texts), "cosine_rows": len(encoded), "variants": results}


def _features(engine, prompt: np.ndarray, encoded: list[list[int]], batch: int = 32) -> np.ndarray:
    out = []
    for start in range(0, len(encoded), batch):
        rows = encoded[start:start + batch]
        ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, row in enumerate(rows):
            ids[b, :len(row)], mask[b, :len(row)] = row, 1
        out.append(graph_features(engine, ids, mask, np.repeat(prompt[None], len(rows), axis=0)))
    return np.concatenate(out)


def graph_features(engine, ids: np.ndarray, mask: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """One forward of the bundle's graph → features (B, d): the features graph takes the prompts; a generation
    graph (--kv-cache) starts every row from the task's cached prompt KV (the prompt does not run again)."""
    runner = engine.model.runner
    if engine.manifest.graph.kind == fmt.FEATURES_KIND:
        return runner.graph.features(ids, mask, prompts)
    prefix = engine.task(TASK).prefix
    return runner.features([(prefix, row[m.astype(bool)].tolist()) for row, m in zip(ids, mask)])


def measure_mixed(engine, texts: list[str], batch: int, args) -> dict | None:
    """`engine.run` on one batch: rows alternating two tasks vs all rows one task (same texts); None for a
    one-task bundle (a --checkpoint with one task)."""
    other = OTHER if OTHER in engine.tasks else next((t for t in engine.tasks if t != TASK), None)
    if other is None:
        return None
    texts = (texts * batch)[:batch]
    single = {TASK: [(TASK, t) for t in texts], other: [(other, t) for t in texts]}
    mixed = [((TASK, other)[i % 2], t) for i, t in enumerate(texts)]
    times = side_by_side({f"single {TASK}": lambda: engine.run(single[TASK]),
                          f"single {other}": lambda: engine.run(single[other]), "mixed": lambda: engine.run(mixed)}, args)
    row = {k: stats(t, batch) for k, t in times.items()}
    single_ms = statistics.mean(v["p50_ms"] for k, v in row.items() if k != "mixed")
    return {"batch": batch, **row, "mixed_vs_single": single_ms / row["mixed"]["p50_ms"]}


def measure_tasks(engine, bundle: Path, source, work: Path, text: str, args) -> dict:
    """Hot-load/remove a task (factors file, and a full file with its own P*), switch cost per call,
    vs opening a separate engine per task."""
    task = source.tasks[0]
    files = {"factors": work / "task-factors.safetensors", "full": work / "task-full.safetensors"}
    write_task_file(files["factors"], task)
    write_task_file(files["full"], task, shared=source.groups[task.spec["group"]])
    results = {}
    for mode, path in files.items():
        adds, removes = [], []
        for _ in range(args.task_reps):
            tick = time.perf_counter()
            engine.add_task("hot", path)
            mid = time.perf_counter()
            engine.remove_task("hot")
            adds.append(mid - tick)
            removes.append(time.perf_counter() - mid)
        results[f"add_{mode}_ms"] = statistics.median(adds) * 1e3
        results[f"remove_{mode}_ms"] = statistics.median(removes) * 1e3
        results[f"file_bytes_{mode}"] = path.stat().st_size
    other = next((t for t in engine.tasks if t != TASK), TASK)
    turn = iter(range(10**9))
    calls = argparse.Namespace(**{**vars(args), "reps": args.task_reps})
    times = side_by_side({"same A": lambda: engine.run([(TASK, text)]), "same B": lambda: engine.run([(other, text)]),
                          "alternate": lambda: engine.run([((TASK, other)[next(turn) % 2], text)])}, calls)
    for key, values in times.items():
        results[f"{key.replace(' ', '_')}_call_ms"] = statistics.median(values) * 1e3
    results["switch_cost_per_call_ms"] = (results["alternate_call_ms"]
                                          - (results["same_A_call_ms"] + results["same_B_call_ms"]) / 2)
    loads = []
    for _ in range(args.load_reps):
        tick = time.perf_counter()
        mer.load(bundle, device="cpu", threads=args.threads)
        loads.append(time.perf_counter() - tick)
    results["separate_engine_load_ms"] = statistics.median(loads) * 1e3
    return results


def cold_start(bundle: Path, threads: int, reps: int) -> dict:
    """Fresh `python -c` processes: interpreter alone, + import, + load + first answer (median wall seconds)."""
    answer = (f"import sys, json, mpt_edge_runtime as m; e = m.load({str(bundle)!r}, device='cpu', threads={threads}); "
              f"e.classify({TASK!r}, ['a great film']); "
              "print(json.dumps([k for k in ('torch', 'transformers') if k in sys.modules]))")
    results, loaded = {}, []
    for key, code in (("python_s", "pass"), ("import_s", "import mpt_edge_runtime"), ("first_answer_s", answer)):
        walls = []
        for _ in range(reps):
            tick = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - tick)
            if key == "first_answer_s":
                loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        results[key] = statistics.median(walls)
    return {**results, "heavy_modules_loaded": loaded}


def installed_size(build_venv: bool) -> dict:
    """MiB of a runtime-only install: a throwaway venv (--runtime-env-size), else the dependency closure here."""
    if build_venv:
        du = lambda path: int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True,  # noqa: E731
                                             check=True).stdout.split()[0]) / 1024
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
            subprocess.run([f"{tmp}/bin/pip", "install", "-q", *RUNTIME_DEPS], check=True)
            site = next(Path(tmp).glob("lib/python*/site-packages"))
            total, pip = du(site), sum(du(p) for p in site.glob("pip*"))
        return {"how": "fresh venv, du -s site-packages", "mib": total, "mib_without_pip": total - pip}
    sizes, todo = {}, list(RUNTIME_DEPS)
    while todo:
        dist = md.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key not in sizes:
            sizes[key] = sum(p.locate().stat().st_size for p in dist.files or () if p.locate().is_file()) / 2**20
            todo += [r.name for r in map(Requirement, dist.requires or ())
                     if r.marker is None or r.marker.evaluate({"extra": ""})]
    return {"how": "dependency closure of the runtime's packages in this venv", "mib": sum(sizes.values()),
            "packages_mib": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}


def bytes_per_task(bundle: Path) -> dict:
    """Bytes the bundle stores per task in `factors` mode (u, v and a learned head (C·d + C) or the verbalizer ids
    of a causal task, whose rows the bundle's verbalizer table holds once) and `full` (+ the task's own P*: l·d)."""
    tensors = load_file(str(bundle / fmt.PROMPTS))
    out = {}
    for name in json.loads((bundle / fmt.TASKS).read_text())["tasks"]:
        parts = task_tensors(tensors, name["name"])
        factors = sum(p.nbytes for p in parts.values())
        shared = tensors[fmt.shared_key(name["group"])].nbytes
        out[name["name"]] = {"factors_bytes": factors, "full_bytes": factors + shared,
                             "shapes": {p: list(t.shape) for p, t in parts.items()}}
    return out


def matmul_peak(threads: int, n: int, reps: int) -> dict:
    """float32 matmul GFLOP/s: numpy (fresh process, BLAS threads = threads) and torch (this process)."""
    code = (f"import numpy as np, time; a = np.random.rand({n}, {n}).astype(np.float32); b = a.copy(); a @ b\n"
            f"best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range({reps}))\n"
            f"print(2 * {n}**3 / best / 1e9)")
    env = {**os.environ, **{v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    numpy_gflops = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True).stdout)
    a = torch.rand(n, n)
    torch.mm(a, a)
    torch_gflops = 2 * n**3 / min(time_block(lambda: torch.mm(a, a), 0, reps, 1e9)) / 1e9
    return {"n": n, "numpy_gflops": numpy_gflops, "torch_gflops": torch_gflops, "peak_gflops": max(numpy_gflops, torch_gflops)}


def kernel_peaks(threads: int, variants: list[str], shape=(576, 1536), rows=(1, 1312), budget: float = 3.0) -> dict:
    """GFLOP/s of one weight MatMul (K × N = `shape`, SmolLM2's MLP) through onnxruntime, fp32 and quantized by
    each recipe, at each row count M (1: a decode step; 1312: a classify batch of 8 × (100 + 64) positions): the
    ceiling each recipe's kernels put on a whole graph's speed-up on this CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mpt_edge_export.transform import quantize

    k, n = shape
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj/MatMul")], "peak",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], [weight])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    out = {"shape": [k, n]}
    with tempfile.TemporaryDirectory() as folder:
        paths = {"fp32": Path(folder) / "fp32.onnx"}
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths["fp32"])
        for variant in variants:
            paths[variant] = Path(folder) / f"{variant}.onnx"
            calibration = [{"x": rng.standard_normal((8, k)).astype(np.float32)}] if variant in CALIBRATED else ()
            quantize(paths["fp32"], paths[variant], variant, calibration)
        sessions = {v: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for v, p in paths.items()}
        for m in rows:
            x = rng.standard_normal((m, k)).astype(np.float32)
            times = side_by_side({v: (lambda s=s: s.run(None, {"x": x})) for v, s in sessions.items()},
                                 argparse.Namespace(rounds=3, warmup=2, reps=50, budget=budget))
            out[f"m{m}"] = {v: 2 * m * k * n / statistics.median(t) / 1e9 for v, t in times.items()}
    return out


def flops(backbone, prompt_length: int, batch: int, seq: int) -> dict:
    """2 × matmul params × tokens (Linear layers of the base model; the BERT pooler sees one token per row,
    left out), plus attention scores and mixing 4 · layers · T² · d per row; T = seq + prompt length."""
    params = sum(m.weight.numel() for name, m in backbone.model.base_model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "pooler" not in name)
    config, tokens = backbone.model.config, seq + prompt_length
    attention = 4 * config.num_hidden_layers * tokens**2 * config.hidden_size * batch
    return {"matmul_params": params, "tokens": batch * tokens, "linear_flops": 2 * params * batch * tokens,
            "attention_flops": attention, "total_flops": 2 * params * batch * tokens + attention}


# ---------------------------------------------------------------- per backbone, goals, main

def run_backbone(name: str, args) -> dict:
    print(f"\n== {name}: setup", flush=True)
    backbone, source, bundles = setup(name, args)
    torch.set_num_threads(args.threads)
    engines = {k: mer.load(b, device="cpu", threads=args.threads, batch_size=max(32, *args.batches))
               for k, b in bundles.items()}
    data = default_data_dir()
    test_texts = [e.fields["text"] for e in load_split([TASK], data, "test")[0].examples]
    wrapper = PromptedFeatures(backbone.model, source.adapter).eval()
    length = source.groups[0].shape[0]
    print(f"== {name}: graph forward, {args.threads} threads; variant, p50 ms, p95 ms, rows/s, p50 speedup vs eager")
    speed = measure_speed(engines, wrapper, test_texts, args)
    print(f"== {name}: accuracy, mixed batches, tasks, cold start", flush=True)
    dev = load_split([TASK], data, "dev", limit=args.eval_limit)[0]
    report = {
        "prompt_length": length,
        "bundles": {k: {"folder": str(b), "graph_mib": sum(f.stat().st_size for f in b.glob("model.onnx*")) / 2**20}
                    for k, b in bundles.items()},
        "speed": speed,
        "accuracy": measure_accuracy(engines, dev, min(args.eval_limit, 64)),
        "mixed": measure_mixed(engines["fp32"], test_texts, max(args.batches), args),
        "tasks": measure_tasks(engines["fp32"], bundles["fp32"], source, args.work / name, test_texts[0], args),
        "cold_start": cold_start(bundles["fp32"], args.threads, args.cold_reps),
        "bytes_per_task": bytes_per_task(bundles["fp32"]),
    }
    key = max(speed, key=lambda k: np.prod([int(x) for x in k.split("x")]))
    work = flops(backbone, length, *map(int, key.split("x")))
    report["achieved"] = {"shape": key, **work, **{
        f"{v}_gflops": work["total_flops"] / speed[key][v]["p50_ms"] / 1e6 for v in ("eager", "fp32", *args.variants)}}
    return report


def goals(name: str, r: dict, peak: float) -> list[tuple[str, str, bool | None]]:
    """(goal, measured value, met?) per goal; None when the run did not measure it."""
    speed, acc = r["speed"], r["accuracy"]["variants"]

    def worst(variant, batch=None):
        values = [row[variant]["speedup"] for k, row in speed.items() if batch is None or k.split("x")[0] == str(batch)]
        return min(values) if values else None

    rows = []
    for batch, target in ((8, 1.15), (1, 1.5)):
        value = worst("fp32", batch)
        rows.append((f"fp32 ≥ {target}× eager at batch {batch} (worst seq)",
                     "not measured" if value is None else f"{value:.2f}×", None if value is None else value >= target))
    quantized = [k for k in acc if k != "fp32"]
    if quantized and worst(quantized[0], 8) is not None:
        best = max(quantized, key=lambda k: (acc[k]["points_vs_fp32"] >= -1, worst(k, 8)))
        value, points = worst(best, 8), acc[best]["points_vs_fp32"]
        rows.append(("quantized ≥ 3× eager at batch 8 (worst seq), ≤ 1 pt dev loss",
                     f"{best}: {value:.2f}×, {points:+.1f} pt vs fp32", value >= 3 and points >= -1))
    mixed = r["mixed"]["mixed_vs_single"] if r["mixed"] else None
    rows.append(("mixed ≥ 0.95× single", "not measured (one task)" if mixed is None else f"{mixed:.2f}×",
                 None if mixed is None else mixed >= 0.95))
    tasks = r["tasks"]
    slowest = max(tasks["add_factors_ms"], tasks["add_full_ms"], tasks["switch_cost_per_call_ms"])
    rows.append(("add/switch task < 1 ms", f"add {tasks['add_factors_ms']:.3f} / {tasks['add_full_ms']:.3f} ms, "
                 f"switch {tasks['switch_cost_per_call_ms']:+.3f} ms/call", slowest < 1))
    cold = r["cold_start"]["first_answer_s"]
    rows.append(("cold start < 1 s (MiniLM)", f"{cold:.2f} s, torch loaded: {bool(r['cold_start']['heavy_modules_loaded'])}",
                 (cold < 1 and not r["cold_start"]["heavy_modules_loaded"]) if name == "minilm-l6" else None))
    frac = r["achieved"]["fp32_gflops"] / peak
    rows.append((f"(info) fp32 at {r['achieved']['shape']}: share of matmul peak", f"{100 * frac:.0f}%", None))
    return rows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--backbones", default="smollm2-135m,minilm-l6")
    parser.add_argument("--batches", type=ints, default=[1, 8, 32])
    parser.add_argument("--sequences", type=ints, default=[64, 128])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--reps", type=int, default=15, help="most timed calls per variant and shape")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per variant, interleaved with the others")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each block")
    parser.add_argument("--budget", type=float, default=15.0, help="timed seconds per variant and shape, at most "
                        "(then fewer calls than --reps: at least one per round)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(QUANT_RECIPES),
                        help=f"--quantize recipes to compare with fp32 (default: all of {', '.join(QUANT_RECIPES)})")
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=40, help="PT steps per task for the benchmark checkpoint")
    parser.add_argument("--train-k", type=int, default=64, help="training examples per class for that checkpoint")
    parser.add_argument("--checkpoint", help="reuse this checkpoint (must hold rotten_tomatoes) instead of training")
    parser.add_argument("--work", type=Path, default=HERE / "results" / "work")
    parser.add_argument("--optimize", action="store_true", help="export with onnxruntime offline optimization")
    parser.add_argument("--kv-cache", action="store_true", help="export the generation graph (fused for Llama-like "
                        "backbones): classification starts from the task's cached prompt KV")
    parser.add_argument("--runtime-env-size", action="store_true", help="measure a fresh runtime-only venv (pip)")
    parser.add_argument("--out", type=Path, help="default bench/results/runtime.json (--quick: <work>/runtime-quick.json)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 8 × 64, tiny reps, 20 dev examples")
    args = parser.parse_args()
    if args.checkpoint and "," in args.backbones:
        parser.error("--checkpoint belongs to one backbone; pass --backbones NAME too")
    unknown = [v for v in args.variants if v not in QUANT_RECIPES]
    if unknown:
        parser.error(f"--variants {', '.join(unknown)}: not recipes of --quantize ({', '.join(QUANT_RECIPES)})")
    args.task_reps, args.load_reps, args.cold_reps, args.matmul = 50, 3, 3, (2048, 5)
    if args.quick:
        args.batches, args.sequences, args.eval_limit = [8], [64], 20
        args.reps, args.rounds, args.warmup, args.budget = 3, 1, 1, 5.0
        args.task_reps, args.load_reps, args.cold_reps, args.matmul = 10, 1, 1, (1024, 2)
    args.out = args.out or (args.work / "runtime-quick.json" if args.quick else HERE / "results" / "runtime.json")
    return args


def print_backbone(name: str, r: dict, peak: dict, variants: list[str]) -> None:
    print(f"\n{name}: dev accuracy ({r['accuracy']['examples']} examples) / points vs fp32 ± paired 95% / "
          "labels flipped vs fp32 (%) / min cosine vs fp32")
    for k, v in r["accuracy"]["variants"].items():
        print(f"  {k:<17} {v['accuracy']:6.1f} {v['points_vs_fp32']:+6.1f} ± {v['points_vs_fp32_95']:.1f} "
              f"{v['flipped_vs_fp32']:5.1f} {v['min_cosine_vs_fp32']:.5f}")
    m, t, c, a = r["mixed"], r["tasks"], r["cold_start"], r["achieved"]
    print(f"  mixed/single batch {m['batch']}: {m['mixed_vs_single']:.3f}×; " if m else "  mixed: one task; ",
          end="")
    print(f"add task {t['add_factors_ms']:.3f} ms "
          f"(factors) {t['add_full_ms']:.3f} ms (full); switch {t['switch_cost_per_call_ms']:+.3f} ms/call; "
          f"separate engine load {t['separate_engine_load_ms']:.0f} ms")
    print(f"  cold start: python {c['python_s']:.2f} s, import {c['import_s']:.2f} s, load + first answer "
          f"{c['first_answer_s']:.2f} s; heavy modules: {c['heavy_modules_loaded'] or 'none'}")
    for task, b in r["bytes_per_task"].items():
        print(f"  bytes/task {task}: factors {b['factors_bytes']}, full {b['full_bytes']}")
    print(f"  at {a['shape']} ({a['total_flops'] / 1e9:.1f} GFLOP, attention {a['attention_flops'] / 1e9:.1f}): "
          + ", ".join(f"{v} {a[f'{v}_gflops']:.0f}" for v in ("eager", "fp32", *variants))
          + f" GFLOP/s; fp32 matmul peak {peak['peak_gflops']:.0f} (quantized graphs run int kernels: not comparable)")


def main() -> None:
    args = parse_args()
    peak = matmul_peak(args.threads, *args.matmul)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": args.threads, "versions": {"torch": torch.__version__, "onnxruntime": md.version("onnxruntime")},
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "matmul_peak": peak, "installed_size": installed_size(args.runtime_env_size), "backbones": {}}
    kernels = report["kernel_peaks"] = kernel_peaks(args.threads, args.variants)
    for m in (key for key in kernels if key.startswith("m")):
        print(f"onnxruntime MatMul {kernels['shape'][0]}×{kernels['shape'][1]} at M = {m[1:]}, GFLOP/s: "
              + ", ".join(f"{v} {g:.0f}" for v, g in kernels[m].items()))
    print(f"matmul peak: numpy {peak['numpy_gflops']:.0f}, torch {peak['torch_gflops']:.0f} GFLOP/s; "
          f"runtime install {report['installed_size']['mib']:.0f} MiB ({report['installed_size']['how']})")
    for name in args.backbones.split(","):
        r = report["backbones"][name] = run_backbone(name, args)
        print_backbone(name, r, peak, args.variants)
        r["goals"] = [{"goal": g, "measured": v, "met": ok} for g, v, ok in goals(name, r, peak["peak_gflops"])]
    print("\ngoals")
    for name, r in report["backbones"].items():
        for g in r["goals"]:
            mark = {True: "PASS", False: "FAIL", None: "  - "}[g["met"]]
            print(f"  {mark} {name:<13} {g['goal']:<52} {g['measured']}")
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
