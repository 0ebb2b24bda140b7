"""docker:IMAGE: the artifact validated inside the image that will ship it.

The image needs python3 with numpy and onnxruntime (edge-compress's runtime images have them). The job
folder is mounted read-write at /job; the container gets no network. The Docker engine is the one the
`docker` client reaches (DOCKER_HOST); ../shared/notes/docker-engine.md says how to run a private one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from compress.targets.base import Log, Target

ARCHES: dict[str, Literal["x86_64", "aarch64"]] = {"amd64": "x86_64", "arm64": "aarch64"}


def docker_cli() -> str | None:
    """Debian's client first (/usr/bin/docker); any other docker on PATH otherwise."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else shutil.which("docker")


class DockerTarget(Target):
    kind: Literal["native", "emulated", "docker"] = "docker"

    def __init__(self, image: str) -> None:
        self.image = image
        self.name = f"docker:{image}"
        self.cpu = "this machine's CPU, in a container"
        self.arch: Literal["x86_64", "aarch64"] = "x86_64"

    def _inspect(self) -> tuple[str | None, str]:
        cli = docker_cli()
        if cli is None:
            return None, "no docker client on PATH"
        proc = subprocess.run(
            [cli, "image", "inspect", "-f", "{{.Architecture}}", self.image],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"]
            return None, lines[-1].strip()
        return proc.stdout.strip(), ""

    def problem(self) -> str | None:
        arch, why = self._inspect()
        if arch is None:
            return f"image {self.image} is not available to docker ({why}); build it first (edge-compress package)"
        if arch not in ARCHES:
            return f"image {self.image} is for {arch}; targets run amd64 or arm64 images"
        self.arch = ARCHES[arch]
        if self.arch == "aarch64":
            self.cpu = "emulated aarch64 (binfmt), in a container"
        return None

    def setup(self, log: Log) -> None:  # noqa: ARG002 (nothing to build: the image comes from `package`)
        problem = self.problem()
        if problem:
            from compress.errors import UserError

            raise UserError(f"targets: {self.name}: {problem}")

    def command(self, job_dir: Path) -> tuple[list[str], dict[str, str] | None]:
        cli = docker_cli() or "docker"
        cmd = [cli, "run", "--rm", "--network", "none", "-u", f"{os.getuid()}:{os.getgid()}", "-v", f"{job_dir}:/job"]
        cmd += ["--entrypoint", "python3"]
        return [*cmd, self.image, "/job/worker.py", "/job"], None
