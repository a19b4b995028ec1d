"""Read and verify a bundle folder: manifest first (version before anything else), then hashes, then tasks.

    manifest = read_manifest(folder)              # Manifest; BundleError names what is wrong and the fix
    entries, groups = read_tasks(folder, manifest)
    manifest = parse_manifest(folder)             # no hashes yet: for `load`, which hashes beside the session
                                                  # (mpt_edge_runtime.verification)

Only JSON, safetensors and ONNX are read; nothing is unpickled, and every file name must stay inside the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.errors import BundleError
from mpt_edge_runtime.manifest import Manifest
from mpt_edge_runtime.task_table import TaskEntry, task_entry
from mpt_edge_runtime.verification import StampStore, Verification, file_sha256

__all__ = ["read_manifest", "parse_manifest", "read_tasks", "task_tensors", "file_sha256", "TASK_PARTS"]

TASK_PARTS = ("u", "v", "head.weight", "head.bias", "head.ids")


def read_manifest(folder: Path, *, stamps: StampStore | bool = False) -> Manifest:
    """The manifest, after checking format version, required files and every file's sha256 (`stamps=True`: a
    file whose identity an authenticated stamp vouches for is not hashed again)."""
    manifest = parse_manifest(folder)
    check = Verification(folder, manifest.files, stamps)
    check.verify(manifest.files)
    check.finish()
    return manifest


def parse_manifest(folder: Path) -> Manifest:
    """The manifest, after checking format version and keys, but no file's sha256: the caller verifies them
    (mpt_edge_runtime.verification.Verification) before using any file."""
    folder = Path(folder)
    path = folder / fmt.MANIFEST
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} is not a folder; pass the folder written by `mpt-edge export`")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {folder} is not an mpt-edge bundle; re-export it with `mpt-edge export`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON ({err}); re-export the bundle") from None
    return Manifest.from_json(data, where=str(path))


def read_tasks(folder: Path, manifest: Manifest) -> tuple[list[TaskEntry], dict[str, np.ndarray]]:
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


def task_tensors(tensors: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """What a bundle stores for task `name` alone: part → array (u, v, and a head or its verbalizer ids)."""
    return {part: tensors[fmt.task_key(name, part)] for part in TASK_PARTS if fmt.task_key(name, part) in tensors}
