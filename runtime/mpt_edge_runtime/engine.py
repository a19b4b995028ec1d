"""The engine: one graph, many tasks. Classify texts for one task, or a batch whose rows mix tasks.

    engine = mpt_edge_runtime.load("bundle/", device="cpu")
    engine.classify("sentiment", ["great film", "dull"])        # → [Prediction, Prediction]
    engine.run([("sentiment", "great"), ("topic", "goal!")])    # one batch, results in request order
    engine.generate("answer", ["Q: 2 + 2?"], SamplingParams(max_new_tokens=8))   # bundles with a generation graph
    for piece in engine.stream("answer", "Q: 3 + 4?"): ...      # text pieces as they are generated
    engine.add_task("new_task", "new_task.safetensors")         # hot-load factors; the graph is untouched

The engine is a façade over one object per idea: the `Model` (manifest, graph runner), the `RequestEncoder`
(checks and tokenizes requests), the `TaskTable` (tasks by name), `classify_rows` and `stream_rows`.
With a generation graph, each task's prompt KV is computed once when the task is loaded; every request,
classify or generate, starts from it, so the prompt never re-runs.

Thread safety: the task table is replaced, never mutated, under a lock; onnxruntime sessions and
tokenizers are safe to call concurrently, so concurrent calls give the same answers as serial ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.bundle import parse_manifest, read_tasks
from mpt_edge_runtime.classifier import Prediction, classify_rows
from mpt_edge_runtime.errors import BundleError
from mpt_edge_runtime.generator import stream_rows
from mpt_edge_runtime.manifest import Manifest
from mpt_edge_runtime.model import Model
from mpt_edge_runtime.requests import RequestEncoder, check_texts
from mpt_edge_runtime.sampling import SamplingParams, sampling_params
from mpt_edge_runtime.task_table import TaskEntry, TaskTable, read_task_file
from mpt_edge_runtime.verification import StampStore, Verification


@dataclass(frozen=True)
class LoadReport:
    """How `load` spent its time, wall seconds: from its start to the graph session(s) ready (`session_s`), and,
    meanwhile in a second thread, hashing (`hash_s`) and reading tasks + tokenizer (`tasks_s`); then waiting
    for that thread (`wait_s`), computing each task's prefix (`prepare_s`), and the whole load (`total_s`).
    `hashed`: files hashed by this load; `stamped`: files a verified stamp vouched for (not hashed)."""

    hash_s: float
    session_s: float
    tasks_s: float
    wait_s: float
    prepare_s: float
    total_s: float
    hashed: tuple[str, ...]
    stamped: tuple[str, ...]


class Engine:
    """Serves every task of a bundle from one model. Generation methods take `sampling` (SamplingParams; None:
    greedy, 32 new tokens) and, as keywords, any of its fields, which override it (`max_new_tokens=8`)."""

    load_report: LoadReport | None = None     # set by `load`

    def __init__(self, model: Model, tokenizer: Tokenizer, tasks: Iterable[TaskEntry],
                 groups: dict[str, np.ndarray], batch_size: int = 32):
        self.model = model
        self.request_encoder = RequestEncoder(tokenizer)
        self.groups = groups          # shared prompts by group name: what a hot-loaded task may build on
        self.batch_size = batch_size
        self._tasks = TaskTable(model.prepare(t) for t in tasks)

    @property
    def tasks(self) -> list[str]:
        return self._tasks.names()

    @property
    def device(self) -> str:
        return self.model.device

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    def task(self, name: str) -> TaskEntry:
        return self._tasks.get(name)

    def classify(self, task: str, texts: Sequence[str]) -> list[Prediction]:
        """Label each text with `task`; returns one Prediction per text, in order."""
        check_texts(texts)
        self.task(task)
        return self.run([(task, text) for text in texts])

    def run(self, requests: Sequence[tuple[str, str]]) -> list[Prediction]:
        """One batch whose rows may belong to different classify tasks: [(task, text), ...] → Predictions in order."""
        rows = self.request_encoder.encode(requests, "classify", self._tasks.snapshot())
        return classify_rows(self.model.runner, rows, self.batch_size)

    def generate(self, task: str, texts: Sequence[str], sampling: SamplingParams | None = None,
                 **options) -> list[str]:
        """Continue each text with `task`'s prompt: greedy (temperature 0) or sampled; one string per text."""
        check_texts(texts)
        self.task(task)
        return self.generate_batch([(task, text) for text in texts], sampling, **options)

    def stream(self, task: str, text: str, sampling: SamplingParams | None = None, **options) -> Iterator[str]:
        """Yield the generated text of one request piece by piece, as tokens are produced."""
        for _, piece in self.stream_batch([(task, text)], sampling, **options):
            yield piece

    def generate_batch(self, requests: Sequence[tuple[str, str]], sampling: SamplingParams | None = None,
                       **options) -> list[str]:
        """One batch whose rows may belong to different generate tasks → one string per request, in order."""
        texts = [""] * len(requests)
        for i, piece in self.stream_batch(requests, sampling, **options):
            texts[i] += piece
        return texts

    def stream_batch(self, requests: Sequence[tuple[str, str]], sampling: SamplingParams | None = None,
                     **options) -> Iterator[tuple[int, str]]:
        """Generate for every request in one batch; yield (request index, text piece) as pieces are ready."""
        params = sampling_params(sampling, options)
        if not self.model.generates:
            raise BundleError("this bundle has no generation graph; re-export it with `mpt-edge export --kv-cache` "
                              "(causal and seq2seq backbones)")
        rows = self.request_encoder.encode(requests, "generate", self._tasks.snapshot())
        yield from stream_rows(self.model, self.request_encoder.tokenizer, rows, params)

    def add_task(self, name: str, factors: str | Path) -> None:
        """Hot-load a task from a factors file (`mpt-edge export-task` / `write_task_file`); replaces a same-name task."""
        self._tasks.add(self.model.prepare(read_task_file(Path(factors), self.manifest, self.groups, name)))

    def remove_task(self, name: str) -> None:
        self._tasks.remove(name)


