"""One-pass sensitivity: how much each quantizable node's int8 version changes what it computes.

Each candidate node gets a side branch in a copy of the fp32 graph that computes its int8 version from the
very same inputs, the way ONNX Runtime's quantizer will run it: weights int8 per output channel (or per
tensor), symmetric; activations uint8 through DynamicQuantizeLinear (the range of each run: dynamic) or
QuantizeLinear with the calibrated range (static). The branch sums, per output channel, the squared
difference to the float result and the float result's square. One run of this graph per text (batch 1, as
deployed) measures every node at once: the cost is about two fp32 runs of the texts, and no quantized
model is built. (The same in numpy took 40x longer here: its BLAS threads and ONNX Runtime's starve each
other on 2 shared cores.)

A node's score is the root of the mean, over its output channels (the last axis), of each channel's
noise-to-signal power, each capped at 1 (a channel can be no more than destroyed), averaged over texts.
Per channel, because outlier-heavy encoders carry "massive activations" (Sun et al. 2024,
arXiv:2402.17762): a few channels on a few tokens up to 100x the rest. An FFN output projection of
all-mpnet-base-v2 whose input holds them loses half of every ordinary channel's signal to the coarse
uint8 steps, yet its error over the whole tensor is 3%, since the massive channels dominate the norm.
Ranked by the whole-tensor ratio, 48 of 72 nodes had to stay float for cosine 0.99; ranked per channel, 5
(docs/notes/quantization-facts.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compress.errors import StageFailed
from compress.runtime.session import session

Batch = dict[str, np.ndarray]
# Ops whose int8 version is emulated here; any other candidate is ranked after them, in graph order.
EMULATED_OPS = ("MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization")
ACTIVATION_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
PREFIX = "edge_compress_sensitivity"


@dataclass(frozen=True)
class Int8Spec:
    """How the quantizer will quantize (the stage's resolved types)."""

    per_channel: bool
    reduce_range: bool
    weight_type: Literal["int8", "uint8"]
    activation_type: Literal["uint8", "int8"] = "uint8"
    # static: calibrated (min, max) per activation tensor; None: dynamic (the range of each run)
    ranges: Mapping[str, tuple[float, float]] | None = None


@dataclass(frozen=True)
class NodeScore:
    node: str
    op: str
    score: float | None  # None: no int8 emulation for this op

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "sensitivity": self.score}


@dataclass(frozen=True)
class Sensitivity:
    ranking: tuple[NodeScore, ...]  # most sensitive first
    outputs: tuple[np.ndarray, ...]  # the fp32 model's first output, per text: the reference for fidelity
    texts: int
    seconds: float


def measure(
    model: Path, candidates: Iterable[str], batches: Iterable[Batch], spec: Int8Spec, work_dir: Path
) -> Sensitivity:
    """Rank `candidates` (node names) by their int8 error on `batches` (one text each)."""
    import onnx

    started = time.perf_counter()
    proto = onnx.load(str(model))
    wanted = list(candidates)
    ops = {node.name: node.op_type for node in proto.graph.node}
    probed = _Branches(proto, spec).add(set(wanted))
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "sensitivity.onnx"
    onnx.save(proto, str(path))
    del proto
    sess = session(path, threads=2)
    first = sess.get_outputs()[0].name
    names = [first, *(f"{PREFIX}/{i}/{part}" for i in range(len(probed)) for part in ("noise", "signal"))]
    sums = np.zeros(len(probed))
    outputs = []
    for batch in batches:
        values = sess.run(names, batch)
        outputs.append(values[0])
        for i in range(len(probed)):
            sums[i] += _noise_to_signal(values[1 + 2 * i], values[2 + 2 * i])
    del sess
    path.unlink(missing_ok=True)
    scores = dict(zip(probed, np.sqrt(sums / max(len(outputs), 1)).tolist(), strict=True))
    measured = sorted(scores, key=lambda node: -scores[node])
    # Nodes of an emulated op without a branch are ones the quantizer leaves in float (a Gather of shapes...).
    unmeasured = [
        NodeScore(n, ops.get(n, ""), None) for n in wanted if n not in scores and ops.get(n) not in EMULATED_OPS
    ]
    ranking = (*[NodeScore(node, ops[node], scores[node]) for node in measured], *unmeasured)
    return Sensitivity(ranking, tuple(outputs), len(outputs), time.perf_counter() - started)


