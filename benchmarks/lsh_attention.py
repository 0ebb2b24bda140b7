"""Benchmark: our LSHAttention op (Reformer) in ONNX Runtime, side by side (issue 23).

    .venv/bin/python benchmarks/lsh_attention.py [--runs N]

One run, B=1, H=4, D=64, chunk 64, 2 hashing rounds, 32 buckets (one model's settings at every length),
2 threads, interleaved medians, S = 2048, 4096, 8192:
- ORT: the native LSHAttention kernel vs dense attention as MatMul/Softmax with the key-padding mask
  (what a user gets from a dense export) vs our op's function body (the portable fallback);
- PyTorch: the zoo's reference (compress.models.lsh.lsh_attention) and PyTorch's fused dense
  scaled_dot_product_attention, what a user of a dense PyTorch model runs;
- time per token of the native op (flat = linear in S) and peak memory (VmHWM of a fresh process).

Writes benchmarks/results/lsh_attention.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.attention_ops import _cpu, _kernel_isa, _log, _median_ms, _session  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lsh_attention.md"
B, H, D, CHUNK, HASHES, BUCKETS = 1, 4, 64, 64, 2, 32
LENGTHS = (2048, 4096, 8192)

_PEAK = """
import json, sys, numpy as np, onnxruntime as ort
from exporters import native
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
path, s, use_native = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
so = ort.SessionOptions(); so.intra_op_num_threads = 2
if use_native:
    assert native.register(so)
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
qk, v = (rng.standard_normal((1, 4, s, 64)).astype(np.float32) for _ in range(2))
base = hwm()
sess.run(None, {"QK": qk, "V": v, "m": np.ones((1, s), bool)})
print(json.dumps({"peak_bytes": hwm() - base}))
"""


def _models(out: Path) -> dict[str, Path]:
    """The op as one node (its rotations a constant) and dense attention with the padding mask."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from compress.models.attention import AttentionConfig
    from compress.models.lsh import rotations
    from exporters.ops import DOMAIN, attach_functions

    out.mkdir(parents=True, exist_ok=True)
    pair = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, H, "S", D]) for n in ("QK", "V")]
    mask = helper.make_tensor_value_info("m", TensorProto.BOOL, [B, "S"])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [B, H, "S", D])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    rot = rotations(AttentionConfig("lsh", chunk=CHUNK, n_hashes=HASHES, buckets=BUCKETS), D)
    node = helper.make_node("LSHAttention", ["QK", "V", "m", "R"], ["Y"], domain=DOMAIN, chunk=CHUNK)
    graph = helper.make_graph([node], "op", [*pair, mask], [y], initializer=[numpy_helper.from_array(rot.numpy(), "R")])
    op_model = helper.make_model(graph, opset_imports=opsets)
    attach_functions(op_model)
    c = helper.make_node
    nodes = [
        c("Unsqueeze", ["m", "ax12"], ["mk"]),
        c("Where", ["mk", "fzero", "neg"], ["bias"]),
        c("Transpose", ["QK"], ["kt"], perm=[0, 1, 3, 2]),
        c("MatMul", ["QK", "kt"], ["raw"]),
        c("Mul", ["raw", "scale"], ["scaled"]),
        c("Add", ["scaled", "bias"], ["scores"]),
        c("Softmax", ["scores"], ["p"], axis=-1),
        c("MatMul", ["p", "V"], ["Y"]),
    ]
    consts = [
        helper.make_tensor("ax12", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("fzero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("neg", TensorProto.FLOAT, [], [-1e9]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(D)]),
    ]
    dense = helper.make_model(
        helper.make_graph(nodes, "dense", [*pair, mask], [y], initializer=consts), opset_imports=opsets[:1]
    )
    paths = {"op": out / "lsh_op.onnx", "dense": out / "dense_masked.onnx"}
    onnx.save(op_model, str(paths["op"]))
    onnx.save(dense, str(paths["dense"]))
    return paths


def latency(paths: dict[str, Path], runs: int) -> dict[int, dict[str, float]]:
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    from compress.models.lsh import lsh_attention

    torch.set_num_threads(2)
    rot = torch.from_numpy(numpy_helper.to_array(onnx.load(str(paths["op"])).graph.initializer[0]).copy())
    sessions = {
        "function body": _session(paths["op"], native=False),
        "dense masked": _session(paths["dense"], native=False),
        "native": _session(paths["op"], native=True),
    }
    results: dict[int, dict[str, float]] = {}
    for s in LENGTHS:
        rng = np.random.default_rng(s)
        qk, v = (rng.standard_normal((B, H, s, D)).astype(np.float32) for _ in range(2))
        feeds = {"QK": qk, "V": v, "m": np.ones((B, s), dtype=bool)}
        tqk, tv, tm = (torch.from_numpy(feeds[n]) for n in ("QK", "V", "m"))

        def reference(tqk: Any = tqk, tv: Any = tv, tm: Any = tm) -> Any:
            with torch.no_grad():
                return lsh_attention(tqk, tv, tm, rot, chunk=CHUNK, causal=False)

        def sdpa(tqk: Any = tqk, tv: Any = tv) -> Any:
            with torch.no_grad():
                return F.scaled_dot_product_attention(tqk, tqk, tv)

        calls: dict[str, Any] = {"PyTorch LSH reference": reference, "PyTorch dense SDPA": sdpa}
        calls.update({name: (lambda sess=sess, feeds=feeds: sess.run(None, feeds)) for name, sess in sessions.items()})
        n = runs if s <= 4096 else max(5, runs // 2)
        _log(f"S={s}: {n} interleaved rounds")
        results[s] = _median_ms(calls, n)
        native_out = sessions["native"].run(None, feeds)[0]
        results[s]["max_diff_native_vs_reference"] = float(np.abs(native_out - reference().numpy()).max())
    return results


def peak_memory(paths: dict[str, Path]) -> dict[int, dict[str, float]]:
    peaks: dict[int, dict[str, float]] = {}
    for s in LENGTHS:
        peaks[s] = {}
        for name, path, use_native in (("native", paths["op"], "1"), ("dense", paths["dense"], "0")):
            done = subprocess.run(
                [sys.executable, "-c", _PEAK, str(path), str(s), use_native],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            peaks[s][name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
    return peaks


def report(lat: dict[int, dict[str, float]], peaks: dict[int, dict[str, float]], runs: int) -> list[str]:
    lines = [
        "# LSHAttention in ONNX Runtime (issue 23)",
        "",
        f"`.venv/bin/python benchmarks/lsh_attention.py --runs {runs}` on {_cpu()} ({_kernel_isa()} kernels), "
        f"{datetime.now(UTC):%Y-%m-%d}. B={B}, H={H}, D={D}, chunk {CHUNK}, {HASHES} rounds, {BUCKETS} buckets, "
        "2 threads, no thread spinning; medians of interleaved rounds.",
        "",
        "| S | native op ms | function body ms | dense masked (ORT) ms | PyTorch LSH ms | PyTorch dense SDPA ms | "
        "dense / native | native µs per token | max diff native vs PyTorch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, r in lat.items():
        lines.append(
            f"| {s} | {r['native']:.2f} | {r['function body']:.2f} | {r['dense masked']:.2f} | "
            f"{r['PyTorch LSH reference']:.2f} | {r['PyTorch dense SDPA']:.2f} | "
            f"{r['dense masked'] / r['native']:.1f}x | {1e3 * r['native'] / s:.2f} | "
            f"{r['max_diff_native_vs_reference']:.1e} |"
        )
    lines += ["", "Peak memory of one run in a fresh process (VmHWM growth, MiB):", ""]
    lines += ["| S | native op | dense masked |", "|---|---|---|"]
    lines += [f"| {s} | {p['native']:.0f} | {p['dense']:.0f} |" for s, p in peaks.items()]
    speed = lat[8192]["dense masked"] / lat[8192]["native"]
    flat = (lat[8192]["native"] / 8192) / (lat[2048]["native"] / 2048)
    sdpa = lat[8192]["PyTorch dense SDPA"] / lat[8192]["native"]
    lines += [
        "",
        "## Targets",
        "",
        f"- native vs dense masked (ORT) at S=8192 >= 5x: **{speed:.1f}x** ({'met' if speed >= 5 else 'NOT met'})",
        f"- time per token flat from 2048 to 8192 within 1.3x: **{flat:.2f}** ({'met' if flat <= 1.3 else 'NOT met'})",
        f"- for reference, PyTorch's fused dense kernel / native at S=8192: {sdpa:.1f}x",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    paths = _models(ROOT / "build" / "bench_lsh_attention")
    lat = latency(paths, args.runs)
    _log("peak memory (fresh processes)")
    peaks = peak_memory(paths)
    lines = report(lat, peaks, args.runs)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
