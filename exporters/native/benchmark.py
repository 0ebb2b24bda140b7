"""Performance sanity of the native WindowedAttention (not a test): banded vs dense masked attention in ORT.

    python -m exporters.native.benchmark [--threads N] [--repeat N]

At B=1, H=4, D=64, window 256 it times the native op at S=4096 and 8192, and at S=4096 the same attention
written as a dense S x S masked graph (MatMul, Where, Softmax, MatMul: what an exporter without the op
emits). Prints min-of-N latencies, the speed-up at 4096 and t(8192) / t(4096). Runs are interleaved so
that a busy machine slows both sides alike.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from exporters.native import register

HEADS, HEAD_DIM, WINDOW = 4, 64, 256


def _windowed_model() -> Any:
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, HEADS, "S", HEAD_DIM]) for n in "QKV"]
    node = helper.make_node("WindowedAttention", ["Q", "K", "V"], ["Y"], domain="ai.edgecompress", window=WINDOW)
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, HEADS, "S", HEAD_DIM])
    graph = helper.make_graph([node], "windowed", inputs, [output])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("ai.edgecompress", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _dense_model() -> Any:
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, HEADS, "S", HEAD_DIM]) for n in "QKV"]
    inputs.append(helper.make_tensor_value_info("allowed", TensorProto.BOOL, ["S", "S"]))
    nodes = [
        helper.make_node("Transpose", ["K"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "kt"], ["raw"]),  # (1, H, S, S)
        helper.make_node("Mul", ["raw", "scale"], ["scores"]),
        helper.make_node("Where", ["allowed", "scores", "masked"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "V"], ["Y"]),
    ]
    consts = [
        numpy_helper.from_array(np.array(1 / math.sqrt(HEAD_DIM), np.float32), "scale"),
        numpy_helper.from_array(np.array(-1e9, np.float32), "masked"),
    ]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, HEADS, "S", HEAD_DIM])
    graph = helper.make_graph(nodes, "dense", inputs, [output], initializer=consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    if not register(options):
        raise SystemExit("the native ops are not built: run `edge-compress build-ops` first")
    native = ort.InferenceSession(_windowed_model().SerializeToString(), options, providers=["CPUExecutionProvider"])
    dense = ort.InferenceSession(_dense_model().SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    feeds = {}
    for s in (4096, 8192):
        q, k, v = (rng.standard_normal((1, HEADS, s, HEAD_DIM), dtype=np.float32) for _ in range(3))
        feeds[s] = {"Q": q, "K": k, "V": v}
    pos = np.arange(4096)
    dense_feed = dict(feeds[4096], allowed=np.abs(pos[:, None] - pos[None, :]) <= WINDOW)

    runs: list[tuple[str, Any, dict[str, np.ndarray]]] = [
        ("native S=4096", native, feeds[4096]),
        ("native S=8192", native, feeds[8192]),
        ("dense  S=4096", dense, dense_feed),
    ]
    best = {name: math.inf for name, _, _ in runs}
    for _, sess, feed in runs:  # warm-up
        sess.run(None, feed)
    for _ in range(args.repeat):
        for name, sess, feed in runs:
            start = time.perf_counter()
            sess.run(None, feed)
            best[name] = min(best[name], time.perf_counter() - start)
    out = native.run(None, feeds[4096])[0]
    ref = dense.run(None, dense_feed)[0]
    for name, seconds in best.items():
        print(f"{name}: {seconds * 1e3:8.1f} ms (min of {args.repeat})")
    print(f"dense / native at S=4096: {best['dense  S=4096'] / best['native S=4096']:.1f}x")
    print(f"native t(8192) / t(4096): {best['native S=8192'] / best['native S=4096']:.2f}")
    print(f"max |native - dense| at S=4096: {float(np.abs(out - ref).max()):.2e}")


if __name__ == "__main__":
    main()
