"""Debian tools the emulated targets and the private Docker engine need on this host, installed when
missing (as root, announced on one line first) or named in a one-line error."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

from compress.errors import UserError

Log = Callable[[str], object]

# host tool -> Debian package
TOOLS = {
    "qemu-x86_64-static": "qemu-user-static",
    "qemu-aarch64-static": "qemu-user-static",
    "mmdebstrap": "mmdebstrap",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "dockerd": "docker.io",
}


def ensure_tools(tools: list[str], log: Log) -> None:
    """Install missing host tools from Debian's packages (as root), or say exactly what to install.

    Installing changes the host: it logs one line naming the packages before apt-get runs.
    """
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    packages = sorted({TOOLS[t] for t in missing})
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise UserError(f"targets: {', '.join(missing)} missing: install {' '.join(packages)} (apt-get, as root)")
    log(
        f"installing Debian package{'s' * (len(packages) > 1)} {' '.join(packages)} on this host for "
        f"{', '.join(missing)} (apt-get update, then apt-get install --no-install-recommends, as root)"
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"],
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()] or ["no output"]
            raise UserError(f"targets: apt-get could not install {' '.join(packages)}: {lines[-1].strip()}")
    still = [t for t in tools if shutil.which(t) is None]
    if still:
        raise UserError(f"targets: {', '.join(still)} still missing after installing {' '.join(packages)}")
