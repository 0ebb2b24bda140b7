"""The native target: ONNX Runtime on this machine's own CPU."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any, Literal

from compress.targets.base import Target

ARCH = "x86_64"


class NativeTarget(Target):
    name = "x86_64"
    arch: Literal["x86_64", "aarch64"] = "x86_64"
    kind: Literal["native", "emulated", "docker"] = "native"
    cpu = "this machine's CPU"

    def __init__(self) -> None:
        from compress.presets import host_has_vnni

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


def session(
    model: Path,
    threads: int,
    settings: dict[str, Any] | None = None,
    optimized_path: Path | None = None,
    spinning: bool = True,
) -> Any:
    """An ONNX Runtime CPU session with the artifact's own session settings (see session.json).

    spinning=False stops idle intra-op threads from spin-waiting. Timed sessions need it: sessions
    timed in turn on a 2-core machine otherwise steal each other's cores (measured here: the same
    model ran 2-3x slower interleaved with a spinning neighbour), and alone it was not slower.
    """
    import onnxruntime as ort

    settings = settings or {}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from exporters import native as custom_ops

    custom_ops.register(so)  # our attention ops' native kernels, when built for this machine
    for key, value in settings.get("config_entries", {}).items():
        so.add_session_config_entry(key, str(value))
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        str(model),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(settings.get("disabled_optimizers", [])),
    )
