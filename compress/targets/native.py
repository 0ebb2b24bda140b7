"""The native target: ONNX Runtime on this machine's own CPU."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Literal

from compress.runtime.presets import host_has_vnni
from compress.targets.base import Target

ARCH = "x86_64"


class NativeTarget(Target):
    name = "x86_64"
    arch: Literal["x86_64", "aarch64"] = "x86_64"
    kind: Literal["native", "emulated", "docker"] = "native"
    cpu = "this machine's CPU"

    def __init__(self) -> None:
        self.vnni = host_has_vnni()
        self.cpu = cpu_model()

    def problem(self) -> str | None:
        machine = platform.machine().lower()
        if machine not in ("x86_64", "amd64"):
            return f"x86_64 runs natively only on an x86-64 host; this one is {machine}"
        return None

    def command(self, job_dir: Path) -> tuple[list[str], dict[str, str] | None]:
        return [sys.executable, str(job_dir / "worker.py"), str(job_dir)], None


def cpu_model() -> str:
    """This machine's CPU model name (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "this machine's CPU"
