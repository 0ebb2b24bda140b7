"""Compile libedgecompress_ops.so for x86-64 (g++) or aarch64 (aarch64-linux-gnu-g++).

The library does not link against libonnxruntime: ORT hands it its API table through RegisterCustomOps.
kernels.cc is compiled once per instruction set (x86-64: SSE2 baseline, AVX2 and AVX-512; aarch64: NEON)
and dispatch.cc picks one at run time, so the library loads on any CPU of its architecture. The C++
runtime is linked statically and only the entry points are exported.

The build is skipped when its stamp (sources, flags, compiler, headers) matches the last one; the result
and a JSON record of the build (architecture, ORT API version) are written to lib/<arch>/ atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compress.errors import UserError
from exporters.native import ARCHES, library_path, metadata_path
from exporters.native.headers import C_API_HEADER, headers_version, include_dir

SRC = Path(__file__).parent / "src"
COMPILERS = {"x86_64": "g++", "aarch64": "aarch64-linux-gnu-g++"}
APT_PACKAGE = {"x86_64": "g++", "aarch64": "g++-aarch64-linux-gnu"}
BASELINE = {"x86_64": "x86-64", "aarch64": "armv8-a"}
# (kernel namespace, -march) per architecture: dispatch.cc must name the same namespaces.
ISAS = {
    "x86_64": (("sse2", "x86-64"), ("avx2", "x86-64-v3"), ("avx512", "x86-64-v4")),
    "aarch64": (("neon", "armv8-a"),),
}
GLUE = (
    "ort_glue.cc",
    "windowed_attention.cc",
    "block_sparse_attention.cc",
    "lsh_attention.cc",
    "dispatch.cc",
    "register.cc",
)
CXXFLAGS = (
    "-std=c++17",
    "-O3",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-ffp-contract=fast",  # fused multiply-add where the target has it
    "-Wall",
    "-Wextra",
    "-Wno-psabi",  # vector-typed helpers are always inlined: no ABI crosses them
)
LDFLAGS = (
    "-shared",
    "-static-libstdc++",  # runs next to any onnxruntime wheel, whatever libstdc++ the device has
    "-static-libgcc",
    "-Wl,--no-undefined",
    "-Wl,--exclude-libs,ALL",
    "-Wl,-O1",
)


def build(arch: str, *, force: bool = False) -> Path:
    """Build (or reuse) the library for `arch` ("x86_64" or "aarch64"); returns its path."""
    if arch not in ARCHES:
        raise UserError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHES)}")
    cxx = compiler(arch)
    include = include_dir()
    api_version = _api_version(include)
    version = _compiler_version(cxx)
    stamp = _stamp(arch, version, include)
    out = library_path(arch)
    meta_path = metadata_path(arch)
    if not force and out.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("stamp") == stamp:
                return out
        except json.JSONDecodeError:
            pass  # a damaged record: rebuild
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        work = Path(tmp)
        objects = _compile(arch, cxx, include, work)
        staged = work / out.name
        _run([cxx, *LDFLAGS, f"-Wl,--version-script={SRC / 'exports.map'}", "-o", str(staged), *map(str, objects)])
        record = {
            "library": out.name,
            "arch": arch,
            "ort_api_version": api_version,
            "onnxruntime_headers": headers_version(include),
            "kernels": [isa for isa, _ in ISAS[arch]],
            "compiler": version,
            "stamp": stamp,
        }
        staged_meta = work / meta_path.name
        staged_meta.write_text(json.dumps(record, indent=2) + "\n")
        staged.chmod(0o755)
        staged.replace(out)
        staged_meta.replace(meta_path)
    return out


def compiler(arch: str) -> str:
    """The C++ compiler for `arch`, or a UserError saying which Debian package provides it."""
    cxx = COMPILERS[arch]
    if shutil.which(cxx) is None:
        raise UserError(f"{cxx} not found, needed to build the {arch} ops: apt-get install {APT_PACKAGE[arch]}")
    return cxx


def _compile(arch: str, cxx: str, include: Path, work: Path) -> list[Path]:
    jobs: list[tuple[Path, list[str]]] = []
    common = [cxx, *CXXFLAGS, f"-I{include}", "-c"]
    for name in GLUE:
        obj = work / name.replace(".cc", ".o")
        jobs.append((obj, [*common, f"-march={BASELINE[arch]}", str(SRC / name), "-o", str(obj)]))
    for isa, march in ISAS[arch]:
        obj = work / f"kernels_{isa}.o"
        jobs.append((obj, [*common, f"-march={march}", f"-DEC_ISA={isa}", str(SRC / "kernels.cc"), "-o", str(obj)]))
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: _run(job[1]), jobs))
    if len(ISAS[arch]) > 1:
        for obj, _ in jobs[len(GLUE) :]:
            _check_no_shared_code(cxx, obj)
    return [obj for obj, _ in jobs]


def _check_no_shared_code(cxx: str, obj: Path) -> None:
    """An inline function emitted out of line by a per-ISA object (a weak symbol) could be merged by the
    linker with another ISA's copy, and AVX-512 code could then run on a CPU without it: refuse."""
    nm = shutil.which(cxx.replace("g++", "nm")) or "nm"
    proc = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True, check=True)
    weak = [line.split()[-1] for line in proc.stdout.splitlines() if line.split()[1:2] in (["W"], ["V"], ["u"])]
    weak = [name for name in weak if not name.startswith("DW.ref.")]  # the unwinder's personality pointer
    if weak:
        raise UserError(f"{obj.name} defines shared inline code ({weak[0]}...): keep kernels.cc free of it")


def _api_version(include: Path) -> int:
    match = re.search(r"#define ORT_API_VERSION (\d+)", (include / C_API_HEADER).read_text())
    if not match:
        raise UserError(f"{include / C_API_HEADER}: no ORT_API_VERSION")
    return int(match.group(1))


def _compiler_version(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()[0] if proc.stdout else cxx


def _stamp(arch: str, version: str, include: Path) -> str:
    digest = hashlib.sha256()
    for part in (arch, version, repr(CXXFLAGS), repr(LDFLAGS), repr(ISAS[arch]), headers_version(include)):
        digest.update(part.encode() + b"\0")
    for path in sorted(SRC.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
        raise UserError(f"building the native ops failed: {Path(cmd[0]).name}: {errors[0]}")
