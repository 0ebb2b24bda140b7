"""Run the aarch64 build of the native ops under QEMU user emulation and compare it with the x86-64 build.

    python -m exporters.native.check_aarch64 [--root DIR] [--cpu neoverse-n1] [--prepare]

DIR holds an emulated userland (docs/notes/arm64-emulation.md): DIR/rootfs, an arm64 Debian 12 with
python3.11 (mmdebstrap --variant=extract), and DIR/site, aarch64 wheels of onnxruntime and numpy installed
by the host's pip. `--prepare` creates both (needs root, qemu-user-static and mmdebstrap, about 1.5 min).
The same single-node models and inputs run natively with the x86-64 library and emulated with the
aarch64 one; outputs must agree within 1e-5. Emulation is 200-500x slower: the cases are small.
Never use QEMU_CPU=max on QEMU 7.2 (its SME emulation gives wrong results, see the note).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import UserError
from exporters.native import library_path

TOLERANCE = 1e-5
# Where `make setup` prepares the emulated userland (EDGE_COMPRESS_ARM64_ROOT overrides it).
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "build" / "arm64"
QEMU = "qemu-aarch64-static"
PYTHON = "usr/bin/python3.11"
# MIDR fields per emulated CPU (implementer, variant, part, revision), for the generated /proc/cpuinfo.
MIDR = {"neoverse-n1": (0x41, 0x4, 0xD0C, 1), "cortex-a72": (0x41, 0x0, 0xD08, 3), "cortex-a76": (0x41, 0x4, 0xD0B, 1)}
# Linux arm64 AT_HWCAP / AT_HWCAP2 bits, in order (arch/arm64/include/uapi/asm/hwcap.h).
HWCAP = (
    "fp",
    "asimd",
    "evtstrm",
    "aes",
    "pmull",
    "sha1",
    "sha2",
    "crc32",
    "atomics",
    "fphp",
    "asimdhp",
    "cpuid",
    "asimdrdm",
    "jscvt",
    "fcma",
    "lrcpc",
    "dcpop",
    "sha3",
    "sm3",
    "sm4",
    "asimddp",
    "sha512",
    "sve",
    "asimdfhm",
    "dit",
    "uscat",
    "ilrcpc",
    "flagm",
    "ssbs",
    "sb",
    "paca",
    "pacg",
)
HWCAP2 = (
    "dcpodp",
    "sve2",
    "sveaes",
    "svepmull",
    "svebitperm",
    "svesha3",
    "svesm4",
    "flagm2",
    "frint",
    "svei8mm",
    "svef32mm",
    "svef64mm",
    "svebf16",
    "i8mm",
    "bf16",
    "dgh",
    "rng",
    "bti",
    "mte",
)

# Runs under emulation: reads what QEMU reports in the aux vector, prints the two capability words.
_AUXV_SCRIPT = """
import struct
words = dict(struct.iter_unpack("<QQ", open("/proc/self/auxv", "rb").read()))
print(words.get(16, 0), words.get(26, 0))
"""

# Runs under emulation: the aarch64 library on the models and inputs the host wrote.
_RUN_SCRIPT = """
import ctypes, json, sys
import numpy as np
import onnxruntime as ort
lib, work = sys.argv[1], sys.argv[2]
cdll = ctypes.CDLL(lib)
cdll.EdgeCompressOpsIsa.restype = ctypes.c_char_p
cases = json.load(open(work + "/cases.json"))
outputs = {}
for name in cases:
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    sess = ort.InferenceSession(work + "/" + name + ".onnx", so, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(work + "/" + name + ".npz"))
    outputs[name] = sess.run(None, feeds)[0]
np.savez(work + "/emulated.npz", **outputs)
print(cdll.EdgeCompressOpsIsa().decode(), ort.__version__)
"""


def default_root() -> Path:
    """EDGE_COMPRESS_ARM64_ROOT if set, else build/arm64 in the checkout (what `make setup` prepares)."""
    return Path(os.environ.get("EDGE_COMPRESS_ARM64_ROOT") or DEFAULT_ROOT)


def emulation_ready(root: Path) -> str | None:
    """None when `root` can run the check, else why not (for a pytest skip reason)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-user-static)"
    if not (root / "rootfs" / PYTHON).is_file():
        return f"no arm64 userland at {root / 'rootfs'} (python -m exporters.native.check_aarch64 --prepare)"
    if not (root / "site" / "onnxruntime").is_dir():
        return f"no aarch64 onnxruntime wheel in {root / 'site'}"
    if not library_path("aarch64").is_file():
        return "the aarch64 library is not built (edge-compress build-ops --arch aarch64)"
    return None


