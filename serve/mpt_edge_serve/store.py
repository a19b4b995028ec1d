"""The task store: hot-added and removed tasks of each bundle, in one folder every worker replica reads.

    <root>/<bundle>/state.json                    {"version", "added": {task: {"file", "sha256"}}, "removed": [...]}
    <root>/<bundle>/<task>-<sha256[:16]>.safetensors   task files, never changed once written

A task file is written under a temporary name, verified, then renamed to its content-addressed name; only
then is state.json replaced (write a temporary file, fsync, rename), under an exclusive lock on
<root>/<bundle>/.lock. A reader therefore sees the old state or the new one, and every file a state names
exists. Replaced files are deleted once they are a minute old (a replica may still be reading one).
On a cluster the root must be a folder every node mounts (NFS or similar), like the bundles.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mpt_edge.errors import StoreError  # noqa: F401  (defined with the other project errors)

STATE = "state.json"
LOCK = ".lock"
KEEP_REPLACED_S = 60.0


@dataclass(frozen=True)
class StoreState:
    """One version of a bundle's changes: tasks added (name → file, sha256) and bundle tasks removed."""

    version: int = 0
    added: dict[str, dict] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()

    def apply(self, base: Iterable[str]) -> set[str]:
        """The task names served: the bundle's own, minus removed ones, plus added ones."""
        return (set(base) - self.removed) | set(self.added)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "added": self.added, "removed": sorted(self.removed)},
                          indent=1, sort_keys=True) + "\n"


def task_spec(path: Path) -> dict:
    """The task spec (name, kind, labels, ...) a task file carries in its safetensors metadata."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length < 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        header = json.loads(handle.read(length))
    return json.loads(header["__metadata__"]["task"])


class TaskStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, bundle: str) -> Path:
        return self.root / bundle

    def file(self, bundle: str, name: str) -> Path:
        return self.folder(bundle) / name

    def state(self, bundle: str) -> StoreState:
        """The current state of `bundle` (empty when nothing was ever added or removed)."""
        path = self.folder(bundle) / STATE
        try:
            data = json.loads(path.read_text())
            return StoreState(int(data["version"]), dict(data["added"]), frozenset(data["removed"]))
        except FileNotFoundError:
            return StoreState()
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"cannot read task store state {path} ({type(err).__name__}: {err}); it is written "
                             "only by the admin API: restore it from a backup or delete it to start empty") from None

    def add(self, bundle: str, name: str, data: bytes, verify: Callable[[Path], None]) -> StoreState:
        """Store `data` as task `name` of `bundle` after `verify(path)` accepted it (it raises to refuse)."""
        folder = self._ready(bundle)
        digest = hashlib.sha256(data).hexdigest()
        final = folder / f"{name}-{digest[:16]}.safetensors"
        tmp = folder / f".upload-{os.getpid()}-{time.monotonic_ns()}.tmp"
        try:
            _write(tmp, data)
            verify(tmp)
            os.replace(tmp, final)
        except OSError as err:
            raise self._error(final, err) from None
        finally:
            tmp.unlink(missing_ok=True)
        with self._locked(bundle):
            old = self.state(bundle)
            state = StoreState(old.version + 1, {**old.added, name: {"file": final.name, "sha256": digest}},
                               old.removed - {name})
            self._write_state(bundle, state)
        return state

    def remove(self, bundle: str, name: str, base: Iterable[str]) -> StoreState | None:
        """Stop serving task `name` of `bundle` (added or the bundle's own); None when it is not served."""
        base = set(base)
        with self._locked(bundle):
            old = self.state(bundle)
            if name not in old.apply(base):
                return None
            state = StoreState(old.version + 1, {k: v for k, v in old.added.items() if k != name},
                               old.removed | ({name} & base))
            self._write_state(bundle, state)
        return state

    def _write_state(self, bundle: str, state: StoreState) -> None:
        folder = self.folder(bundle)
        path, tmp = folder / STATE, folder / f".{STATE}.{os.getpid()}.tmp"
        try:
            _write(tmp, state.to_json().encode())
            os.replace(tmp, path)
            _fsync_folder(folder)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._error(path, err) from None
        self._collect(folder, {entry["file"] for entry in state.added.values()})

    def _collect(self, folder: Path, keep: set[str]) -> None:
        """Delete task files no state names any more, once they are old enough that no replica still reads them."""
        now = time.time()
        for path in folder.glob("*.safetensors"):
            try:
                if path.name not in keep and now - path.stat().st_mtime > KEEP_REPLACED_S:
                    path.unlink()
            except OSError:
                pass

    def _ready(self, bundle: str) -> Path:
        folder = self.folder(bundle)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._error(folder, err) from None
        return folder

    @contextmanager
    def _locked(self, bundle: str):
        path = self._ready(bundle) / LOCK
        try:
            handle = open(path, "a")
        except OSError as err:
            raise self._error(path, err) from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _error(path: Path, err: OSError) -> StoreError:
        return StoreError(f"cannot write the task store at {path}: {err.strerror or err}; give `mpt-edge serve "
                          "--task-store` a folder every worker replica can write and read")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
