"""Which kernels ONNX Runtime really runs: count int8 and float compute ops in its optimized graph.

A quantized file is not proof of int8 execution: ONNX Runtime's graph optimizer can rewrite QDQ
pairs away (e.g. MatMulAddFusion, docs/notes/quantization-facts.md), so we read the graph the
session ends up with.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from compress.runtime.session import session

INT8_OPS = frozenset(
    {
        "QAttention",
        "QEmbedLayerNormalization",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulInteger",
        "QLinearMatMul",
        "QGemm",
        "QLinearConv",
        "ConvInteger",
        "DynamicQuantizeLSTM",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSoftmax",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearConcat",
    }
)
# Ops that do the bulk of a transformer's arithmetic; still present after quantization they run in float.
FLOAT_COMPUTE_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "Attention", "MultiHeadAttention", "Conv"})


def count_kernels(model: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Op counts of the graph an ONNX Runtime session optimizes `model` into, split int8 / float compute."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-kernels-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(model, threads=1, settings=settings, optimized_path=optimized)
        return dict(kernels_of(optimized)["counts"])


def kernels_of(optimized: Path) -> dict[str, Any]:
    """The int8 / float compute kernels of a graph ONNX Runtime optimized (optimized_model_filepath).

    counts: op counts split int8 / float; nodes: [name, op, "int8" | "float" | "custom"] in graph order
    (the quantized/float node map of the report; custom: our attention ops, which stay float).
    """
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    int8 = {op: n for op, n in sorted(ops.items()) if op in INT8_OPS}
    flt = {op: n for op, n in sorted(ops.items()) if op in FLOAT_COMPUTE_OPS}
    nodes = []
    for node in graph.node:
        if node.op_type in INT8_OPS:
            nodes.append([node.name, node.op_type, "int8"])
        elif node.op_type in FLOAT_COMPUTE_OPS:
            nodes.append([node.name, node.op_type, "float"])
        elif node.domain == "ai.edgecompress":
            nodes.append([node.name, node.op_type, "custom"])
    counts = {"int8": int8, "float": flt, "int8_total": sum(int8.values()), "float_total": sum(flt.values())}
    return {"counts": counts, "nodes": nodes}
