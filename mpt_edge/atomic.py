"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A failed write (disk full, read-only folder) removes its temp file, leaves the previous file untouched and
raises `OutputError`, which names the path and the fix. `check_writable` proves an output folder takes a
file before any work whose results go there.
"""

from __future__ import annotations

import errno
import itertools
import os
import tempfile
from pathlib import Path

from mpt_edge.errors import OutputError  # noqa: F401  (defined with the other project errors)

FIXES = {
    errno.ENOSPC: "the disk is full: free space or choose another output folder",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another output folder",
    errno.EROFS: "the filesystem is read-only: choose a writable output folder",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.ENOTDIR: "a file is in the way of the folder: choose another output folder",
    errno.EEXIST: "a file is in the way of the folder: choose another output folder",
}


def output_error(path: Path, err: OSError) -> OutputError:
    fix = FIXES.get(err.errno, "check the output folder")
    return OutputError(f"cannot write {path}: {err.strerror or err}; {fix}. Anything saved before is unchanged")


def check_writable(folder: Path, keep: bool = True) -> Path:
    """Prove `folder` takes a file: create it if missing, then create, write, fsync and remove a probe file; or
    raise the OutputError that says why not. Call it before any work whose results go there. With
    `keep=False` the folders it had to create are removed again, so a command that fails later leaves nothing."""
    folder = Path(folder)
    missing = list(itertools.takewhile(lambda path: not path.exists(), [folder, *folder.parents]))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".mpt-edge-probe-", dir=folder)
        try:
            os.write(handle, b"probe")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as err:
        raise output_error(folder, err) from None
    finally:
        for path in missing if not keep else ():   # deepest first
            try:
                path.rmdir()
            except OSError:
                pass
    return folder


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
