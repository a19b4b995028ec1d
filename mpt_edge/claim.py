"""Claim a piece of work across processes with an advisory file lock, so several processes can share one build.

`flock` locks are released by the kernel when their process exits, killed or not, so a claim never goes
stale. The lock file stays (it holds the last owner's pid, for people reading the folder).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def claimed(lock: Path, wait: bool = False) -> Iterator[bool]:
    """Yields True while this process holds `lock` (released on exit), False when another process holds it
    (with wait=True: blocks until it can hold it, then yields True)."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock
