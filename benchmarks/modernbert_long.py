"""Benchmark: a ModernBERT-base-shaped encoder at long lengths, our export against the dense masked export
(issue 23).

    .venv/bin/python benchmarks/modernbert_long.py [--runs N] [--lengths 2048 4096 8192]

No trained ModernBERT is reachable offline, so the model is ModernBERT-base's shape with random weights
(seeded): 22 layers, hidden 768, 12 heads, GLU 1152, local_attention 128 (one side 64), every third
layer global, 8,192 positions. Random weights time exactly like trained ones (the work does not depend
on the values); they say nothing about accuracy, which the export's parity covers.

Side by side in one run, batch 1, 2 threads, no thread spinning, no memory arena (so that peak memory
is what a run needs), interleaved medians:
- dense masked: what a user gets today from torch.onnx / Optimum (and from us with `dense_attention:
  true`): the torchscript export of transformers' forward, every layer's scores S x S under a mask;
- ours: the export stage's default, the 14 local layers as ai.edgecompress::WindowedAttention with the
  native kernels (the 8 global layers stay dense, as the model is);
- outputs compared (max |ours - dense| over the sequence), and against PyTorch at the shortest length;
- peak memory of one run in a fresh process: the resident-set peak during the run (reset after loading
  through /proc/self/clear_refs) over the resident set before it, with glibc told to map large blocks
  on their own (freed memory leaves the resident set) and to return what loading freed (malloc_trim).
  `--part memory` reruns this part alone; each part's figures are kept in modernbert_long.json.

Writes benchmarks/results/modernbert_long.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "modernbert_long.md"
STORE = RESULTS.with_suffix(".json")  # each part's figures, so that one part can be rerun alone
LENGTHS = (2048, 4096, 8192)
VOCAB = 50368
TARGET_SPEEDUP = 2.5
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 768,
    "num_hidden_layers": 22,
    "num_attention_heads": 12,
    "intermediate_size": 1152,
    "max_position_embeddings": 8192,
    "local_attention": 128,
    "global_attn_every_n_layers": 3,
    "pad_token_id": 50283,
    "bos_token_id": 50281,
    "eos_token_id": 50282,
    "cls_token_id": 50281,
    "sep_token_id": 50282,
    "attn_implementation": "eager",
}

_PEAK = """
import ctypes, json, sys, numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[4])
from exporters import native
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, s, with_native = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.enable_cpu_mem_arena = False
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
if with_native:
    native.register(so)
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
ids = np.random.default_rng(s).integers(5, 50000, (1, s)).astype(np.int64)
feeds = {"input_ids": ids, "attention_mask": np.ones((1, s), np.int64)}
ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed while loading goes back to the system
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak so far (loading the model) is forgotten
sess.run(None, feeds)
print(json.dumps({"peak_bytes": status("VmHWM:") - base}))
"""


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


class _Outputs:
    """Builds the module both exports start from: (input_ids, attention_mask) -> last_hidden_state."""

    @staticmethod
    def build() -> Any:
        import torch
        from transformers import ModernBertConfig, ModernBertModel

        torch.manual_seed(0)
        model = ModernBertModel(ModernBertConfig(**SHAPE)).eval()

        class Outputs(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return Outputs().eval()


def _feeds(s: int, batch: int = 1) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(s).integers(5, 50000, (batch, s)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, s), np.int64)}


def export_both(out: Path) -> tuple[dict[str, Path], Any]:
    """The dense masked export and ours of the same module; (paths, the module)."""
    from exporters import onnx_export
    from exporters.modernbert import export_modernbert

    out.mkdir(parents=True, exist_ok=True)
    module = _Outputs.build()
    example = _feeds(300, batch=2)  # longer than the window, so nothing specialises on a short length
    paths = {"dense masked": out / "dense.onnx", "ours": out / "ours.onnx"}
    _log("exporting: dense masked (torchscript, transformers' masks)")
    onnx_export.export(
        module, example=example, path=paths["dense masked"], output_names=("last_hidden_state",),
        exporter="torchscript", opset=17, per_token=True,
    )  # fmt: skip
    _log("exporting: ours (dynamo, local layers as WindowedAttention)")
    export_modernbert(module, paths["ours"], example=example)
    return paths, module


def _session(path: Path, with_native: bool) -> Any:
    import onnxruntime as ort

    from exporters import native

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if with_native and not native.register(so):
        raise SystemExit("the native kernel library is not built: run `edge-compress build-ops`")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency(paths: dict[str, Path], module: Any, lengths: list[int], runs: int) -> dict[int, dict[str, float]]:
    """Interleaved rounds per length: each round runs every variant once; medians in ms, and the outputs' diff."""
    import torch

    sessions = {"dense masked": _session(paths["dense masked"], False), "ours": _session(paths["ours"], True)}
    results: dict[int, dict[str, float]] = {}
    for s in lengths:
        feeds = _feeds(s)
        outputs = {name: sess.run(None, feeds)[0] for name, sess in sessions.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(runs):
            for name, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
            _log(f"S={s} round {r + 1}/{runs}: " + ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items()))
        results[s] = {name: float(np.median(t)) for name, t in times.items()}
        results[s]["max_diff"] = float(np.abs(outputs["ours"] - outputs["dense masked"]).max())
        if s == min(lengths):
            with torch.no_grad():
                want = module(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask"))).numpy()
            results[s]["max_diff_torch"] = float(np.abs(outputs["ours"] - want).max())
    return results


def peak_memory(paths: dict[str, Path], lengths: list[int]) -> dict[int, dict[str, float]]:
    peaks: dict[int, dict[str, float]] = {}
    for s in lengths:
        peaks[s] = {}
        for name, path in paths.items():
            args = [sys.executable, "-c", _PEAK, str(path), str(s), "1" if name == "ours" else "0", str(ROOT)]
            # Large blocks are mmap'd and unmapped when freed, so the resident set follows what is live.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            done = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
            peaks[s][name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
        _log(f"S={s} peak MiB: " + ", ".join(f"{n} {p:.0f}" for n, p in peaks[s].items()))
    return peaks


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write(store: dict[str, Any]) -> str:
    """The markdown table from both parts' figures (JSON keys are strings)."""
    results = {int(k): v for k, v in store["latency"]["results"].items()}
    peaks = {int(k): v for k, v in store["memory"]["results"].items()}
    lengths = sorted(results)
    longest = lengths[-1]
    lat, mem = store["latency"], store["memory"]
    lines = [
        "# ModernBERT-base shape at long lengths: our export vs the dense masked export (issue 23)",
        "",
        f"Latency: `.venv/bin/python benchmarks/modernbert_long.py {lat['command']}` on {lat['cpu']}, {lat['date']}; "
        f"peak memory: `... {mem['command']}` on {mem['cpu']}, {mem['date']}. Random-init ModernBERT-base shape "
        "(22 layers, 768 wide, 12 heads, local_attention 128, every third layer global: 14 local + 8 global), "
        "batch 1, all tokens real, 2 threads, no spinning, no memory arena; medians of interleaved rounds.",
        "",
        "| S | dense masked ms | ours ms | speedup | max abs diff ours vs dense | peak MiB dense | peak MiB ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in lengths:
        r, p = results[s], peaks.get(s, {})
        lines.append(
            f"| {s} | {r['dense masked']:.0f} | {r['ours']:.0f} | {r['dense masked'] / r['ours']:.2f}x | "
            f"{r['max_diff']:.1e} | {p.get('dense masked', float('nan')):.0f} | {p.get('ours', float('nan')):.0f} |"
        )
    speedup = results[longest]["dense masked"] / results[longest]["ours"]
    met = "met" if speedup >= TARGET_SPEEDUP else "**not met**"
    target = f"- ours vs dense masked at S={longest} >= {TARGET_SPEEDUP}x: **{speedup:.2f}x** ({met})"
    lines += ["", "## Targets", "", target]
    if "max_diff_torch" in results[lengths[0]]:
        lines.append(f"- ours vs PyTorch at S={lengths[0]}: max abs diff {results[lengths[0]]['max_diff_torch']:.1e}")
    pairs = [(a, b) for a, b in itertools.pairwise(lengths) if a in peaks and b in peaks]
    if pairs:
        ratios = ", ".join(
            f"{b}/{a}: {peaks[b]['ours'] / peaks[a]['ours']:.2f} "
            f"(dense {peaks[b]['dense masked'] / peaks[a]['dense masked']:.2f})"
            for a, b in pairs
        )
        lines.append(f"- peak memory growth per doubling of S, ours (dense): {ratios}; 2.0 is linear, 4.0 quadratic")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--part", choices=("all", "latency", "memory"), default="all")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge-compress" / "bench-modernbert")
    args = parser.parse_args()
    lengths = sorted(args.lengths)
    paths, module = export_both(args.work)
    store = json.loads(STORE.read_text()) if STORE.is_file() else {}
    stamp = {"cpu": _cpu(), "date": f"{datetime.now(UTC):%Y-%m-%d}", "command": " ".join(sys.argv[1:])}
    if args.part in ("all", "latency"):
        store["latency"] = {**stamp, "runs": args.runs, "results": latency(paths, module, lengths, args.runs)}
    if args.part in ("all", "memory"):
        store["memory"] = {**stamp, "results": peak_memory(paths, lengths)}
    STORE.write_text(json.dumps(store, indent=1))
    if "latency" not in store or "memory" not in store:
        raise SystemExit(f"{STORE} holds one part; run the other (--part) to write the table")
    text = write(store)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
