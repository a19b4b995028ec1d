"""`mpt-edge serve` under load on this machine: dynamic cross-task batching vs batching off, 127.0.0.1 only.

    python bench/serve.py                                  # SmolLM2-135M bundle (built once into --work), ~10 min
    python bench/serve.py --duration 30 --clients 32       # shorter runs
    python bench/serve.py --only soak --soak-s 600         # the 10-minute soak: errors and server RSS over time
    python bench/serve.py --bundle bundles/mine --tasks a,b   # your own bundle (its classify and generate tasks)

For batching on and then off, one server (`mpt-edge serve`, a local Ray instance, one worker replica) takes N
closed-loop clients for --duration seconds, classify and generate separately; every request picks the next task
in turn, so concurrent requests mix tasks. Reported: requests/s, texts/s, generated tokens/s (the generated
text re-tokenized), p50 / p99 latency, errors, the share of requests served in a batch holding ≥ 2 tasks, and
the server's RSS (its whole process tree, and the worker replica alone) sampled over time. Then, with batching
on, open-loop Poisson arrivals at half the measured peak request rate give p50 / p99 there. The soak runs
classify and generate clients together for --soak-s seconds and fits the RSS slope. Writes
bench/results/serve.json (or --out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

HERE = Path(__file__).parent
WORKER_TITLE = "ServeReplica:mpt-edge:Worker"
CLASSIFY_TEXTS = [
    "a gorgeous, moving film whose actors never put a foot wrong, even when the plot wanders off into three "
    "subplots that nobody asked for and the score insists on telling us what to feel in every single scene",
    "the company said quarterly earnings rose sharply on higher oil prices and lower costs, and it raised its "
    "forecast for the year while warning that demand in Europe could weaken before the end of the winter",
    "my car makes a rattling noise at low speed whenever I turn left, and the dealer says nothing is wrong, "
    "but the sound gets louder every week and now it also happens when I brake going down a hill",
    "two hours I will never get back: wooden dialogue, a villain with no motive, and an ending so abrupt that "
    "half of the audience stayed in their seats waiting for the rest of the film to start again",
]
GENERATE_TEXTS = [
    "Could a sloth walk from Lisbon to Madrid in a week without stopping to sleep?",
    "What is the capital of the country north of Spain and south of Belgium?",
    "Name a fruit that is yellow, curved and often eaten at breakfast.",
    "Why does the sky look blue on a clear day?",
]


# -- the bundle ----------------------------------------------------------------------------------------

def build_bundle(out: Path, prompt_length: int) -> None:
    """SmolLM2-135M with two classify and two generate tasks (random factors around 1: speed does not depend
    on what a prompt learned), exported with the KV-cache graph."""
    import numpy as np
    import torch

    from mpt_edge.backbones import load_backbone
    from mpt_edge.bundle_source import backbone_facts
    from mpt_edge.prompt_init import vocab_prompt
    from mpt_edge_export.bundle_writer import BundleSource, ExportOptions, ExportTask, write_bundle

    backbone = load_backbone("smollm2-135m")
    embeddings = backbone.model.get_input_embeddings().weight
    dim = embeddings.shape[1]
    generator = torch.Generator().manual_seed(0)
    shared = vocab_prompt(embeddings, prompt_length, generator).numpy()
    head = backbone.model.get_output_embeddings().weight

    def task(name: str, kind: str, template: str, verbalizers: list[str]) -> ExportTask:
        u = (1 + 0.05 * torch.randn(prompt_length, 1, generator=generator)).numpy()
        v = (1 + 0.05 * torch.randn(1, dim, generator=generator)).numpy()
        ids = [backbone.tokenizer.encode(w, add_special_tokens=False).ids[0] for w in verbalizers]
        assert len(set(ids)) == len(ids), f"{name}: verbalizers share a first token"
        labels = [w.strip() for w in verbalizers]
        spec = {"name": name, "kind": kind, "template": template, "group": 0, "max_length": 64, "labels": labels,
                "verbalizers": verbalizers}
        weight = head[ids].detach().numpy().copy() if ids else np.zeros((0, dim), np.float32)
        return ExportTask(spec, u, v, weight, np.zeros(len(ids), np.float32),
                          np.array(ids, np.int64) if ids else None)

    tasks = [task("sentiment", "classify", "Review: {text}\nSentiment:", [" negative", " positive"]),
             task("topic", "classify", "Article: {text}\nTopic:", [" world", " sports", " business", " science"]),
             task("answer", "generate", "Question: {text}\nAnswer:", []),
             task("explain", "generate", "Explain briefly: {text}\n", [])]
    source = BundleSource(backbone.family.name, backbone_facts(backbone), backbone.model, backbone.family.adapter(),
                          backbone.tokenizer, [shared], tasks)
    write_bundle(source, out, ExportOptions(max_length=64, kv_cache=True), log=lambda msg: print(msg, file=sys.stderr))


# -- the server ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mpt-edge serve` in a subprocess, with the RSS of its process tree sampled in the background."""

    def __init__(self, bundle: Path, batching: bool, args, log: Path):
        self.port, self.metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", "mpt_edge", "serve", str(bundle), "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port), "--num-cpus", str(os.cpu_count()),
                   "--replicas", str(args.replicas), "--replica-cpus", f"{os.cpu_count() / args.replicas:g}",
                   "--max-batch-size", str(args.max_batch_size),
                   "--batch-wait-ms", str(args.batch_wait_ms), "--max-ongoing-requests", str(max(64, 2 * args.clients)),
                   "--task-store", str(args.work / "task-store"), "--batching" if batching else "--no-batching"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        self.log_path = log
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        deadline = time.monotonic() + 600
        while "mpt-edge serve: 1 bundle(s)" not in log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mpt-edge serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, args=(args.rss_every,), daemon=True)
        self._sampler.start()

    def rss(self) -> dict:
        tree, worker = 0, 0
        try:
            processes = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return {"t": time.time(), "tree_mb": 0.0, "worker_mb": 0.0}
        for p in processes:
            try:
                rss = p.memory_info().rss
                tree += rss
                if WORKER_TITLE in " ".join(p.cmdline()):
                    worker += rss
            except psutil.Error:
                pass
        return {"t": time.time(), "tree_mb": tree / 2 ** 20, "worker_mb": worker / 2 ** 20}

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(self.rss())

    def stop(self) -> None:
        self._stop.set()
        family = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for pid in family:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


