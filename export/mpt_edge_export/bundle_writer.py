"""Write bundle format v2 (see `mpt_edge_runtime.format`): graph, tokenizer, factors, tasks, manifest.

Everything is written into a temporary sibling folder and renamed into place at the end, so a failed export
leaves no half bundle, and an existing bundle is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save as save_tensors

from mpt_edge.errors import ExportError, ParityError  # noqa: F401  (defined with the other project errors)
from mpt_edge_export import transform
from mpt_edge_export.calibration import calibration_feeds
from mpt_edge_export.families import FAMILIES, family_named
from mpt_edge_export.graph import DEFAULT_OPSET, PromptedFeatures, export_graph, traced_attention
from mpt_edge_export.parity import check_parity, parity_report
from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.bundle import file_sha256
from mpt_edge_runtime.manifest import Manifest
from mpt_edge_runtime.task_table import compose


@dataclass(frozen=True)
class ExportTask:
    """One task for the bundle: spec (name, kind, labels, template, verbalizers, group, max_length), factors
    u (l, r), v (r, d) and head weight (C, d), bias (C,). head_ids (C,): set when the head is the backbone's
    output-embedding rows of these verbalizer tokens (causal), which the bundle then stores once for all tasks."""

    spec: dict
    u: np.ndarray
    v: np.ndarray
    head_weight: np.ndarray
    head_bias: np.ndarray
    head_ids: np.ndarray | None = None


FACTOR_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class ExportOptions:
    fuse: bool = True             # onnxruntime's fused transformer ops, parity checked (else the traced graph):
                                  # fp32 features graph of a family with `features_fusion` (Attention,
                                  # SkipLayerNormalization, BiasGelu); fp32 or quantized causal generation graph of
                                  # a Llama-like backbone (GroupQueryAttention, MatMulNBits with --quantize int4)
    optimize: bool = False        # onnxruntime extended graph optimizations, saved offline
    quantize: str | None = None   # a recipe of transform.QUANT_RECIPES (int8, int4, ...)
    dtype: str = "fp32"           # fp32, or fp16 (for CUDA)
    opset: int = DEFAULT_OPSET
    tolerance: float = 1e-3       # fp32 parity: max |onnx − torch| / max(|torch|, 1)
    max_length: int = 128         # longest parity case (tokens)
    overwrite: bool = False
    kv_cache: bool | None = None  # causal/seq2seq: export the generation graph(s) instead of the features graph;
                                  # None = when a task generates or scores whole verbalizer sequences
    factors_dtype: str = "fp32"   # each task's U, V as stored: fp32, or fp16 (half the bytes a task; every
                                  # runtime composes P* ∘ (U V) in fp32 from either)

    def __post_init__(self):
        if self.quantize is not None and self.quantize not in transform.QUANT_RECIPES:
            raise ExportError(f"--quantize {self.quantize!r} is not one of {', '.join(transform.QUANT_RECIPES)}")
        if self.dtype not in transform.DTYPES:
            raise ExportError(f"--dtype {self.dtype!r} is not one of {', '.join(transform.DTYPES)}")
        if self.quantize and self.dtype != "fp32":
            raise ExportError("--quantize is for CPU and fp16 for CUDA: choose one of --quantize / --dtype fp16")
        if self.factors_dtype not in FACTOR_DTYPES:
            raise ExportError(f"--factors-dtype {self.factors_dtype!r} is not one of {', '.join(FACTOR_DTYPES)}")


@dataclass
class BundleSource:
    """What a bundle is made of: the frozen backbone, its adapter and tokenizer, shared prompts and tasks."""

    family: str                    # the family's name (mpt_edge_export.families)
    backbone: dict                 # name, model_type, hidden_size, layers, heads, kv_heads, vocab_size, max_positions
    model: object                  # torch.nn.Module, frozen
    adapter: object
    tokenizer: object              # tokenizers.Tokenizer
    groups: list[np.ndarray]       # shared prompts P*, each (l, d)
    tasks: list[ExportTask]
    extra: dict = field(default_factory=dict)
    calibration: dict[str, list[list[int]]] = field(default_factory=dict)   # task name → token-id rows that
                                   # calibrated quantization recipes (transform.CALIBRATED) run through the graph


def write_bundle(source: BundleSource, out: Path, options: ExportOptions = ExportOptions(), log=lambda msg: None) -> dict:
    """Export `source` into the folder `out`; returns the manifest."""
    out = Path(out)
    _recover(out)
    if out.exists() and not options.overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    length, dim = source.groups[0].shape
    _check_tasks(source, length, dim)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        manifest = _build(source, tmp, options, length, dim, log)
        _swap_into_place(tmp, out)
    except OSError as err:
        raise ExportError(f"cannot write the bundle {out} ({err.filename or tmp}: {err.strerror or err}); "
                          "free disk space or choose a writable --out. Nothing was replaced") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _recover(out: Path) -> None:
    """Undo what killed exports to `out` left behind: a bundle their swap had moved aside goes back to `out` if
    nothing replaced it (else it is deleted), and their temp folders are deleted."""
    for old in _leftovers(out, "old"):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out)
    for stale in _leftovers(out, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _leftovers(out: Path, kind: str) -> list[Path]:
    """The `.NAME.KIND-PID` folders beside `out` whose export is over (its process is gone, or was this one's pid)."""
    found = []
    for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            found.append(path)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build(source: BundleSource, folder: Path, options: ExportOptions, length: int, dim: int, log) -> dict:
    import onnx
    import onnxruntime
    import torch

    graph, parity = _build_graph(source, folder, options, length, dim, log)
    source.tokenizer.save(str(folder / fmt.TOKENIZER))
    (folder / fmt.PROMPTS).write_bytes(save_tensors(prompt_tensors(source, options.factors_dtype)))
    (folder / fmt.TASKS).write_text(json.dumps({"tasks": [t.spec for t in source.tasks]}, indent=2) + "\n")
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = Manifest.from_json({   # checked as the runtime will read it
        "format_version": fmt.FORMAT_VERSION,
        "family": source.family,
        "backbone": source.backbone,
        "graph": graph,
        "prompt": {"length": length, "hidden_size": dim, "groups": len(source.groups)},
        "tasks": [t.spec["name"] for t in source.tasks],
        "files": files,
        "parity": parity,
        "options": asdict(options),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     **source.extra.get("versions", {})},
        **{k: v for k, v in source.extra.items() if k != "versions"},
    }, where=str(folder / fmt.MANIFEST)).to_json()
    (folder / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def prompt_tensors(source: BundleSource, factors_dtype: str = "fp32") -> dict[str, np.ndarray]:
    """prompts.safetensors: shared prompts, each task's u, v (in `factors_dtype`) and its learned head or its
    verbalizer token ids, and the verbalizer table (each token's row once)."""
    tensors = {fmt.shared_key(g): np.ascontiguousarray(p, dtype=np.float32) for g, p in enumerate(source.groups)}
    table: dict[int, tuple[np.ndarray, float]] = {}
    for task in source.tasks:
        name = task.spec["name"]
        for part, factor in (("u", task.u), ("v", task.v)):
            tensors[fmt.task_key(name, part)] = _stored_factor(factor, factors_dtype, name)
        if task.head_ids is None:
            tensors[fmt.task_key(name, "head.weight")] = np.ascontiguousarray(task.head_weight, dtype=np.float32)
            tensors[fmt.task_key(name, "head.bias")] = np.ascontiguousarray(task.head_bias, dtype=np.float32)
            continue
        tensors[fmt.task_key(name, "head.ids")] = np.asarray(task.head_ids, dtype=np.int64)
        for token, row, bias in zip(task.head_ids, task.head_weight, task.head_bias):
            table.setdefault(int(token), (row, float(bias)))
    if table:
        ids = sorted(table)
        tensors[fmt.VERBALIZER_IDS] = np.asarray(ids, dtype=np.int64)
        tensors[fmt.VERBALIZER_WEIGHT] = np.stack([table[i][0] for i in ids]).astype(np.float32)
        tensors[fmt.VERBALIZER_BIAS] = np.asarray([table[i][1] for i in ids], dtype=np.float32)
    return tensors


def _stored_factor(factor: np.ndarray, dtype: str, task: str) -> np.ndarray:
    """A task's U or V as the bundle stores it; refuses values the dtype cannot hold rather than storing inf."""
    largest = float(np.abs(factor).max(initial=0.0))
    if largest > float(np.finfo(FACTOR_DTYPES[dtype]).max):
        raise ExportError(f"task {task!r} has factor values beyond {dtype}'s range (largest |value| {largest:.3g}); "
                          "export with --factors-dtype fp32")
    return np.ascontiguousarray(factor, dtype=FACTOR_DTYPES[dtype])


def _build_graph(source: BundleSource, folder: Path, options: ExportOptions, length: int, dim: int,
                 log) -> tuple[dict, dict]:
    """Export the bundle's graph (features; for causal bundles that need it the KV-cache generation graph; for
    seq2seq ones the encoder + decoder-step pair), apply the transforms to every file, check parity after each;
    → (manifest "graph" entry, parity reports)."""
    family = family_named(source.family)
    fusion = None
    if wants_decoder(source, options):
        log(f"exporting the {family.name} generation graph(s) with KV cache (opset {options.opset})")
        graphs, fp32_parity = _generation_graphs(source, folder, options, length, log)
        paths, entry = graphs.paths, graphs.entry
        report = lambda dtype=np.float32: graphs.report(dtype)  # noqa: E731
    else:
        path = folder / fmt.GRAPH
        paths = [path]
        wrapper = PromptedFeatures(source.model, source.adapter)
        vocab = source.backbone["vocab_size"]
        fusion = features_fusion(source, options)
        log(f"exporting the {family.name} graph (opset {options.opset})")
        with traced_attention(source.model, fusion.attn_implementation if fusion else None):
            export_graph(wrapper, path, length, dim, vocab, options.opset)
        report = lambda dtype=np.float32: parity_report(wrapper, path, length, dim, vocab, options.max_length, dtype)  # noqa: E731
        fp32_parity = check_parity(report(), options.tolerance)
        entry = {"kind": fmt.FEATURES_KIND, "file": path.name,
                 "inputs": {k: list(v.values()) for k, v in fmt.GRAPH_INPUTS.items()}, "outputs": list(fmt.GRAPH_OUTPUTS)}
    parity = {"fp32": fp32_parity}
    transforms = {}
    if fusion is not None:
        log(f"fusing transformer ops ({fusion.ort_model_type}, traced with {fusion.attn_implementation} attention)")
        transforms["fuse"], fused_parity = _fuse(path, fusion, source.backbone.get("num_heads") or 0, dim, report,
                                                 options.tolerance, log)
        if fused_parity is not None:
            parity["fused"] = fused_parity
    if options.optimize:
        log("optimizing with onnxruntime")
        for path in paths:
            _replace(path, lambda dst: transform.optimize(path, dst))
        parity["optimized"] = check_parity(report(), options.tolerance)
        transforms["optimize"] = "ORT_ENABLE_EXTENDED"
    if options.quantize:
        log(f"quantizing ({options.quantize})")
        for path in paths:
            feeds = _calibration(source, path, entry["kind"]) if options.quantize in transform.CALIBRATED else ()
            transforms["quantize"] = _replace(path, lambda dst: transform.quantize(path, dst, options.quantize, feeds))
        parity["quantized"] = report()  # reported, not enforced: quantization is approximate by design
    if options.dtype == "fp16":
        log("converting to fp16")
        for path in paths:
            _replace(path, lambda dst: transform.to_fp16(path, dst))
        parity["fp16"] = report(np.float16)  # reported: fp16 rounding is expected
    return {**entry, "opset": options.opset, "dtype": options.dtype, **transforms}, parity


def _calibration(source: BundleSource, graph: Path, kind: str) -> list[dict[str, np.ndarray]]:
    """Feeds of the source's calibration rows, each task's rows after its composed prompt."""
    tasks = [(compose(source.groups[t.spec["group"]], t.u, t.v), source.calibration.get(t.spec["name"], []))
             for t in source.tasks]
    return calibration_feeds(graph, kind, tasks)


def _generation_graphs(source: BundleSource, folder: Path, options: ExportOptions, length: int, log):
    """The family's generation graph(s) and their fp32 parity: fused when asked for (`options.fuse`, not fp16) and
    the family has a fused form for this model; a fused graph that misses parity is replaced by the traced one."""
    family = family_named(source.family)
    fuse = options.fuse and options.dtype == "fp32"
    graphs = family.export_generation(source.model, folder, options.opset, length, options.max_length, fuse=fuse,
                                      share_head=not options.quantize)
    try:
        return graphs, check_parity(graphs.report(np.float32), options.tolerance)
    except ParityError as err:
        if graphs.entry["kind"] != fmt.FUSED_DECODER_KIND:
            raise
        log(f"  the fused generation graph misses parity, exporting the traced graph: {err}")
    graphs = family.export_generation(source.model, folder, options.opset, length, options.max_length, fuse=False)
    return graphs, check_parity(graphs.report(np.float32), options.tolerance)


def features_fusion(source: BundleSource, options: ExportOptions):
    """The family's `FeaturesFusion` when this export gets it (asked for, and an fp32 graph that is not quantized:
    quantized graphs and fp16 start from the plain traced graph), else None."""
    if not options.fuse or options.quantize or options.dtype != "fp32":
        return None
    return family_named(source.family).features_fusion


def _fuse(path: Path, fusion, num_heads: int, hidden: int, report, tolerance: float, log) -> tuple[dict, dict | None]:
    """Replace the features graph at `path` by its fused rewrite when that keeps fp32 parity; otherwise keep the
    traced graph (parity already checked) and say why. → (manifest "fuse" entry, parity of the fused graph or None)."""
    staged = path.with_name(f"fused-{path.name}")
    original = path.with_name(f"traced-{path.name}")
    try:
        info = transform.fuse(path, staged, fusion.ort_model_type, num_heads, hidden)
    except Exception as err:  # noqa: BLE001 (onnxruntime's optimizer is best effort: any failure keeps the traced graph)
        staged.unlink(missing_ok=True)
        log(f"  fusion failed, keeping the traced graph: {type(err).__name__}: {err}")
        return {"applied": False, "reason": f"{type(err).__name__}: {err}"[:500]}, None
    entry = {"applied": True, "attention": fusion.attn_implementation, **info}
    os.replace(path, original)
    os.replace(staged, path)
    try:
        parity = check_parity(report(), tolerance)
    except ParityError as err:
        os.replace(original, path)
        log(f"  the fused graph misses parity, keeping the traced graph: {err}")
        return {**entry, "applied": False, "reason": str(err)[:500]}, None
    original.unlink()
    log(f"  fused: {', '.join(f'{op} × {n}' for op, n in info['fused_ops'].items()) or 'nothing matched'} "
        f"({info['nodes_before']} → {info['nodes_after']} nodes)")
    return entry, parity


def wants_decoder(source: BundleSource, options: ExportOptions) -> bool:
    """Whether the bundle holds the KV-cache generation graph(s): asked for, or (by default) when a causal or
    seq2seq task generates or scores whole verbalizer sequences. They serve classification too (features output)."""
    generates = family_named(source.family).generates
    if options.kv_cache and not generates:
        generating = " or ".join(f.name for f in FAMILIES.values() if f.generates)
        raise ExportError(f"--kv-cache needs a {generating} backbone; this one is {source.family}")
    needs = [t.spec["name"] for t in source.tasks
             if t.spec.get("kind") == "generate" or t.spec.get("verbalizer_tokens") == "all"]
    if options.kv_cache is False and needs:
        raise ExportError(f"task(s) {needs} generate or score whole verbalizer sequences and need the generation "
                          "graph; drop --no-kv-cache")
    if options.kv_cache is not None:
        return options.kv_cache
    return generates and bool(needs)


def _check_tasks(source: BundleSource, length: int, dim: int) -> None:
    names = [t.spec["name"] for t in source.tasks]
    if not names or len(set(names)) != len(names):
        raise ExportError(f"a bundle needs at least one task and unique task names, got {names}")
    for g, shared in enumerate(source.groups):
        if shared.shape != (length, dim):
            raise ExportError(f"shared prompt {g} has shape {shared.shape}, expected ({length}, {dim})")
    for task in source.tasks:
        if not 0 <= task.spec["group"] < len(source.groups):
            raise ExportError(f"task {task.spec['name']!r} names group {task.spec['group']}, bundle has {len(source.groups)}")


def _replace(graph: Path, write) -> dict | None:
    staged = graph.with_name(f"staged-{graph.name}")
    result = write(staged)
    os.replace(staged, graph)
    return result


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and deleted after (a kill in between leaves
    it as `.NAME.old-PID`, which the next export puts back or deletes: see `_recover`)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_task_file(path: Path, task: ExportTask, shared: np.ndarray | None = None) -> None:
    """A single-task factors file for `Engine.add_task`: u, v, head (and its own P* in `full` mode)."""
    tensors = {"u": task.u, "v": task.v, "head.weight": task.head_weight, "head.bias": task.head_bias}
    if shared is not None:
        tensors["shared"] = shared
    data = save_tensors({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                        metadata={"task": json.dumps(task.spec)})
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
