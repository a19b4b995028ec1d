"""Checkpoints: tensors in safetensors, everything else in JSON, written so a crash never loses the last one.

A checkpoint folder holds `state-<step>.safetensors` (prompt, factors, heads, optimizer state) and
`checkpoint.json` (format, version, step, the tensor file's name and sha256, and the run's metadata).
The tensor file is written first under a new name, then the JSON is atomically replaced to point at it,
then older tensor files are removed: at every moment the JSON names a complete, verified file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from mpt_edge.atomic import check_writable, write_bytes_atomic, write_text_atomic
from mpt_edge.errors import CheckpointError  # noqa: F401  (defined with the other project errors)

FORMAT = "mpt-edge-checkpoint"
VERSION = 1
INDEX = "checkpoint.json"


def make_folder(folder: Path) -> Path:
    """Create the checkpoint folder and probe that it takes a file (early, before any training), or an
    OutputError that says why not."""
    return check_writable(folder)


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def save_checkpoint(folder: Path, meta: dict, tensors: dict[str, torch.Tensor], step: int) -> Path:
    """Write tensors and `meta` (JSON-able) as the checkpoint of `step`; returns the index path."""
    folder = Path(folder)
    name = f"state-{step:08d}.safetensors"
    data = save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_bytes_atomic(folder / name, data)
    index = {"format": FORMAT, "version": VERSION, "step": step, "tensors_file": name,
             "sha256": hashlib.sha256(data).hexdigest(), **meta}
    write_text_atomic(folder / INDEX, json.dumps(index, indent=2) + "\n")
    for stale in folder.glob("state-*.safetensors"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return folder / INDEX


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a checkpoint folder → (index metadata, tensors)."""
    folder = Path(folder)
    index_path = folder / INDEX
    if not index_path.is_file():
        raise CheckpointError(f"no checkpoint in {folder}: {INDEX} is missing; point at a folder written by `mpt-edge train`")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{index_path}: not valid JSON ({err.msg})") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path}: format {index.get('format')!r} is not {FORMAT!r}")
    if index.get("version") != VERSION:
        raise CheckpointError(
            f"{index_path}: checkpoint version {index.get('version')!r} is not supported (this mpt-edge reads {VERSION}); "
            "upgrade mpt-edge or retrain"
        )
    tensor_path = folder / index["tensors_file"]
    if not tensor_path.is_file() or Path(index["tensors_file"]).name != index["tensors_file"]:
        raise CheckpointError(f"{index_path}: its tensor file {index['tensors_file']!r} is missing from {folder}")
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise CheckpointError(f"{tensor_path}: sha256 does not match {INDEX}; the file is damaged, retrain or restore it")
    return index, load_tensors(data)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors (`optim.<param>.<name>`) and JSON (the rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Inverse of `optimizer_state`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
