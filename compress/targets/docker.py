"""docker:IMAGE: the artifact validated inside the image that will ship it.

The image needs python3 with numpy and onnxruntime (edge-compress's runtime images have them). The job
folder is mounted read-write at /job; the container gets no network. The Docker engine is the one the
`docker` client reaches (DOCKER_HOST, or the private engine of `edge-compress docker start`). arm64
images run here under qemu through binfmt_misc, as an emulated Neoverse-N1 (compress/container/images.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Literal

from compress.container.engine import CLIENT
from compress.container.images import EMULATED_CPU, client_env, ensure_binfmt, host_arch
from compress.errors import UserError
from compress.runtime.presets import host_has_vnni
from compress.targets.base import Log, Target
from compress.targets.emulated import ArmTarget

ARCHES: dict[str, Literal["x86_64", "aarch64"]] = {"amd64": "x86_64", "arm64": "aarch64"}


class DockerTarget(Target):
    kind: Literal["native", "emulated", "docker"] = "docker"

    def __init__(self, image: str) -> None:
        self.image = image
        self.name = f"docker:{image}"
        self.cpu = "this machine's CPU, in a container"
        self.arch: Literal["x86_64", "aarch64"] = "x86_64"
        self.platform = "amd64"
        # Until problem() has inspected the image it is taken as an amd64 image on this CPU (as presets
        # always treated it); an arm64 image has no VNNI to speak of.
        self.vnni: bool | None = host_has_vnni()

    @property
    def emulated(self) -> bool:
        return self.platform != host_arch()

    def _inspect(self) -> tuple[str | None, str]:
        if not Path(CLIENT).is_file():
            return None, f"no docker client at {CLIENT}"
        proc = subprocess.run(
            [CLIENT, "image", "inspect", "-f", "{{.Architecture}}", self.image],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env=client_env(),
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
        self.platform, self.arch = arch, ARCHES[arch]
        self.vnni = host_has_vnni() if self.arch == "x86_64" else None
        if arch != host_arch():
            self.cpu = f"emulated {EMULATED_CPU} (binfmt), in a container"
        return None

    def setup(self, log: Log) -> None:
        problem = self.problem()
        if problem:
            raise UserError(f"targets: {self.name}: {problem}")
        if self.platform != host_arch():
            ensure_binfmt(log)

    @staticmethod
    def _container(job_dir: Path) -> str:
        """The job's container name: killing the docker client on a timeout does not stop the container."""

        return f"edge-compress-job-{hashlib.sha256(str(job_dir).encode()).hexdigest()[:12]}-{os.getpid()}"

    def killed(self, job_dir: Path) -> None:
        subprocess.run(
            [CLIENT, "kill", self._container(job_dir)], env=client_env(), capture_output=True, check=False, timeout=60
        )

    def command(self, job_dir: Path) -> tuple[list[str], dict[str, str] | None]:
        cmd = [
            CLIENT,
            "run",
            "--rm",
            "--name",
            self._container(job_dir),
            "--network",
            "none",
            "-u",
            f"{os.getuid()}:{os.getgid()}",
            "-v",
            f"{job_dir}:/job",
        ]
        cmd += [*run_flags(self.platform), "--entrypoint", "python3"]
        return [*cmd, self.image, "/job/worker.py", "/job"], client_env()


def run_flags(arch: str) -> list[str]:
    """`docker run` flags for an image of `arch` on this host: none natively; the emulated CPU otherwise."""
    if arch == host_arch():
        return []
    target = ArmTarget("aarch64", EMULATED_CPU, dot_product=True)  # the aarch64 target's userland and CPU
    if target.problem():
        target.setup(lambda _msg: None)
    cpuinfo = target.tree / "proc" / "cpuinfo"
    return ["--platform", f"linux/{arch}", "-e", f"QEMU_CPU={EMULATED_CPU}", "-v", f"{cpuinfo}:/proc/cpuinfo:ro"]