def load(bundle: str | Path, device: str = "auto", *, threads: int | None = None, batch_size: int = 32,
         stamps: StampStore | bool = False) -> Engine:
    """Open a bundle folder: verify it, compose every task's prompt, start the session on `device`.

    Every file the manifest lists matches its sha256 before this returns and before any graph runs. A second
    thread hashes tasks, prompts and tokenizer, then parses them, then hashes the graph file(s), while this one
    starts the onnxruntime session (which reads the graph meanwhile); any mismatch raises BundleError and the
    session is dropped, never used. On a single CPU everything is hashed first, then the session starts.
    With `stamps=True` (or a StampStore), a file whose identity is unchanged since an earlier full
    verification is not hashed again (an authenticated stamp: see mpt_edge_runtime.verification for what that
    trusts); for machines with no second core to hash on."""
    tick = time.perf_counter()
    folder = Path(bundle)
    manifest = parse_manifest(folder)
    check = Verification(folder, manifest.files, stamps)
    if _cpus() < 2:     # nothing to overlap with: verify everything first, then open the graph
        tasks, groups, tokenizer, tasks_s = _verify_and_read(folder, manifest, check)
        model = Model.open(folder, manifest, device, threads)
        session_tick = time.perf_counter()
    else:
        with ThreadPoolExecutor(1, thread_name_prefix="mpt-edge-load") as pool:
            side = pool.submit(_verify_and_read, folder, manifest, check)
            try:
                model = Model.open(folder, manifest, device, threads)
            except BaseException:
                if side.exception() is not None:   # a changed file (or bad task list) explains a graph that fails
                    raise side.exception() from None
                raise
            session_tick = time.perf_counter()
            tasks, groups, tokenizer, tasks_s = side.result()        # BundleError if any file mismatched
    if not check.finish():
        raise BundleError(f"{folder}: not every file was verified")   # unreachable: every listed file is checked
    prepare_tick = time.perf_counter()
    engine = Engine(model, tokenizer, tasks, groups, batch_size)
    done = time.perf_counter()
    engine.load_report = LoadReport(check.seconds, session_tick - tick, tasks_s, prepare_tick - session_tick,
                                    done - prepare_tick, done - tick, tuple(check.hashed),
                                    tuple(name for name in manifest.files if name not in check.hashed))
    return engine


def _cpus() -> int:
    """CPUs this process may run on (hashing beside the session's start only pays with a second one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _verify_and_read(folder: Path, manifest: Manifest, check: Verification) -> tuple:
    """Beside the session's start: hash the files parsed here before parsing them, then the graph file(s)."""
    parsed = [name for name in manifest.files if name in (fmt.TASKS, fmt.PROMPTS, fmt.TOKENIZER)]
    check.verify(parsed)
    tick = time.perf_counter()
    tasks, groups = read_tasks(folder, manifest)
    tokenizer = Tokenizer.from_file(str(folder / fmt.TOKENIZER))
    tasks_s = time.perf_counter() - tick
    check.verify([name for name in manifest.files if name not in parsed])
    return tasks, groups, tokenizer, tasks_s
