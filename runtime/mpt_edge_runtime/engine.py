"""The engine: one graph, many tasks. Classify texts for one task, or a batch whose rows mix tasks.

    engine = mpt_edge_runtime.load("bundle/", device="cpu")
    engine.classify("sentiment", ["great film", "dull"])        # → [Prediction, Prediction]
    engine.run([("sentiment", "great"), ("topic", "goal!")])    # one batch, results in request order
    engine.add_task("new_task", "new_task.safetensors")         # hot-load factors; the graph is untouched

Thread safety: the task table is replaced, never mutated, under a lock; onnxruntime sessions and
tokenizers are safe to call concurrently, so concurrent calls give the same answers as serial ones.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from tokenizers import Tokenizer

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.bundle import TaskEntry, read_manifest, read_tasks, task_entry
from mpt_edge_runtime.errors import BundleError, InputError, UnknownTaskError
from mpt_edge_runtime.session import GraphSession
from mpt_edge_runtime.text import encode_example, plain_tokenizer, special_tokens


@dataclass(frozen=True)
class Prediction:
    """The predicted label of one text, its probability, and every label's probability."""

    task: str
    label: str
    score: float
    probabilities: dict[str, float] = field(repr=False)


class Engine:
    """Serves every task of a bundle from one onnxruntime session."""

    def __init__(self, session: GraphSession, tokenizer: Tokenizer, manifest: dict, tasks: Iterable[TaskEntry],
                 groups: dict[str, np.ndarray], batch_size: int = 32):
        self.session, self.tokenizer, self.manifest = session, plain_tokenizer(tokenizer), manifest
        self.groups = groups
        self.batch_size = batch_size
        self._specials = special_tokens(self.tokenizer)
        self._tasks = {t.name: t for t in tasks}
        self._lock = threading.Lock()

    @property
    def tasks(self) -> list[str]:
        return sorted(self._tasks)

    @property
    def device(self) -> str:
        return self.session.device

    def task(self, name: str) -> TaskEntry:
        tasks = self._tasks
        if not isinstance(name, str) or name not in tasks:
            raise UnknownTaskError(name, tasks)
        return tasks[name]

    def classify(self, task: str, texts: Sequence[str]) -> list[Prediction]:
        """Label each text with `task`; returns one Prediction per text, in order."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InputError(f"texts must be a list of strings, got {type(texts).__name__}; wrap one text in a list")
        self.task(task)
        return self.run([(task, text) for text in texts])

    def run(self, requests: Sequence[tuple[str, str]]) -> list[Prediction]:
        """One batch whose rows may belong to different tasks: [(task, text), ...] → Predictions in order."""
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
            raise InputError("requests must be a non-empty list of (task, text) pairs")
        tasks = self._tasks  # one consistent snapshot for the whole call
        rows = []
        for i, request in enumerate(requests):
            if not (isinstance(request, (tuple, list)) and len(request) == 2):
                raise InputError(f"request {i} must be a (task, text) pair, got {request!r}")
            name, text = request
            if name not in tasks:
                raise UnknownTaskError(name, tasks)
            if not isinstance(text, str):
                raise InputError(f"request {i}: text must be a string, got {type(text).__name__}")
            entry = tasks[name]
            rows.append((entry, encode_example(self.tokenizer, entry.template, {"text": text}, entry.max_length,
                                               self._specials)))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))  # similar lengths share a batch
        results: list[Prediction | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, prediction in zip(chunk, self._forward([rows[i] for i in chunk])):
                results[i] = prediction
        return results

    def _forward(self, rows: list[tuple[TaskEntry, list[int]]]) -> list[Prediction]:
        width = max(len(ids) for _, ids in rows)
        input_ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, (_, ids) in enumerate(rows):
            input_ids[b, :len(ids)], mask[b, :len(ids)] = ids, 1
        prompts = np.stack([entry.prompt for entry, _ in rows])
        features = self.session.features(input_ids, mask, prompts)
        return [_predict(entry, row) for (entry, _), row in zip(rows, features)]

    def add_task(self, name: str, factors: str | Path) -> None:
        """Hot-load a task from a factors file (`mpt-edge export-task` / `write_task_file`); replaces a same-name task."""
        entry = read_task_file(Path(factors), self.manifest, self.groups, name)
        with self._lock:
            self._tasks = {**self._tasks, entry.name: entry}

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(name, self._tasks)
            self._tasks = {k: v for k, v in self._tasks.items() if k != name}


def _predict(entry: TaskEntry, features: np.ndarray) -> Prediction:
    logits = entry.head_weight @ features + entry.head_bias
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(np.argmax(probs))
    return Prediction(entry.name, entry.labels[best], float(probs[best]),
                      {label: float(p) for label, p in zip(entry.labels, probs)})


def read_task_file(path: Path, manifest: dict, groups: dict[str, np.ndarray], name: str | None = None) -> TaskEntry:
    """A single-task factors file: safetensors with u, v, head.weight, head.bias and either its own `shared`
    or metadata naming a bundle group; the task spec is JSON in the file's metadata under "task"."""
    if not path.is_file():
        raise BundleError(f"task file {path} does not exist")
    data = path.read_bytes()
    try:
        header_length = int.from_bytes(data[:8], "little")
        spec = json.loads(json.loads(data[8:8 + header_length])["__metadata__"]["task"])
        tensors = load_tensors(data)
    except (ValueError, KeyError, TypeError, SafetensorError) as err:  # damaged or foreign file: say which and why
        raise BundleError(f"{path} is not an mpt-edge task file ({type(err).__name__}: {err})") from None
    spec["name"] = name or spec["name"]
    keyed = {fmt.task_key(spec["name"], part): tensors[part] for part in ("u", "v", "head.weight", "head.bias")
             if part in tensors}
    if "shared" in tensors:
        spec["group"] = f"{spec['name']}-own"
        keyed[fmt.shared_key(spec["group"])] = tensors["shared"]
    elif str(spec.get("group")) in groups:
        keyed[fmt.shared_key(spec["group"])] = groups[str(spec["group"])]
    else:
        raise BundleError(f"{path}: task {spec['name']!r} has no shared prompt of its own and names group "
                          f"{spec.get('group')!r}, which this bundle lacks (groups: {sorted(groups)})")
    return task_entry(spec, keyed, manifest, str(path))


