"""Source prompts shipped with the kit, loaded by backbone name like weights from a hub.

A shipped source is a folder `mpt_edge/sources/<name>/`:

    source.safetensors   prompt.shared (1, l, d), prompt.u (S, l, r), prompt.v (S, r, d), prompt.task_groups (S,)
                         and, for encoder backbones, heads.<k>.weight / heads.<k>.bias of the S source tasks
    source.json          format, version, sha256 of the tensors, the run metadata (backbone, source task specs,
                         prompt shape) and the provenance record (recipe, data manifests, steps, wall time,
                         dev accuracy per source task, machine)
    recipe.toml          the recipe that reproduces it: `mpt-edge train source --recipe <name>`

`resolve_source("smollm2-135m")` returns it as a `Trained`, the same object a `train source` checkpoint gives,
so `train target --source` accepts a shipped name, a shipped-format folder or a checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from mpt_edge.atomic import write_bytes_atomic, write_text_atomic
from mpt_edge.checkpoint import CheckpointError, has_checkpoint, make_folder
from mpt_edge.heads import TaskHeads
from mpt_edge.prompt import MultitaskPrompt
from mpt_edge.run_meta import RunMeta
from mpt_edge.trained import Trained, load_trained

SHIPPED_DIR = Path(__file__).parent / "sources"
FORMAT = "mpt-edge-source"
VERSION = 1
INDEX, TENSORS, RECIPE = "source.json", "source.safetensors", "recipe.toml"
META_KEYS = ("backbone", "tasks", "prompt", "heads", "pooling")


def shipped_names() -> list[str]:
    """Names of the shipped sources that hold a trained prompt (a recipe alone is not a source yet)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / INDEX).is_file())


def shipped_recipe(name: str) -> Path | None:
    """The recipe file shipped under `name`, or None."""
    path = SHIPPED_DIR / name / RECIPE
    return path if path.is_file() else None


def save_source(folder: Path, trained: Trained, provenance: dict) -> Path:
    """Write a source run (its prompt, factors and heads; no optimizer state) in the shipped format."""
    folder = make_folder(folder)
    tensors = dict(trained.prompt.tensors())
    if trained.heads is not None:
        tensors.update(trained.heads.tensors())
    data = save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_bytes_atomic(folder / TENSORS, data)
    index = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(data).hexdigest(),
             "meta": {k: trained.meta.to_json().get(k) for k in META_KEYS}, "provenance": provenance}
    write_text_atomic(folder / INDEX, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return folder / INDEX


def load_source(folder: Path) -> Trained:
    """Read and verify a shipped-format folder → `Trained` (meta also holds the provenance)."""
    folder = Path(folder)
    index_path = folder / INDEX
    try:
        index = json.loads(index_path.read_text())
    except OSError as err:
        raise CheckpointError(f"cannot read {index_path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{index_path}: not valid JSON ({err.msg})") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path}: format {index.get('format')!r} is not {FORMAT!r}")
    if index.get("version") != VERSION:
        raise CheckpointError(f"{index_path}: source version {index.get('version')!r} is not supported (this mpt-edge "
                              f"reads {VERSION}); upgrade mpt-edge, or rebuild it with `mpt-edge train source --recipe`")
    try:
        data = (folder / TENSORS).read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {folder / TENSORS}: {err.strerror}; the source folder is incomplete") from None
    if hashlib.sha256(data).hexdigest() != index.get("sha256"):
        raise CheckpointError(f"{folder / TENSORS}: sha256 does not match {INDEX}; the file is damaged, restore it")
    meta = RunMeta.from_json({**(index.get("meta") or {}), "provenance": index.get("provenance", {})}, index_path)
    tensors, specs = load_tensors(data), list(meta.tasks)
    prompt = MultitaskPrompt.from_tensors(tensors).requires_grad_(False)
    heads = TaskHeads.from_tensors(tensors, len(specs)).requires_grad_(False) if meta.heads else None
    return Trained(meta, specs, prompt, heads)


def resolve_source(source: str | Path) -> Trained:
    """A source prompt by shipped name ("smollm2-135m"), shipped-format folder, or `train source` checkpoint."""
    path = Path(source)
    if path.is_dir():
        if (path / INDEX).is_file():
            return load_source(path)
        if has_checkpoint(path):
            return load_trained(path)
        raise CheckpointError(f"{path} holds neither a source ({INDEX}) nor a checkpoint; pass the --out folder of "
                              f"`mpt-edge train source` or a shipped name ({', '.join(shipped_names()) or 'none yet'})")
    if str(source) in shipped_names():
        return load_source(SHIPPED_DIR / str(source))
    pending = f"; {source!r} has a recipe but no trained prompt yet: build it with `mpt-edge train source --recipe {source}`" \
        if shipped_recipe(str(source)) else ""
    raise CheckpointError(f"no source {str(source)!r}: not a folder and not a shipped source (shipped: "
                          f"{', '.join(shipped_names()) or 'none yet'}){pending}")


def combine_teachers(runs: list[Trained]) -> Trained:
    """One `Trained` holding single-task teacher runs side by side (task k = runs[k]), as `train teachers` would."""
    first = runs[0].meta.to_json()
    prompts = torch.cat([r.prompt.fold() for r in runs])                       # (T, l, d)
    ones = torch.ones(len(runs), prompts.shape[1], 1), torch.ones(len(runs), 1, prompts.shape[2])
    prompt = MultitaskPrompt(prompts, *ones, range(len(runs))).requires_grad_(False)
    heads = None
    if runs[0].heads is not None:
        heads = TaskHeads([w for r in runs for w in r.heads.weight], [b for r in runs for b in r.heads.bias])
        heads.requires_grad_(False)
    meta = {**first, "tasks": [t.to_json() for r in runs for t in r.meta.tasks],
            "prompt": {**first["prompt"], "groups": len(runs), "task_groups": list(range(len(runs)))}}
    return Trained(meta, [s for r in runs for s in r.specs], prompt, heads)
