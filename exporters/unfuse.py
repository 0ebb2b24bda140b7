"""Undo two of ONNX Runtime's fusions in a graph: SkipLayerNormalization and BiasGelu into their parts.

A fused node is not faster on every CPU. Measured on an Intel Xeon (AVX-512 VNNI, AMX), 2 threads, the
int8 all-MiniLM-L6-v2 at 128 tokens: the 12 SkipLayerNormalization nodes took 2.0 ms of 8.1 ms, the
Add + Add + LayerNormalization they stand for 1.1 ms. Whether to split is measured on the CPU that
builds the artifact (compress/stages/quantize/tuning.py); this module only rewrites graphs.

ONNX Runtime's session optimizer fuses the parts back unless told not to: each rewrite names the
optimizer to disable (the session settings' `disabled_optimizers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ONNX's LayerNormalization exists from opset 17.
LAYER_NORM_OPSET = 17


@dataclass(frozen=True)
class Rewrite:
    name: str
    op_type: str  # the fused op it splits
    disables: str  # ONNX Runtime's session optimizer that would fuse the parts again
    split: Callable[[Any, Any], list[Any]]  # (node, model) -> the nodes that replace it


def _attr(node: Any, name: str, default: float) -> float:
    return next((a.f for a in node.attribute if a.name == name), default)


def _optional(node: Any, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _split_skip_layer_norm(node: Any, model: Any) -> list[Any]:
    """SkipLayerNormalization(x, skip, gamma, beta?, bias?) -> [Add(x, bias) ->] Add(., skip) -> LayerNormalization.

    The bias is added to x first, as the model computes it (x is a projection's product, skip the residual):
    ONNX Runtime then folds that Add into the int8 MatMul that makes x (DynamicQuantizeMatMul's bias input),
    one node fewer per split (measured on all-MiniLM-L6-v2 int8, AMD Zen 5, 2 threads: 12 of 24 Adds gone,
    about 2% of the run). Its fourth output (the sum before normalizing) is the last Add's output when a later
    node reads it."""
    from onnx import helper

    used = _read_names(model)
    if any(name and name in used for name in node.output[1:3]):
        raise ValueError(f"{node.name}: its mean / inverse-variance outputs are read; it cannot be split")
    summed = node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.name}/sum"
    x, bias = node.input[0], _optional(node, 4)
    nodes = []
    if bias:
        nodes.append(helper.make_node("Add", [x, bias], [f"{node.name}/biased"], name=f"{node.name}/AddBias"))
        x = f"{node.name}/biased"
    nodes.append(helper.make_node("Add", [x, node.input[1]], [summed], name=f"{node.name}/Add"))
    inputs = [summed, node.input[2]] + ([_optional(node, 3)] if _optional(node, 3) else [])
    epsilon = _attr(node, "epsilon", 1e-12)
    nodes.append(
        helper.make_node(
            "LayerNormalization", inputs, [node.output[0]], name=f"{node.name}/LayerNorm", axis=-1, epsilon=epsilon
        )
    )
    return nodes


def _split_bias_gelu(node: Any, model: Any) -> list[Any]:  # noqa: ARG001 (every rewrite takes the model)
    """BiasGelu(x, bias) -> Add(x, bias) -> Gelu (com.microsoft, exact erf form, as BiasGelu computes)."""
    from onnx import helper

    summed = f"{node.name}/biased"
    return [
        helper.make_node("Add", [node.input[0], node.input[1]], [summed], name=f"{node.name}/Add"),
        helper.make_node("Gelu", [summed], [node.output[0]], name=f"{node.name}/Gelu", domain="com.microsoft"),
    ]


REWRITES: dict[str, Rewrite] = {
    "skip_layer_norm": Rewrite(
        "skip_layer_norm", "SkipLayerNormalization", "SkipLayerNormFusion", _split_skip_layer_norm
    ),
    "bias_gelu": Rewrite("bias_gelu", "BiasGelu", "BiasGeluFusion", _split_bias_gelu),
}


def _read_names(model: Any) -> set[str]:
    graph = model.graph
    return {name for node in graph.node for name in node.input} | {out.name for out in graph.output}


def applicable(model: Any, name: str) -> int:
    """How many nodes the rewrite would split; 0 when the graph has none or its opset lacks the parts."""
    rewrite = REWRITES[name]
    if rewrite.op_type == "SkipLayerNormalization" and _default_opset(model) < LAYER_NORM_OPSET:
        return 0
    return sum(1 for node in model.graph.node if node.op_type == rewrite.op_type and node.domain == "com.microsoft")


def split(model: Any, names: tuple[str, ...]) -> dict[str, int]:
    """Split, in place, every node of the named rewrites; returns the nodes split per rewrite."""
    by_op = {REWRITES[n].op_type: REWRITES[n] for n in names if applicable(model, n)}
    counts = {rewrite.name: 0 for rewrite in by_op.values()}
    rebuilt = []
    for node in model.graph.node:
        rewrite = by_op.get(node.op_type) if node.domain == "com.microsoft" else None
        if rewrite is None:
            rebuilt.append(node)
            continue
        rebuilt.extend(rewrite.split(node, model))
        counts[rewrite.name] += 1
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    return counts


def disabled_optimizers(names: tuple[str, ...]) -> list[str]:
    return [REWRITES[n].disables for n in names]


def _default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
