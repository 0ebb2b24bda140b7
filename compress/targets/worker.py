"""What runs inside a target's environment: this file alone, with numpy and onnxruntime, no edge-compress.

    python worker.py JOB_DIR

The same file runs natively, under qemu-x86_64 / qemu-aarch64, and inside a Docker image, so the figures
of every target come from one code path. JOB_DIR holds job.json, the models, the inputs (npz) and, for
models with our attention ops, the native kernel library for the target's architecture. Paths in
job.json are relative to JOB_DIR. Modes:

- probe: what the environment is (machine, ONNX Runtime version, CPU features, the library's ISA).
- evaluate: each role's model on the evaluation batches (outputs.npz), its cold start (session creation),
  then timing interleaved across roles (warm-up, then `runs` rounds), every sample kept.
- memory: one role in this fresh process: peak resident memory (VmHWM) after a few runs, and the graph
  ONNX Runtime optimized the model into (optimized.onnx, whose kernels the host counts).

Progress goes to stdout as "progress PHASE DONE TOTAL" lines; the last stdout line is the result JSON.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _hwm() -> int:
    """Peak resident set (VmHWM) of this process in bytes; ru_maxrss is inherited across fork+exec."""
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _progress(phase: str, done: int, total: int) -> None:
    print(f"progress {phase} {done} {total}", flush=True)


def _library_isa(path: Path) -> str | None:
    import ctypes

    lib = ctypes.CDLL(str(path))
    lib.EdgeCompressOpsIsa.restype = ctypes.c_char_p
    return str(lib.EdgeCompressOpsIsa().decode())


def _session(job_dir: Path, job: dict[str, Any], role: str, optimized: Path | None = None) -> Any:
    import onnxruntime as ort

    settings = job["settings"].get(role, {})
    so = ort.SessionOptions()
    so.intra_op_num_threads = job["threads"]
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Threads spin during a run and stop at its end, as in the server: idle spinning threads of models timed
    # in turn on few cores would steal each other's cores (compress/runtime/session.py).
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if job.get("library"):
        so.register_custom_ops_library(str(job_dir / job["library"]))
    for key, value in settings.get("config_entries", {}).items():
        so.add_session_config_entry(key, str(value))
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(
        str(job_dir / job["models"][role]),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(settings.get("disabled_optimizers", [])),
    )


def _cpu_features() -> list[str]:
    """The CPU features ONNX Runtime will see: aarch64 from the aux vector, x86-64 from cpuinfo's flags."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        for line in text.splitlines():
            if line.startswith("Features"):
                return line.split(":", 1)[1].split()
        return []
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    for line in text.splitlines():
        if line.startswith("flags"):
            wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c")
            return [f for f in line.split(":", 1)[1].split() if f in wanted]
    return []


def probe(job_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    out: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "cpu_features": _cpu_features(),
    }
    if job.get("library"):
        out["library_isa"] = _library_isa(job_dir / job["library"])
    return out


def evaluate(job_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    out = probe(job_dir, job)
    roles = list(job["roles"])
    batches = np.load(job_dir / "batches.npz")
    count = job["batches"]
    sessions, cold = {}, {}
    for role in roles:
        start = time.perf_counter()
        sessions[role] = _session(job_dir, job, role)
        cold[role] = (time.perf_counter() - start) * 1000.0
    outputs: dict[str, Any] = {}
    for role in roles:
        chunks = []
        for i in range(count):
            feeds = {name: batches[f"b{i}/{name}"] for name in job["inputs"]}
            chunks.append(sessions[role].run(None, feeds)[0])
            _progress(f"evaluate:{role}", i + 1, count)
        length = job.get("output_length")  # per-token outputs (B, S, L): zero-padded to one S across batches
        if length and chunks and chunks[0].ndim == 3:
            chunks = [np.pad(c, ((0, 0), (0, length - c.shape[1]), (0, 0))) for c in chunks]
        outputs[role] = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
    np.savez(job_dir / "outputs.npz", **outputs)

    timing = np.load(job_dir / "timing.npz")
    feeds = {name: timing[name] for name in job["inputs"]}
    for role in roles:
        for _ in range(job["warmup"]):
            sessions[role].run(None, feeds)
    samples: dict[str, list[float]] = {role: [] for role in roles}
    for round_ in range(job["runs"]):
        for role in roles:
            start = time.perf_counter()
            sessions[role].run(None, feeds)
            samples[role].append((time.perf_counter() - start) * 1000.0)
        _progress("timing", round_ + 1, job["runs"])
    out.update({"cold_start_ms": cold, "latency_samples_ms": samples})
    return out


def memory(job_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    role = job["roles"][0]
    base = _hwm()
    optimized = job_dir / f"optimized_{role}.onnx"
    start = time.perf_counter()
    sess = _session(job_dir, job, role, optimized=optimized if job.get("optimized_graph") else None)
    cold = (time.perf_counter() - start) * 1000.0
    timing = np.load(job_dir / "timing.npz")
    feeds = {name: timing[name] for name in job["inputs"]}
    for _ in range(job.get("memory_runs", 3)):
        sess.run(None, feeds)
    return {
        "peak_rss_bytes": _hwm(),
        "runtime_baseline_rss_bytes": base,
        "cold_start_ms": cold,
        "optimized_graph": optimized.name if job.get("optimized_graph") else None,
    }


MODES = {"probe": probe, "evaluate": evaluate, "memory": memory}


def main() -> None:
    job_dir = Path(sys.argv[1])
    job = json.loads((job_dir / "job.json").read_text())
    os.environ.setdefault("OMP_NUM_THREADS", str(job.get("threads", 1)))
    result = MODES[job["mode"]](job_dir, job)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
