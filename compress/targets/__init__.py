"""Where validation runs: this CPU, emulated CPUs (qemu user mode) and Docker images.

Every target runs the same worker script (compress/targets/worker.py) on a self-contained job folder,
so native, emulated and containerised figures come from one code path.

    x86_64        this machine's CPU, natively
    x86_64-avx2   the same ONNX Runtime under qemu-x86_64 -cpu Haswell: AVX2, no AVX-512, no VNNI
    aarch64       aarch64 Python + onnxruntime under qemu-aarch64, a Neoverse-N1 (NEON + dot product)
    aarch64-neon  the same as a Cortex-A72 (plain NEON, no dot product)
    docker:IMAGE  inside a Docker image that has python3, numpy and onnxruntime
"""

from __future__ import annotations

from compress.errors import UserError
from compress.targets.base import Target
from compress.targets.docker import DockerTarget
from compress.targets.emulated import ArmTarget, X86Target
from compress.targets.native import NativeTarget

NAMED: dict[str, Target] = {
    "x86_64": NativeTarget(),
    "x86_64-avx2": X86Target(),
    "aarch64": ArmTarget("aarch64", "neoverse-n1", dot_product=True),
    "aarch64-neon": ArmTarget("aarch64-neon", "cortex-a72", dot_product=False),
}
DOCKER_PREFIX = "docker:"


def check_name(name: str) -> str:
    """A target name as a recipe may write it, or a ValueError saying which names exist."""
    if name in NAMED:
        return name
    if name.startswith(DOCKER_PREFIX) and len(name) > len(DOCKER_PREFIX) and " " not in name:
        return name
    raise ValueError(f"unknown target {name!r}; allowed: {', '.join(NAMED)}, docker:IMAGE")


def get(name: str) -> Target:
    try:
        check_name(name)
    except ValueError as exc:
        raise UserError(f"targets: {exc}") from None
    if name.startswith(DOCKER_PREFIX):
        return DockerTarget(name[len(DOCKER_PREFIX) :])
    return NAMED[name]


__all__ = ["DOCKER_PREFIX", "NAMED", "Target", "check_name", "get"]
