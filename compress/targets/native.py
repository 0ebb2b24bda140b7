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
    """This machine's CPU model name (from /proc/cpuinfo), with its x86 family and model: a virtual machine
    often shows only "AMD EPYC", which hides whether it is a Zen 1 without VNNI (family 23) or a Zen 5
    (family 26), and int8 speed depends on it."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:
                break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "this machine's CPU"
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name
