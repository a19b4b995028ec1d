"""Read and verify a bundle folder: manifest first (version before anything else), then hashes, then tasks.

Only JSON, safetensors and ONNX are read; nothing is unpickled, and every file name must stay inside the folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.errors import BundleError


@dataclass(frozen=True)
class TaskEntry:
    """A servable task: its kind, text template, labels, and the composed prompt and head.

    prompt (l, d) float32; head_weight (C, d) and head_bias (C,): logits = features @ head_weightᵀ + head_bias
    (generate tasks have C = 0). prefix: what every request of the task starts from when the bundle has
    generation graphs: the prompt's KV cache (causal), or the prompt itself (seq2seq: the encoder is bidirectional).
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


def read_manifest(folder: Path) -> dict:
    """The manifest, after checking format version, required files and every file's sha256."""
    folder = Path(folder)
    path = folder / fmt.MANIFEST
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} is not a folder; pass the folder written by `mpt-edge export`")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {folder} is not an mpt-edge bundle; re-export it with `mpt-edge export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON ({err}); re-export the bundle") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in fmt.READABLE_VERSIONS:
        raise BundleError(
            f"{path}: format_version {version!r} is not supported (this runtime reads "
            f"{', '.join(map(str, fmt.READABLE_VERSIONS))}); "
            "upgrade mpt-edge or re-export the bundle with this version"
        )
    files = manifest.get("files", {})
    graph = manifest.get("graph") if isinstance(manifest.get("graph"), dict) else {}
    known = {fmt.FEATURES_KIND: fmt.GRAPH, fmt.DECODER_KIND: fmt.DECODER_GRAPH, fmt.SEQ2SEQ_KIND: fmt.ENCODER_GRAPH}
    kind = graph.get("kind", fmt.FEATURES_KIND)
    if known.get(kind) != graph.get("file") or (kind == fmt.SEQ2SEQ_KIND and graph.get("decoder_file") != fmt.DECODER_GRAPH):
        raise BundleError(f"{path}: graph {graph.get('file')!r} of kind {kind!r} is not one this runtime serves "
                          f"({', '.join(f'{k}: {v}' for k, v in known.items())}, seq2seq with {fmt.DECODER_GRAPH}); "
                          "re-export the bundle")
    graphs = [graph["file"]] + ([graph["decoder_file"]] if kind == fmt.SEQ2SEQ_KIND else [])
    for required in (*graphs, fmt.TOKENIZER, fmt.PROMPTS, fmt.TASKS):
        if required not in files:
            raise BundleError(f"{path} lists no {required}; the bundle is incomplete, re-export it")
    for name, digest in files.items():
        _verify(folder, name, digest)
    return manifest


def graph_kind(manifest: dict) -> str:
    """"features", "decoder" or "seq2seq" (bundles written before generation existed hold the features graph)."""
    return manifest["graph"].get("kind", fmt.FEATURES_KIND)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _verify(folder: Path, name: str, digest: str) -> None:
    if Path(name).name != name or name in ("", ".", ".."):
        raise BundleError(f"{folder / fmt.MANIFEST} names file {name!r} outside the bundle folder; refusing to load it")
    target = folder / name
    if target.is_symlink():
        raise BundleError(f"{target} is a symbolic link; a bundle holds plain files only (refusing to follow it)")
    if not target.is_file():
        raise BundleError(f"{target} is missing from the bundle; copy the whole bundle folder or re-export it")
    if file_sha256(target) != digest:
        raise BundleError(f"{target} does not match its sha256 in {fmt.MANIFEST}: the file was changed or damaged; "
                          "restore it or re-export the bundle")


