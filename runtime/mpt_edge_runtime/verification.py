"""Checking a bundle's files against the sha256 digests of its manifest, fast enough for a cold start.

    check = Verification(folder, manifest.files)     # names, symlinks and presence checked here (BundleError)
    check.verify(["model.onnx"])                     # hash (any thread); BundleError on the first mismatch
    check.finish()                                   # True when every file matched; then writes the stamp

Every load hashes every file. Opt-in (`load(..., stamps=True)`), a *verified stamp* spares that for files it
vouches for: after a load in which every file matched
its digest, a stamp records, per file, its identity (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) and the
digest it matched. A later load skips hashing a file only if the stamp names the same digest as the manifest
and the file's identity is unchanged; any write to a file changes its ctime (which no user tool can set back),
so a changed file is hashed, and refused. Files changed within RACY_NS of the moment they were hashed are not
stamped (file times are coarse: a second write in the same tick would keep the identity).

Stamps live in a per-user cache folder (MPT_EDGE_RUNTIME_CACHE, else $XDG_CACHE_HOME/mpt-edge-runtime, else
~/.cache/mpt-edge-runtime; created 0700), never in the bundle folder: one per bundle folder (by real path; the
MAX_STAMPS most recently written are kept), with an HMAC-SHA256 under a random per-user key kept beside them
(0600). A stamp edited, copied from elsewhere or written without that key is ignored, and every file is hashed.
Where the cache cannot be written, nothing is stamped and every load hashes every file.

What a stamp trusts: that a file whose device, inode, size, mtime and ctime are unchanged holds the bytes it
held when it was hashed. That holds for every change made through the file system (write, truncate, rename
over, copy, `touch -d`: each sets ctime to now). It does not hold for bytes that change beneath the file
system (a failing disk or flash, a raw write to the block device) nor for whoever can write the cache folder
or read its key (the same user, root): they can forge a stamp, as they could edit the runtime itself. Hashing
every load (the default) also catches silent storage corruption.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat as stat_module
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.errors import BundleError

STAMP_VERSION = 1
RACY_NS = 3_000_000_000     # a file changed this recently (ns) is hashed, never stamped (FAT times are 2 s coarse)
CACHE_ENV = "MPT_EDGE_RUNTIME_CACHE"
KEY_FILE = "stamp.key"
MAX_STAMPS = 256            # stamps kept (one per bundle folder); the least recently written go first


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (hashlib releases the GIL: other threads run meanwhile)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def identity(stat: os.stat_result) -> list[int]:
    """What a stamp trusts to name unchanged content: device, inode, size, modification and change times (ns)."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def cache_folder() -> Path | None:
    """The per-user folder of stamps and their key (None: no home to put it in)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    try:
        home = Path.home()
    except RuntimeError:          # no HOME and no password entry
        home = None
    base = os.environ.get("XDG_CACHE_HOME") or (str(home / ".cache") if home not in (None, Path("/")) else "")
    return Path(base) / "mpt-edge-runtime" if base else None


class StampStore:
    """Authenticated stamps in `folder` (a cache folder): read() → {name: [digest, identity]}, write(...)."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def default(cls) -> "StampStore | None":
        folder = cache_folder()
        return cls(folder) if folder is not None else None

    def _key(self, create: bool) -> bytes | None:
        """The per-user HMAC key: None when absent (and not created), unreadable, or not private to this user."""
        path = self.folder / KEY_FILE
        if create and not path.exists():
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".key-")
            try:
                os.write(fd, secrets.token_bytes(32))
                os.fsync(fd)
                os.close(fd)
                try:
                    os.link(tmp, path)          # never replaces a key another process made meanwhile
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
        try:
            stat = os.lstat(path)
            if hasattr(os, "getuid") and (stat.st_uid != os.getuid() or stat.st_mode & 0o077):
                return None                     # someone else could read or have written it
            key = path.read_bytes()
        except OSError:
            return None
        return key if len(key) == 32 else None

    def _path(self, bundle: Path) -> Path:
        return self.folder / "stamps" / f"{hashlib.sha256(str(bundle).encode()).hexdigest()[:32]}.json"

    @staticmethod
    def _mac(key: bytes, body: dict) -> str:
        return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()

    def read(self, bundle: Path) -> dict:
        """The files a valid stamp for bundle folder `bundle` (a real path) vouches for; {} when none is valid."""
        try:
            key = self._key(create=False)
            if key is None:
                return {}
            data = json.loads(self._path(bundle).read_text())
            body = {k: v for k, v in data.items() if k != "mac"}
            if not hmac.compare_digest(str(data.get("mac", "")), self._mac(key, body)):
                return {}
            if body.get("version") != STAMP_VERSION or body.get("folder") != str(bundle):
                return {}
            return dict(body["files"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def write(self, bundle: Path, files: Mapping[str, list]) -> None:
        """Stamp `files` ({name: [digest, identity]}) for `bundle`, atomically; failures are silent (no stamp)."""
        try:
            key = self._key(create=True)
            if key is None:
                return
            body = {"version": STAMP_VERSION, "folder": str(bundle), "files": dict(files)}
            target = self._path(bundle)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".stamp-")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump({**body, "mac": self._mac(key, body)}, handle)
                os.replace(tmp, target)          # readers see the old stamp or the new one, never a part
            except BaseException:
                os.unlink(tmp)
                raise
            self._prune(target.parent)
        except OSError:
            pass

    @staticmethod
    def _prune(folder: Path) -> None:
        """Keep the MAX_STAMPS most recently written stamps (folders come and go: temp dirs, old releases)."""
        stamps = []
        for path in folder.glob("*.json"):
            try:
                stamps.append((path.stat().st_mtime_ns, path))
            except OSError:
                continue
        for _, path in sorted(stamps, reverse=True)[MAX_STAMPS:]:
            try:
                path.unlink()
            except OSError:
                pass


class Verification:
    """Checks the files of one bundle folder (`digests`: name → hex sha256 from the manifest) for one load."""

    def __init__(self, folder: Path, digests: Mapping[str, str], stamps: StampStore | None | bool = False):
        self.folder = Path(folder)
        self.digests = dict(digests)
        for name in self.digests:
            _check_name(self.folder, name)
        self.store = StampStore.default() if stamps is True else (stamps or None)
        self.real = self.folder.resolve()
        self.stamped = self.store.read(self.real) if self.store is not None else {}
        self.verified: dict[str, list] = {}      # name → [digest, identity or None (not stampable)]
        self.hashed: list[str] = []               # files hashed by this load (the others matched the stamp)
        self.seconds = 0.0                        # wall seconds in verify(), summed over threads
        self._lock = threading.Lock()            # verify() may run in several threads

    def verify(self, names: Iterable[str]) -> None:
        """Hash (or find stamped) each of `names` now; BundleError on the first mismatch."""
        tick = time.perf_counter()
        try:
            for name in names:
                self._verify_one(name)
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - tick

    def finish(self) -> bool:
        """True when every file of the manifest has matched; then the stamp is written (or refreshed) for the
        next load, with every file whose identity held steady while it was hashed."""
        complete = set(self.verified) == set(self.digests)
        if complete and self.store is not None and self.hashed:
            stampable = {n: v for n, v in self.verified.items() if v[1] is not None}
            if stampable:
                self.store.write(self.real, stampable)
        return complete

    def _verify_one(self, name: str) -> None:
        target, digest = self.folder / name, self.digests[name]
        before = _lstat(target)
        entry = self.stamped.get(name)
        if isinstance(entry, list) and entry == [digest, identity(before)]:
            with self._lock:
                self.verified[name] = entry
            return
        start_ns = time.time_ns()
        actual = file_sha256(target)
        if actual != digest:
            raise BundleError(f"{target} does not match its sha256 in {fmt.MANIFEST}: the file was changed or "
                              "damaged; restore it or re-export the bundle")
        after = _lstat(target)
        steady = identity(before) == identity(after) and start_ns - max(after.st_mtime_ns, after.st_ctime_ns) > RACY_NS
        with self._lock:
            self.verified[name] = [digest, identity(after) if steady else None]
            self.hashed.append(name)


def _check_name(folder: Path, name: str) -> None:
    if Path(name).name != name or name in ("", ".", ".."):
        raise BundleError(f"{folder / fmt.MANIFEST} names file {name!r} outside the bundle folder; refusing to load it")
    target = folder / name
    if target.is_symlink():
        raise BundleError(f"{target} is a symbolic link; a bundle holds plain files only (refusing to follow it)")
    if not target.is_file():
        raise BundleError(f"{target} is missing from the bundle; copy the whole bundle folder or re-export it")


def _lstat(path: Path) -> os.stat_result:
    try:
        stat = os.lstat(path)
    except OSError as err:
        raise BundleError(f"{path} cannot be read ({err}); restore it or re-export the bundle") from None
    if not stat_module.S_ISREG(stat.st_mode):
        raise BundleError(f"{path} is not a plain file; a bundle holds plain files only")
    return stat