def _noise_to_signal(noise: np.ndarray, signal: np.ndarray) -> float:
    """Mean over output channels of noise / signal power, each capped at 1; dead channels left out."""
    live = signal > 0
    if not live.any():
        return 0.0
    return float(np.minimum(noise[live] / signal[live], 1.0).mean())


class _Branches:
    """Adds to a graph, per candidate node, its int8 version and the per-channel sums it is scored by."""

    def __init__(self, proto: Any, spec: Int8Spec) -> None:
        self.graph, self.spec = proto.graph, spec
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            raise StageFailed(f"quantize: the sensitivity measure needs ONNX opset 13 or newer; the model has {opset}")
        self.inits = {i.name: i for i in self.graph.initializer}
        self.count = 0
        self.quantized: dict[str, str] = {}  # activation tensor -> its int8 version (shared by its consumers)

    def add(self, wanted: set[str]) -> list[str]:
        """Add a branch for every wanted node it can emulate; returns their names, in branch order."""
        probed: list[str] = []
        for node in list(self.graph.node):
            if node.name in wanted and node.op_type in EMULATED_OPS:
                pair = self._pair(node)
                if pair is not None:
                    self._score(len(probed), *pair)
                    probed.append(node.name)
        return probed

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name]).astype(np.float32)

    def _pair(self, node: Any) -> tuple[str, str] | None:
        """(float result, int8 result) of one node, or None when the quantizer would not quantize it."""
        ins, inits = list(node.input), self.inits
        if node.op_type in ("Gather", "EmbedLayerNormalization"):
            return self._table_pair(node)
        if ins[0] in inits:
            return None
        if node.op_type == "MatMul" and ins[1] not in inits:  # two activations (unfused attention)
            return node.output[0], self.op("MatMul", self._activation(ins[0]), self._activation(ins[1]))
        if ins[1] not in inits or len(inits[ins[1]].dims) != 2:
            return None
        return self._weight_pair(node)

    def _table_pair(self, node: Any) -> tuple[str, str] | None:
        """An embedding lookup: ONNX Runtime quantizes the table like an activation (uint8, per tensor)."""
        ins = list(node.input)
        table, ids = (ins[0], ins[1]) if node.op_type == "Gather" else (ins[2], ins[0])
        if table not in self.inits or ids in self.inits or _attrs(node).get("axis", 0) != 0:
            return None
        q, scale, zero = quantize_array(self.array(table), "uint8", per_channel=False, reduce_range=False)
        return self.op("Gather", table, ids), self.op("Gather", self._dequantized(q, scale, zero, None), ids)

    def _weight_pair(self, node: Any) -> tuple[str, str] | None:
        """An activation times a weight: MatMul, Gemm, or the input projection of a fused Attention."""
        ins, attrs = list(node.input), _attrs(node)
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            return None
        trans_b = int(node.op_type == "Gemm" and attrs.get("transB", 0))
        axis = 0 if trans_b else 1  # the output channels
        spec = self.spec
        q, scale, zero = quantize_array(self.array(ins[1]), spec.weight_type, spec.per_channel, spec.reduce_range, axis)
        weight = self._dequantized(q, scale, zero, axis if spec.per_channel else None)
        if node.op_type == "Gemm":
            exact = self.op("Gemm", ins[0], ins[1], transB=trans_b)
            return exact, self.op("Gemm", self._activation(ins[0]), weight, transB=trans_b)
        exact = node.output[0] if node.op_type == "MatMul" else self.op("MatMul", ins[0], ins[1])
        return exact, self.op("MatMul", self._activation(ins[0]), weight)

    def _score(self, index: int, exact: str, approx: str) -> None:
        """Outputs PREFIX/index/noise and /signal: per last-axis channel, sums of (approx - exact)² and exact²."""
        from onnx import TensorProto, helper

        last = self.op("Slice", self.op("Shape", exact), self.const([-1]), self.const([2**62]))
        rows_by_channel = self.op("Concat", self.const([-1]), last, axis=0)
        diff = self.op("Sub", approx, exact)
        for part, value in (("noise", diff), ("signal", exact)):
            squares = self.op("Reshape", self.op("Mul", value, value), rows_by_channel)  # (rows, channels)
            name = f"{PREFIX}/{index}/{part}"
            self.graph.node.append(
                helper.make_node("ReduceSum", [squares, self.const([0])], [name], name=name, keepdims=0)
            )
            self.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def _activation(self, name: str) -> str:
        """An activation as the int8 kernel sees it: quantized (dynamic or calibrated range) and back."""
        if name not in self.quantized:
            ranges = self.spec.ranges
            if ranges is not None and name in ranges:
                qmin, qmax = ACTIVATION_RANGE[self.spec.activation_type]
                scale, zero = scale_zero(*ranges[name], qmin, qmax)
                dtype = np.uint8 if qmin == 0 else np.int8
                s, z = self.const(np.float32(scale)), self.const(np.array(zero, dtype))
                self.quantized[name] = self.op("DequantizeLinear", self.op("QuantizeLinear", name, s, z), s, z)
            else:
                q, s, z = self.op("DynamicQuantizeLinear", name, outputs=3)
                self.quantized[name] = self.op("DequantizeLinear", q, s, z)
        return self.quantized[name]

    def _dequantized(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None) -> str:
        if axis is None:  # per tensor: scalar scale and zero point
            scale, zero = scale.reshape(()), zero.reshape(())
        extra = {} if axis is None else {"axis": axis}
        return self.op("DequantizeLinear", self.const(q), self.const(scale), self.const(zero), **extra)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        """Append a node; returns its output name (a tuple of them when outputs > 1)."""
        from onnx import helper

        self.count += 1
        base = f"{PREFIX}/n{self.count}"
        names = [f"{base}:{i}" for i in range(outputs)]
        self.graph.node.append(helper.make_node(op_type, list(inputs), names, name=base, **attrs))
        return names[0] if outputs == 1 else tuple(names)

    def const(self, value: Any) -> str:
        from onnx import numpy_helper

        self.count += 1
        array = np.asarray(value) if not isinstance(value, list) else np.asarray(value, np.int64)
        name = f"{PREFIX}/c{self.count}"
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def scale_zero(lo: float, hi: float, qmin: int, qmax: int) -> tuple[float, int]:
    """Asymmetric scale and zero point for [lo, hi] widened to hold 0, as ONNX Runtime computes them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0:
        return 1.0, 0 if qmin < 0 else qmin
    return float(scale), int(np.clip(np.round(qmin - lo / scale), qmin, qmax))


def quantize_array(
    w: np.ndarray, weight_type: str, per_channel: bool, reduce_range: bool, axis: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero point) of a weight as ONNX Runtime's quantizer stores it: int8 symmetric in [-127, 127]
    ([-64, 64] with reduce_range), uint8 asymmetric in [0, 255] ([0, 127]); per channel along `axis`."""
    reduce = tuple(i for i in range(w.ndim) if i != axis) if per_channel else None
    if weight_type == "int8":
        qmax = 64 if reduce_range else 127
        absmax = np.abs(w).max(axis=reduce, keepdims=True)
        scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        zero = np.zeros_like(scale, dtype=np.int8)
        q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
    else:
        qmax = 127 if reduce_range else 255
        lo = np.minimum(w.min(axis=reduce, keepdims=True), 0)
        hi = np.maximum(w.max(axis=reduce, keepdims=True), 0)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zero_f = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(w / scale) + zero_f, 0, qmax).astype(np.uint8)
        zero = zero_f.astype(np.uint8)
    return q, scale.reshape(-1), zero.reshape(-1)