def prepare(root: Path) -> None:
    """Create root/rootfs and root/site as the emulation note describes (root only; about 1.5 min)."""
    for tool in (QEMU, "mmdebstrap"):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} is missing: apt-get install qemu-user-static mmdebstrap")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "rootfs" / PYTHON).is_file():
        include = "python3.11-minimal,libpython3.11-stdlib,libstdc++6"
        cmd = ["mmdebstrap", "--mode=root", "--variant=extract", "--architectures=arm64", f"--include={include}"]
        _run([*cmd, "bookworm", str(root / "rootfs"), "/etc/apt/sources.list.d/debian.sources"], "mmdebstrap")
    if not (root / "site" / "onnxruntime").is_dir():
        from importlib.metadata import version

        platforms = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--target", str(root / "site"), "--only-binary=:all:"]
        cmd += ["--implementation", "cp", "--python-version", "3.11", "--abi", "cp311", "--abi", "abi3"]
        cmd += ["--abi", "none", *[arg for p in platforms for arg in ("--platform", p)]]
        _run([*cmd, f"onnxruntime=={version('onnxruntime')}", f"numpy=={version('numpy')}"], "pip install")


def compare(root: Path, cpu: str = "neoverse-n1") -> dict[str, Any]:
    """Max |aarch64 - x86-64| per case; raises UserError above TOLERANCE. Also: kernels and ORT used."""
    reason = emulation_ready(root)
    if reason:
        raise UserError(f"aarch64 check: {reason}")
    if cpu not in MIDR:
        raise UserError(f"aarch64 check: unknown --cpu {cpu}; allowed: {', '.join(MIDR)}")
    import onnxruntime as ort

    from exporters.native import register

    write_cpuinfo(root, root / "rootfs", cpu)
    with tempfile.TemporaryDirectory(prefix="edge-compress-arm64-") as tmp:
        work = Path(tmp)
        cases = _cases()
        options = ort.SessionOptions()
        if not register(options):
            raise UserError("aarch64 check: the x86-64 library is not built (edge-compress build-ops)")
        native = {}
        for name, (model, feeds) in cases.items():
            (work / f"{name}.onnx").write_bytes(model.SerializeToString())
            arrays: dict[str, Any] = feeds  # (np.savez's stub would take a value for allow_pickle)
            np.savez(work / f"{name}.npz", **arrays)
            sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            native[name] = sess.run(None, feeds)[0]
        (work / "cases.json").write_text(json.dumps(sorted(cases)))
        (work / "run.py").write_text(_RUN_SCRIPT)
        out = _emulate(root, cpu, [str(work / "run.py"), str(library_path("aarch64")), str(work)])
        emulated = dict(np.load(work / "emulated.npz"))
    diffs = {name: float(np.abs(native[name] - emulated[name]).max()) for name in cases}
    isa, version = out.split()[-2:]
    result = {"cpu": cpu, "kernels": isa, "onnxruntime": version, "max_abs_diff": diffs}
    worst = max(diffs.values())
    if not worst <= TOLERANCE:
        raise UserError(f"aarch64 ({cpu}) differs from x86-64 by {worst:.3g} > {TOLERANCE} ({diffs})")
    return result