def read_tasks(folder: Path, manifest: dict) -> tuple[list[TaskEntry], dict[str, np.ndarray]]:
    """Every task of the bundle with its prompt composed once (numpy), checked against the graph's shapes,
    and the shared prompts by group name (what a hot-loaded task may build on)."""
    folder = Path(folder)
    try:
        specs = json.loads((folder / fmt.TASKS).read_text())["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BundleError(f"{folder / fmt.TASKS} is not a valid task list ({err}); re-export the bundle") from None
    tensors = load_tensors((folder / fmt.PROMPTS).read_bytes())
    groups = {key.split(".")[1]: value for key, value in tensors.items() if key.startswith("groups.")}
    return [task_entry(spec, tensors, manifest, str(folder / fmt.PROMPTS)) for spec in specs], groups


TASK_PARTS = ("u", "v", "head.weight", "head.bias", "head.ids")


def task_tensors(tensors: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """What a bundle stores for task `name` alone: part → array (u, v, and a head or its verbalizer ids)."""
    return {part: tensors[fmt.task_key(name, part)] for part in TASK_PARTS if fmt.task_key(name, part) in tensors}


def verbalizer_rows(tensors: dict[str, np.ndarray], ids: np.ndarray, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A causal task's head from the bundle's verbalizer table: token ids (C,) → weight (C, d), bias (C,)."""
    table = tensors[fmt.VERBALIZER_IDS]
    row_of = {int(token): row for row, token in enumerate(table)}
    if ids.ndim != 1 or any(int(token) not in row_of for token in ids):
        raise BundleError(f"{where}: task {name!r} names verbalizer token ids {ids.tolist()} that the bundle's "
                          "verbalizer table lacks; re-export the bundle")
    rows = [row_of[int(token)] for token in ids]
    return tensors[fmt.VERBALIZER_WEIGHT][rows], tensors[fmt.VERBALIZER_BIAS][rows]


def task_entry(spec: dict, tensors: dict[str, np.ndarray], manifest: dict, where: str) -> TaskEntry:
    """Build one TaskEntry from its spec and tensors; shapes must fit the graph (length l, hidden size d)."""
    name = spec.get("name")
    kind = spec.get("kind", "classify")
    if kind not in ("classify", "generate"):
        raise BundleError(f"{where}: task {name!r} has kind {kind!r}; this runtime serves classify and generate")
    sequences = spec.get("verbalizer_ids") if spec.get("verbalizer_tokens") == "all" else None
    if (kind == "generate" or sequences is not None) and graph_kind(manifest) == fmt.FEATURES_KIND:
        raise BundleError(f"{where}: task {name!r} {'generates' if kind == 'generate' else 'scores whole verbalizer sequences'}"
                          ", but the bundle has no generation graph; re-export it with `mpt-edge export --kv-cache`")
    try:
        shared = tensors[fmt.shared_key(spec["group"])]
        u, v = tensors[fmt.task_key(name, "u")], tensors[fmt.task_key(name, "v")]
        if kind == "generate":
            dim = manifest["prompt"]["hidden_size"]
            weight, bias = np.zeros((0, dim), np.float32), np.zeros((0,), np.float32)
        elif fmt.task_key(name, "head.ids") in tensors:
            weight, bias = verbalizer_rows(tensors, tensors[fmt.task_key(name, "head.ids")], name, where)
        else:
            weight, bias = tensors[fmt.task_key(name, "head.weight")], tensors[fmt.task_key(name, "head.bias")]
    except KeyError as err:
        raise BundleError(f"{where}: task {name!r} needs tensor {err.args[0]!r}, which is missing") from None
    length, dim = manifest["prompt"]["length"], manifest["prompt"]["hidden_size"]
    if shared.shape != (length, dim) or u.shape[0] != length or v.shape[1:] != (dim,) or u.shape[1] != v.shape[0]:
        raise BundleError(
            f"{where}: task {name!r} has prompt factors shared {shared.shape}, u {u.shape}, v {v.shape}, which do not "
            f"fit the graph's prompt ({length}, {dim}); export the task for this backbone and prompt length"
        )
    labels = tuple(spec.get("labels") or ()) if kind == "classify" else ()
    if weight.shape != (len(labels), dim) or bias.shape != (len(labels),):
        raise BundleError(f"{where}: task {name!r} head {weight.shape} does not fit {len(labels)} labels × hidden size {dim}")
    label_tokens = ()
    if sequences is not None:
        if not (isinstance(sequences, list) and len(sequences) == len(labels)
                and all(isinstance(t, list) and t and all(isinstance(i, int) for i in t) for t in sequences)):
            raise BundleError(f"{where}: task {name!r} needs one non-empty token-id list per label in verbalizer_ids")
        label_tokens = tuple(tuple(t) for t in sequences)
    return TaskEntry(name, labels, spec["template"], int(spec["max_length"]), compose(shared, u, v),
                     weight.astype(np.float32), bias.astype(np.float32), kind, label_tokens=label_tokens)