def load(bundle: str | Path, device: str = "auto", *, threads: int | None = None, batch_size: int = 32) -> Engine:
    """Open a bundle folder: verify it, compose every task's prompt, start the session on `device`."""
    folder = Path(bundle)
    manifest = read_manifest(folder)
    tasks, groups = read_tasks(folder, manifest)
    session = GraphSession.open(folder / fmt.GRAPH, device, threads)
    _check_graph(session, manifest, folder)
    tokenizer = Tokenizer.from_file(str(folder / fmt.TOKENIZER))
    return Engine(session, tokenizer, manifest, tasks, groups, batch_size)


def _check_graph(session: GraphSession, manifest: dict, folder: Path) -> None:
    inputs = {i.name: i.shape for i in session.session.get_inputs()}
    expected = set(fmt.GRAPH_INPUTS)
    if set(inputs) != expected:
        raise BundleError(f"{folder / fmt.GRAPH} has inputs {sorted(inputs)}, expected {sorted(expected)}; re-export")
    dim = inputs[fmt.PROMPT_EMBEDS][-1]
    if isinstance(dim, int) and dim != manifest["prompt"]["hidden_size"]:
        raise BundleError(f"{folder / fmt.GRAPH} takes prompts of hidden size {dim}, but {fmt.MANIFEST} says "
                          f"{manifest['prompt']['hidden_size']}; the bundle is inconsistent, re-export it")