# -- the clients ---------------------------------------------------------------------------------------

def post(port: int, path: str, body: dict, timeout: float = 600) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


class Load:
    """Requests of one kind, tasks in turn (so concurrent requests mix tasks); results recorded per request."""

    def __init__(self, port: int, kind: str, tasks: list[str], new_tokens: int, tokenizer):
        self.port, self.kind, self.tasks, self.new_tokens, self.tokenizer = port, kind, tasks, new_tokens, tokenizer
        self.records: list[dict] = []
        self.turn = 0
        self.lock = threading.Lock()

    def one(self) -> None:
        with self.lock:
            task = self.tasks[self.turn % len(self.tasks)]
            texts = CLASSIFY_TEXTS if self.kind == "classify" else GENERATE_TEXTS
            text = texts[(self.turn // len(self.tasks)) % len(texts)]
            self.turn += 1
        body = {"task": task, "texts": [text]}
        if self.kind == "generate":
            body["max_new_tokens"] = self.new_tokens
        tick = time.perf_counter()
        try:
            status, headers, data = post(self.port, f"/v1/{self.kind}", body)
        except OSError as err:
            status, headers, data = -1, {}, str(err).encode()
        record = {"start": tick, "seconds": time.perf_counter() - tick, "status": status,
                  "batch_tasks": int(headers.get("x-batch-tasks", 0)), "batch_rows": int(headers.get("x-batch-rows", 0))}
        if status == 200 and self.kind == "generate":
            text = json.loads(data)["generations"][0]
            record["tokens"] = len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        elif status != 200:
            record["error"] = data[:300].decode(errors="replace")
        with self.lock:
            self.records.append(record)

    def closed_loop(self, clients: int, seconds: float) -> None:
        end = time.perf_counter() + seconds

        def client():
            while time.perf_counter() < end:
                self.one()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def open_loop(self, rate: float, seconds: float, seed: int = 0) -> None:
        """Poisson arrivals at `rate` requests/s, whatever the server's speed (up to 256 in flight)."""
        rng = random.Random(seed)
        start = time.perf_counter()
        with ThreadPoolExecutor(256) as pool:
            at = 0.0
            while at < seconds:
                delay = start + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self.one)
                at += rng.expovariate(rate)


def summary(records: list[dict], seconds: float, kind: str) -> dict:
    ok = [r for r in records if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in ok)

    def pct(q: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    result = {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
              "requests_per_s": round(len(ok) / seconds, 3), "texts_per_s": round(len(ok) / seconds, 3),
              "p50_ms": pct(0.50), "p99_ms": pct(0.99),
              "mean_batch_rows": round(statistics.mean(r["batch_rows"] for r in ok), 2) if ok else None,
              "share_in_multi_task_batches": round(sum(r["batch_tasks"] >= 2 for r in ok) / len(ok), 3) if ok else None}
    if kind == "generate":
        result["tokens_per_s"] = round(sum(r.get("tokens", 0) for r in ok) / seconds, 2)
        result["mean_tokens"] = round(statistics.mean(r.get("tokens", 0) for r in ok), 1) if ok else None
    errors = [r["error"] for r in records if r["status"] != 200]
    if errors:
        result["first_error"] = errors[0]
    return result


def rss_report(samples: list[dict], skip_s: float = 0.0) -> dict:
    if not samples:
        return {}
    t0 = samples[0]["t"]
    kept = [s for s in samples if s["t"] - t0 >= skip_s] or samples
    xs = [(s["t"] - t0) / 60 for s in kept]
    report = {"samples": len(samples)}
    for key in ("tree_mb", "worker_mb"):
        ys = [s[key] for s in kept]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        report[key] = {"first": round(ys[0], 1), "last": round(ys[-1], 1), "max": round(max(ys), 1),
                       "slope_mb_per_min": round(slope, 2)}
    report["series"] = [{"t_s": round(s["t"] - t0, 1), "tree_mb": round(s["tree_mb"], 1),
                         "worker_mb": round(s["worker_mb"], 1)} for s in samples]
    return report


# -- the runs ------------------------------------------------------------------------------------------

def tasks_of(bundle: Path, chosen: list[str] | None) -> dict[str, list[str]]:
    specs = json.loads((bundle / "tasks.json").read_text())["tasks"]
    kinds: dict[str, list[str]] = {"classify": [], "generate": []}
    for spec in specs:
        if not chosen or spec["name"] in chosen:
            kinds[spec.get("kind", "classify")].append(spec["name"])
    return kinds


def warm(load: Load) -> None:
    for _ in range(len(load.tasks)):
        load.one()
    load.records.clear()


def measure(server: Server, kinds: dict, args, tokenizer) -> dict:
    results = {}
    for kind in ("classify", "generate"):
        if not kinds[kind] or kind not in args.kinds:
            continue
        load = Load(server.port, kind, kinds[kind], args.new_tokens, tokenizer)
        warm(load)
        tick = time.perf_counter()
        load.closed_loop(args.clients, args.duration)
        results[kind] = summary(load.records, time.perf_counter() - tick, kind)
        print(f"  {kind}: {json.dumps(results[kind])}", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a causal bundle with a generation graph (default: build SmolLM2)")
    parser.add_argument("--tasks", help="comma-separated tasks of --bundle to use (default: all)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mpt-edge" / "bench-serve")
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per closed-loop run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: onnxruntime's)")
    parser.add_argument("--replicas", type=int, default=1, help="worker replicas, sharing the machine's CPUs")
    parser.add_argument("--kinds", default="classify,generate")
    parser.add_argument("--only", choices=["compare", "half-peak", "soak"], action="append",
                        help="run only these parts (repeatable; default: compare and half-peak)")
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--rss-every", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()
    args.kinds = args.kinds.split(",")
    parts = args.only or ["compare", "half-peak"]
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or args.work / f"smollm2-135m-l{args.prompt_length}"
    if args.bundle is None and not (bundle / "manifest.json").is_file():
        print(f"building the benchmark bundle → {bundle} (one time)", file=sys.stderr)
        build_bundle(bundle, args.prompt_length)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    kinds = tasks_of(bundle, args.tasks.split(",") if args.tasks else None)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_start": os.getloadavg()},
              "bundle": str(bundle), "tasks": kinds, "options": {k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in vars(args).items()}}
    if "compare" in parts or "half-peak" in parts:
        for batching in (True, False) if "compare" in parts else (True,):
            name = "batching_on" if batching else "batching_off"
            print(f"{name}: starting the server", file=sys.stderr)
            server = Server(bundle, batching, args, args.work / f"serve-{name}.log")
            try:
                report[name] = measure(server, kinds, args, tokenizer) if "compare" in parts else {}
                if batching and "half-peak" in parts:
                    report["half_peak"] = {}
                    for kind in ("classify", "generate"):
                        if kind not in args.kinds or not kinds[kind]:
                            continue
                        peak = report[name].get(kind, {}).get("requests_per_s")
                        if not peak:
                            load = Load(server.port, kind, kinds[kind], args.new_tokens, tokenizer)
                            load.closed_loop(args.clients, args.duration)
                            peak = summary(load.records, args.duration, kind)["requests_per_s"]
                        load = Load(server.port, kind, kinds[kind], args.new_tokens, tokenizer)
                        load.open_loop(peak / 2, args.duration)
                        result = summary(load.records, args.duration, kind)
                        result["rate_per_s"] = round(peak / 2, 3)
                        result["p99_over_p50"] = round(result["p99_ms"] / result["p50_ms"], 2) if result["p50_ms"] else None
                        report["half_peak"][kind] = result
                        print(f"  half peak {kind}: {json.dumps(result)}", file=sys.stderr)
                report[name]["rss"] = rss_report(server.samples)
            finally:
                server.stop()
        if "compare" in parts:
            ratios = {}
            for kind, key in (("classify", "texts_per_s"), ("generate", "tokens_per_s")):
                on, off = report["batching_on"].get(kind, {}).get(key), report["batching_off"].get(kind, {}).get(key)
                if on and off:
                    ratios[kind] = round(on / off, 2)
            report["batching_on_over_off"] = ratios
            print(f"batching on / off: {ratios}", file=sys.stderr)
    if "soak" in parts:
        print(f"soak: {args.soak_s:.0f} s, {args.clients} clients of each kind", file=sys.stderr)
        server = Server(bundle, True, args, args.work / "serve-soak.log")
        try:
            loads = [Load(server.port, kind, kinds[kind], args.new_tokens, tokenizer)
                     for kind in ("classify", "generate") if kinds[kind] and kind in args.kinds]
            threads = [threading.Thread(target=load.closed_loop, args=(args.clients, args.soak_s)) for load in loads]
            tick = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - tick
            report["soak"] = {load.kind: summary(load.records, seconds, load.kind) for load in loads}
            report["soak"]["rss"] = rss_report(server.samples, skip_s=min(60.0, args.soak_s / 5))
            print(f"soak: {json.dumps({k: v for k, v in report['soak'].items() if k != 'rss'})}", file=sys.stderr)
            print(f"soak RSS: { {k: v for k, v in report['soak']['rss'].items() if k != 'series'} }", file=sys.stderr)
        finally:
            server.stop()
    report["machine"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"→ {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
