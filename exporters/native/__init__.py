"""Native ONNX Runtime kernels for the ai.edgecompress custom ops (C++ in src/, built by build.py).

    import onnxruntime as ort
    from exporters import native

    options = ort.SessionOptions()
    native.register(options)  # True: WindowedAttention and BlockSparseAttention run natively

A model that carries the ops' ONNX function bodies runs without the library too (ORT inlines the
functions); with it registered, ORT runs the native kernels. Nothing is imported or built here on import:
`edge-compress build-ops` (or exporters.native.build.build) compiles lib/<arch>/libedgecompress_ops.so.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from compress.errors import UserError

__all__ = ["ARCHES", "IncompatibleLibrary", "available", "check_compatible", "host_arch", "library_path", "register"]

ARCHES = ("x86_64", "aarch64")
LIBRARY = "libedgecompress_ops.so"
_LIB_ROOT = Path(__file__).parent / "lib"
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class IncompatibleLibrary(UserError):
    """The library is there but cannot serve this onnxruntime or this machine: rebuild it."""


def host_arch() -> str:
    """This machine's architecture as the library folders name it (platform.machine() otherwise)."""
    machine = platform.machine()
    return _MACHINES.get(machine.lower(), machine)


def library_path(arch: str | None = None) -> Path:
    """Where the library for `arch` (default: this machine) is built, whether or not it exists."""
    return _LIB_ROOT / (arch or host_arch()) / LIBRARY


def metadata_path(arch: str | None = None) -> Path:
    """The build record next to the library: architecture, ORT API version, headers, compiler."""
    return library_path(arch).with_suffix(".json")


def available(arch: str | None = None) -> bool:
    """Is the library for `arch` (default: this machine) built?"""
    return library_path(arch).is_file()


def check_compatible(arch: str | None = None, runtime_version: str | None = None) -> dict[str, Any]:
    """The build record, after checking that the library suits this machine and this onnxruntime.

    ONNX Runtime 1.x offers C API versions up to x; a library built for a newer API cannot run on it.
    Raises IncompatibleLibrary with a one-line reason and the fix.
    """
    path = library_path(arch)
    meta = metadata_path(arch)
    rebuild = "rebuild with `edge-compress build-ops`"
    try:
        record = json.loads(meta.read_text())
        built_for = int(record["ort_api_version"])
        built_arch = str(record["arch"])
    except (OSError, ValueError, KeyError, TypeError):
        raise IncompatibleLibrary(f"{path}: its build record {meta.name} is missing or damaged; {rebuild}") from None
    want = arch or host_arch()
    if built_arch != want:
        raise IncompatibleLibrary(f"{path} was built for {built_arch}, not {want}; {rebuild}")
    if runtime_version is None:
        import onnxruntime

        runtime_version = str(onnxruntime.__version__)
    offered = _api_version_of(runtime_version)
    if offered is not None and offered < built_for:
        raise IncompatibleLibrary(
            f"{path.name} was built for ONNX Runtime API {built_for}; this onnxruntime {runtime_version} "
            f"offers up to {offered}; {rebuild}"
        )
    return record


def register(options: Any) -> bool:
    """Register the library for this machine with an onnxruntime.SessionOptions.

    Returns False when it is not built, True once registered; raises IncompatibleLibrary when it is built
    but cannot be used here (wrong architecture, newer ORT API, or ORT refuses it).
    """
    path = library_path()
    if not path.is_file():
        return False
    check_compatible()
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # ORT raises its own pybind11 exception types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = "unset it or name a kernel set this CPU runs" if "EDGE_COMPRESS_KERNELS" in reason else None
        raise IncompatibleLibrary(
            f"ONNX Runtime refused {path}: {reason}; {fix or 'rebuild with `edge-compress build-ops`'}"
        ) from None
    return True


def _api_version_of(version: str) -> int | None:
    parts = version.split(".")
    if len(parts) >= 2 and parts[0] == "1" and parts[1].isdigit():
        return int(parts[1])
    return None  # not a 1.x release: let ORT itself judge (RegisterCustomOps reports a missing API)
