"""Emulated CPUs (QEMU user mode, no binfmt, chroot or mounts): docs/notes/arm64-emulation.md.

x86_64-avx2 runs this machine's own Python and onnxruntime under `qemu-x86_64-static -cpu Haswell`, so
ONNX Runtime's CPU dispatch sees AVX2 without AVX-512 or VNNI and picks the kernels such a CPU would run.

aarch64 / aarch64-neon run an arm64 Debian userland holding only Python (mmdebstrap --variant=extract)
with aarch64 wheels of onnxruntime and numpy, under qemu-aarch64-static with a named CPU model. Each CPU
gets its own hard-linked copy of the userland whose /proc/cpuinfo is written from the features QEMU
really offers (QEMU 7.2 shows the host's x86 cpuinfo otherwise, and onnxruntime crashes on it). Never
QEMU_CPU=max on QEMU 7.2: its SME emulation computes int8 wrongly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Literal

from compress.container.host_tools import ensure_tools
from compress.errors import UserError
from compress.targets.base import Log, Target
from exporters.native import check_aarch64
from exporters.native.check_aarch64 import PYTHON, default_root, emulation_env


class X86Target(Target):
    """This machine's Python and onnxruntime on an emulated AVX2-only x86-64 CPU."""

    name = "x86_64-avx2"
    arch: Literal["x86_64", "aarch64"] = "x86_64"
    kind: Literal["native", "emulated", "docker"] = "emulated"
    cpu = "Haswell"
    vnni = False
    qemu = "qemu-x86_64-static"

    def problem(self) -> str | None:
        if shutil.which(self.qemu) is None:
            return f"{self.qemu} is not installed: run `edge-compress targets setup {self.name}`"
        return None

    def cpu_features(self, reported: list[str]) -> list[str]:  # noqa: ARG002
        return ["avx2", "fma", "f16c"]  # qemu-user shows guests the host's cpuinfo; the CPU is a Haswell

    def setup(self, log: Log) -> None:
        ensure_tools([self.qemu], log)

    def command(self, job_dir: Path) -> tuple[list[str], dict[str, str] | None]:
        paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONDONTWRITEBYTECODE="1")
        return [self.qemu, "-cpu", self.cpu, sys.executable, str(job_dir / "worker.py"), str(job_dir)], env


class ArmTarget(Target):
    """An aarch64 Python with the aarch64 onnxruntime wheel on an emulated ARM CPU model."""

    arch: Literal["x86_64", "aarch64"] = "aarch64"
    kind: Literal["native", "emulated", "docker"] = "emulated"
    qemu = "qemu-aarch64-static"

    def __init__(self, name: str, cpu: str, dot_product: bool) -> None:
        self.name, self.cpu, self.dot_product = name, cpu, dot_product

    @property
    def root(self) -> Path:
        return default_root()

    @property
    def tree(self) -> Path:
        """This CPU's userland: a hard-linked copy of root/rootfs with its own /proc/cpuinfo."""
        return self.root / "cpus" / self.cpu

    def describe(self) -> str:
        return f"{self.name} (emulated {self.cpu}, {'NEON + dot product' if self.dot_product else 'plain NEON'})"

    def problem(self) -> str | None:
        fix = f"run `edge-compress targets setup {self.name}`"
        if shutil.which(self.qemu) is None:
            return f"{self.qemu} is not installed: {fix}"
        if not (self.root / "site" / "onnxruntime").is_dir():
            return f"no aarch64 onnxruntime in {self.root / 'site'}: {fix}"
        if not (self.tree / ".ready").is_file():
            return f"no emulated {self.cpu} userland in {self.tree}: {fix}"
        return None

    def setup(self, log: Log) -> None:
        ensure_tools([self.qemu, "mmdebstrap"], log)
        start = time.perf_counter()
        if not (self.root / "site" / "onnxruntime").is_dir() or not (self.root / "rootfs" / "usr/bin").is_dir():
            log(f"arm64 userland and aarch64 wheels into {self.root} (mmdebstrap, pip; about 1 min)")
        check_aarch64.prepare(self.root)
        tree = self.tree
        if not (tree / ".ready").is_file():
            log(f"{self.cpu}: a copy of the userland with its own /proc/cpuinfo")
            shutil.rmtree(tree, ignore_errors=True)
            tree.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(
                ["cp", "-al", str(self.root / "rootfs"), str(tree)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise UserError(f"targets: could not copy the userland to {tree}: {proc.stderr.strip()}")
            features = check_aarch64.write_cpuinfo(self.root, tree, self.cpu)
            if ("asimddp" in features) != self.dot_product:
                raise UserError(
                    f"targets: QEMU's {self.cpu} {'lacks' if self.dot_product else 'has'} the dot-product "
                    f"extension this target is meant to {'have' if self.dot_product else 'lack'}"
                )
            (tree / ".ready").write_text(json.dumps({"cpu": self.cpu, "features": features}) + "\n")
        log(f"{self.name}: ready in {time.perf_counter() - start:.0f} s")

    def command(self, job_dir: Path) -> tuple[list[str], dict[str, str] | None]:
        tree = self.tree
        cmd = [self.qemu, "-L", str(tree), str(tree / PYTHON), str(job_dir / "worker.py"), str(job_dir)]
        return cmd, emulation_env(self.root, self.cpu)