def _cases() -> dict[str, tuple[Any, dict[str, np.ndarray]]]:
    """Small single-node models covering the ops: padding, global tokens, causal, a random layout, LSH."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(7)
    b, h, d = 2, 2, 16
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("ai.edgecompress", 1)]
    cases = {}
    for s, causal in ((37, 0), (37, 1), (70, 0)):
        key_mask = np.ones((b, s), bool)
        key_mask[1, s - s // 3 :] = False
        global_mask = np.zeros((b, s), bool)
        global_mask[:, 0] = True
        global_mask[0, s // 2] = True
        feeds: dict[str, np.ndarray] = {n: rng.standard_normal((b, h, s, d), dtype=np.float32) for n in "QKV"}
        feeds |= {"key_padding_mask": key_mask, "global_mask": global_mask}
        node = helper.make_node(
            "WindowedAttention", list(feeds), ["Y"], domain="ai.edgecompress", window=8, causal=causal
        )
        cases[f"windowed_s{s}_causal{causal}"] = (_model(node, feeds, [], opsets), feeds)
    bs, nb = 8, 6
    layout = rng.random((nb, nb, nb)) < 0.4
    layout |= np.eye(nb, dtype=bool)[None]
    feeds = {n: rng.standard_normal((b, h, nb * bs, d), dtype=np.float32) for n in "QKV"}
    feeds["key_padding_mask"] = np.arange(nb * bs)[None, :] < np.array([[nb * bs], [nb * bs - 11]])
    node = helper.make_node("BlockSparseAttention", [*feeds, "layout"], ["Y"], domain="ai.edgecompress", block_size=bs)
    init = [numpy_helper.from_array(layout, "layout")]
    cases["block_sparse"] = (_model(node, feeds, init, opsets), feeds)
    for causal in (0, 1):
        s = 48
        feeds = {n: rng.standard_normal((b, h, s, d), dtype=np.float32) for n in ("QK", "V")}
        feeds["key_padding_mask"] = np.arange(s)[None, :] < np.array([[s], [s - 13]])
        rotations = rng.standard_normal((2, d, 3), dtype=np.float32)
        node = helper.make_node(
            "LSHAttention", [*feeds, "rotations"], ["Y"], domain="ai.edgecompress", chunk=8, causal=causal
        )
        cases[f"lsh_causal{causal}"] = (
            _model(node, feeds, [numpy_helper.from_array(rotations, "rotations")], opsets),
            feeds,
        )
    return cases


def _model(node: Any, feeds: dict[str, np.ndarray], init: list[Any], opsets: list[Any]) -> Any:
    from onnx import helper
    from onnx.helper import np_dtype_to_tensor_dtype

    inputs = [helper.make_tensor_value_info(n, np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in feeds.items()]
    first = next(iter(feeds.values()))  # Q (or QK): the output has its shape
    output = helper.make_tensor_value_info("Y", np_dtype_to_tensor_dtype(np.dtype(np.float32)), first.shape)
    graph = helper.make_graph([node], node.op_type, inputs, [output], initializer=init)
    return helper.make_model(graph, opset_imports=opsets)


def write_cpuinfo(root: Path, rootfs: Path, cpu: str) -> list[str]:
    """ROOTFS/proc/cpuinfo for `cpu`: QEMU 7.2 shows guests the host's x86 one, on which onnxruntime's CPU
    detection crashes; features are taken from the aux vector QEMU gives, so none is claimed it lacks.
    Returns the features written."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-auxv-") as tmp:
        script = Path(tmp) / "auxv.py"
        script.write_text(_AUXV_SCRIPT)
        words = _emulate(root, cpu, [str(script)], rootfs=rootfs).split()
    hwcap, hwcap2 = int(words[0]), int(words[1])
    features = [name for bit, name in enumerate(HWCAP) if hwcap >> bit & 1]
    features += [name for bit, name in enumerate(HWCAP2) if hwcap2 >> bit & 1]
    implementer, variant, part, revision = MIDR[cpu]
    block = (
        f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: {implementer:#x}\n"
        f"CPU architecture: 8\nCPU variant\t: {variant:#x}\nCPU part\t: {part:#05x}\nCPU revision\t: {revision}\n\n"
    )
    proc = rootfs / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "cpuinfo").unlink(missing_ok=True)  # a hard-linked copy of the rootfs must not share it
    (proc / "cpuinfo").write_text("".join(f"processor\t: {i}\n{block}" for i in range(2)))
    return features


def emulation_env(root: Path, cpu: str) -> dict[str, str]:
    """The environment of an emulated aarch64 python: the CPU model and the aarch64 wheels' folder."""
    return dict(os.environ, QEMU_CPU=cpu, PYTHONPATH=str(root / "site"), PYTHONDONTWRITEBYTECODE="1")


def _emulate(root: Path, cpu: str, args: list[str], rootfs: Path | None = None) -> str:
    rootfs = rootfs or root / "rootfs"
    env = emulation_env(root, cpu)
    proc = subprocess.run(
        [QEMU, "-L", str(rootfs), str(rootfs / PYTHON), *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()] or ["no output"]
        raise UserError(f"aarch64 check: emulated python failed ({cpu}): {lines[-1]}")
    return proc.stdout.strip()


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()] or ["no output"]
        # The first "E:" line is the cause (e.g. a mirror that cannot be reached); the last is a summary.
        first = next((ln for ln in lines if ln.startswith(("E:", "ERROR:"))), lines[-1])
        hint = " (no network to the package mirrors?)" if "connect" in first.lower() else ""
        raise UserError(f"aarch64 setup: {what} failed: {first}{hint}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=default_root(), help="default: %(default)s")
    parser.add_argument("--cpu", default="neoverse-n1", choices=sorted(MIDR))
    parser.add_argument("--prepare", action="store_true", help="create ROOT/rootfs and ROOT/site first")
    args = parser.parse_args()
    try:
        if args.prepare:
            prepare(args.root)
        print(json.dumps(compare(args.root, args.cpu), indent=2))
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
