"""Latency and memory, measured so that variants can be compared on a noisy shared machine.

Variants are timed interleaved (one run of each in turn, many rounds), so drift in the machine's
load hits all of them alike; we report percentiles and ratios of medians.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def interleaved(
    runners: dict[str, Callable[[], object]],
    warmup: int,
    runs: int,
    items_per_run: int = 1,
    on_round: Callable[[], object] | None = None,
) -> dict[str, dict[str, float]]:
    """Time each runner `runs` times, interleaved round by round, after `warmup` untimed calls each.

    on_round is called after each round (a progress bar's advance).
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000.0)
        if on_round is not None:
            on_round()
    return {name: summarize(values, items_per_run) for name, values in samples.items()}


def summarize(ms: list[float], items_per_run: int = 1) -> dict[str, float]:
    arr = np.asarray(ms)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "runs": len(ms),
        "throughput_per_s": float(items_per_run * 1000.0 / arr.mean()),
    }


# VmHWM, not ru_maxrss: on Linux a fork()ed child inherits its parent's ru_maxrss across exec().
_PEAK_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
args = json.loads(sys.argv[1])
base = hwm()
so = ort.SessionOptions(); so.intra_op_num_threads = args["threads"]; so.log_severity_level = 3
for k, v in args["settings"].get("config_entries", {}).items():
    so.add_session_config_entry(k, str(v))
sess = ort.InferenceSession(args["model"], so, providers=["CPUExecutionProvider"],
                            disabled_optimizers=args["settings"].get("disabled_optimizers", []))
feeds = {k: np.asarray(v, dtype=np.int64) for k, v in args["feeds"].items()}
for _ in range(3):
    sess.run(None, feeds)
print(json.dumps({"peak_rss_bytes": hwm(), "runtime_baseline_rss_bytes": base}))
"""


def peak_memory(model: Path, feeds: dict[str, np.ndarray], threads: int, settings: dict[str, Any]) -> dict[str, int]:
    """Peak resident memory of a fresh process that loads the model in ONNX Runtime and runs it."""
    payload = json.dumps(
        {
            "model": str(model),
            "threads": threads,
            "settings": settings,
            "feeds": {k: v.tolist() for k, v in feeds.items()},
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, payload],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"peak-memory probe failed: {tail}")
    out: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out
