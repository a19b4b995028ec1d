"""Tasks: what a bundle (or a task file) stores for each task, composed into a servable `TaskEntry`, and the
`TaskTable` of an engine (tasks by name, hot add and remove).

    entry = task_entry(spec, tensors, manifest, where)     # spec from tasks.json, tensors from prompts.safetensors
    entry.prompt (l, d); entry.head_weight (C, d), entry.head_bias (C,)
    table = TaskTable([entry, ...]); table.get("name"); table.add(other); table.remove("name")
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.errors import BundleError, UnknownTaskError
from mpt_edge_runtime.manifest import Manifest

KINDS = ("classify", "generate")


@dataclass(frozen=True)
class TaskEntry:
    """A servable task: its kind, text template, labels, and the composed prompt and head.

    prompt (l, d) float32; head_weight (C, d) and head_bias (C,): logits = features @ head_weightᵀ + head_bias
    (generate tasks have C = 0). prefix: what every request of the task starts from, set by the model when the task
    is loaded: the prompt's KV cache (causal generation graph) or the prompt itself (features graph, seq2seq).
    """

    name: str
    labels: tuple[str, ...]
    template: str
    max_length: int
    prompt: np.ndarray
    head_weight: np.ndarray
    head_bias: np.ndarray
    kind: str = "classify"
    prefix: object = None
    label_tokens: tuple = ()   # whole-sequence verbalizers: one token-id tuple per label (scored by the decoder)


def compose(shared: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """P_k = P* ∘ (U_k V_k): shared (l, d), u (l, r), v (r, d) → (l, d) float32."""
    return (shared.astype(np.float32) * (u.astype(np.float32) @ v.astype(np.float32))).astype(np.float32)


def verbalizer_rows(tensors: dict[str, np.ndarray], ids: np.ndarray, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A causal task's head from the bundle's verbalizer table: token ids (C,) → weight (C, d), bias (C,)."""
    table = tensors[fmt.VERBALIZER_IDS]
    row_of = {int(token): row for row, token in enumerate(table)}
    if ids.ndim != 1 or any(int(token) not in row_of for token in ids):
        raise BundleError(f"{where}: task {name!r} names verbalizer token ids {ids.tolist()} that the bundle's "
                          "verbalizer table lacks; re-export the bundle")
    rows = [row_of[int(token)] for token in ids]
    return tensors[fmt.VERBALIZER_WEIGHT][rows], tensors[fmt.VERBALIZER_BIAS][rows]


def task_entry(spec: dict, tensors: dict[str, np.ndarray], manifest: Manifest, where: str) -> TaskEntry:
    """Build one TaskEntry from its spec and tensors; shapes must fit the graph (length l, hidden size d)."""
    name = spec.get("name")
    kind = spec.get("kind", "classify")
    if kind not in KINDS:
        raise BundleError(f"{where}: task {name!r} has kind {kind!r}; this runtime serves classify and generate")
    sequences = spec.get("verbalizer_ids") if spec.get("verbalizer_tokens") == "all" else None
    if (kind == "generate" or sequences is not None) and manifest.graph.kind == fmt.FEATURES_KIND:
        raise BundleError(f"{where}: task {name!r} {'generates' if kind == 'generate' else 'scores whole verbalizer sequences'}"
                          ", but the bundle has no generation graph; re-export it with `mpt-edge export --kv-cache`")
    length, dim = manifest.prompt.length, manifest.prompt.hidden_size
    try:
        shared = tensors[fmt.shared_key(spec["group"])]
        u, v = tensors[fmt.task_key(name, "u")], tensors[fmt.task_key(name, "v")]
        if kind == "generate":
            weight, bias = np.zeros((0, dim), np.float32), np.zeros((0,), np.float32)
        elif fmt.task_key(name, "head.ids") in tensors:
            weight, bias = verbalizer_rows(tensors, tensors[fmt.task_key(name, "head.ids")], name, where)
        else:
            weight, bias = tensors[fmt.task_key(name, "head.weight")], tensors[fmt.task_key(name, "head.bias")]
    except KeyError as err:
        raise BundleError(f"{where}: task {name!r} needs tensor {err.args[0]!r}, which is missing") from None
    if shared.shape != (length, dim) or u.shape[0] != length or v.shape[1:] != (dim,) or u.shape[1] != v.shape[0]:
        raise BundleError(
            f"{where}: task {name!r} has prompt factors shared {shared.shape}, u {u.shape}, v {v.shape}, which do not "
            f"fit the graph's prompt ({length}, {dim}); export the task for this backbone and prompt length"
        )
    labels = tuple(spec.get("labels") or ()) if kind == "classify" else ()
    if weight.shape != (len(labels), dim) or bias.shape != (len(labels),):
        raise BundleError(f"{where}: task {name!r} head {weight.shape} does not fit {len(labels)} labels × hidden size {dim}")
    return TaskEntry(name, labels, spec["template"], int(spec["max_length"]), compose(shared, u, v),
                     weight.astype(np.float32), bias.astype(np.float32), kind,
                     label_tokens=_label_tokens(sequences, labels, name, where))


def _label_tokens(sequences: object, labels: tuple[str, ...], name: str, where: str) -> tuple:
    """Whole-sequence verbalizers (`verbalizer_ids`): one non-empty token-id tuple per label; () when not used."""
    if sequences is None:
        return ()
    if not (isinstance(sequences, list) and len(sequences) == len(labels)
            and all(isinstance(t, list) and t and all(isinstance(i, int) for i in t) for t in sequences)):
        raise BundleError(f"{where}: task {name!r} needs one non-empty token-id list per label in verbalizer_ids")
    return tuple(tuple(t) for t in sequences)


def read_task_file(path: Path, manifest: Manifest, groups: dict[str, np.ndarray], name: str | None = None) -> TaskEntry:
    """A single-task factors file: safetensors with u, v, head.weight, head.bias and either its own `shared`
    or metadata naming a bundle group; the task spec is JSON in the file's metadata under "task"."""
    path = Path(path)
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


class TaskTable:
    """An engine's tasks by name. The mapping is replaced, never mutated, under a lock: a call that took
    `snapshot()` sees one consistent set of tasks while other threads add or remove."""

    def __init__(self, entries: Iterable[TaskEntry]):
        self._tasks: Mapping[str, TaskEntry] = {entry.name: entry for entry in entries}
        self._lock = threading.Lock()

    def snapshot(self) -> Mapping[str, TaskEntry]:
        return self._tasks

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def get(self, name: str) -> TaskEntry:
        tasks = self._tasks
        if not isinstance(name, str) or name not in tasks:
            raise UnknownTaskError(name, tasks)
        return tasks[name]

    def add(self, entry: TaskEntry) -> None:
        """Serve `entry` (replacing a task of the same name)."""
        with self._lock:
            self._tasks = {**self._tasks, entry.name: entry}

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(name, self._tasks)
            self._tasks = {k: v for k, v in self._tasks.items() if k != name}
