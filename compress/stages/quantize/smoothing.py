"""Outlier smoothing before int8 (SmoothQuant, Xiao et al. 2023), on the fp32 ONNX graph.

A transformer's MatMul inputs carry a few channels far larger than the rest; one int8 scale per tensor
then leaves the other channels a handful of levels. Dividing input channel j by s_j and multiplying row j
of the weight by s_j computes the same product and moves the outliers into the weights, which have one
scale per output channel. s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

Here the division is a Mul node before each smoothed MatMul (in an encoder the input usually also feeds
the residual stream or comes out of GELU, so it cannot be folded into the op before it). alpha is
searched per node: on token rows of calibration texts the int8 product (activations with one range per
text, as deployed at batch 1; weights per output channel) is simulated for each alpha and without
smoothing, and the alpha with the least error is kept, or no smoothing when none beats it by 5%.

neural-compressor is not used (README, dependency table): its SmoothQuant for PyTorch imports
intel_extension_for_pytorch (built for torch 2.8) at module level, and its ONNX versions (2.x
adaptor, onnx-neural-compressor 1.0) pin numpy < 2.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GAIN = 0.5  # a smoothing must at least halve the simulated error: each costs a Mul over its input at run time
SCALE_BOUNDS = (1e-4, 1e4)


@dataclass
class _Stats:
    absmax: np.ndarray | None = None  # per input channel, over every calibration token
    texts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # (min, max, rows) per text
    _stacked: tuple[np.ndarray, np.ndarray] | None = None  # sampled(), once every text is in

    def see(self, value: np.ndarray) -> None:
        """Channel maxima over every row, padding included: a padded batch's dynamic range spans its pad
        rows too (measured on MiniLM: maxima of real tokens only left pad rows of 1/s-scaled channels far
        above the rest, and batched int8 fell from 0.994 to 0.988 cosine)."""
        if value.ndim < 2 or value.size == 0:
            return
        mx = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
        self.absmax = mx if self.absmax is None else np.maximum(self.absmax, mx)

    def sampled(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sampled row in one matrix, and the index of the text each came from (one product per alpha
        over all of them: a product per text cost twice the time in Python)."""
        if self._stacked is None:
            rows = [r for _, _, r in self.texts]
            owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
            self._stacked = (np.concatenate(rows) if rows else np.zeros((0, 0), np.float32), owner)
        return self._stacked

    def add(self, rows: np.ndarray, keep: int, sample_texts: int, rng: np.random.Generator) -> None:
        if rows.size == 0:
            return
        if len(self.texts) < sample_texts:
            pick = rows[rng.choice(len(rows), size=min(keep, len(rows)), replace=False)]
            self.texts.append((rows.min(axis=0), rows.max(axis=0), pick.astype(np.float32)))
            self._stacked = None


def candidates(graph: Any, excluded: Iterable[str]) -> dict[str, tuple[str, str]]:
    """MatMul nodes with a 2-D float weight of their own: node name -> (activation input, weight)."""
    weights = {i.name: i for i in graph.initializer if len(i.dims) == 2 and i.data_type == 1}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    skip = set(excluded)
    return {
        node.name: (node.input[0], node.input[1])
        for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in weights and uses[node.input[1]] == 1 and node.name not in skip
    }


def collect(
    model: Path,
    inputs: dict[str, str],
    batches: Iterable[dict[str, np.ndarray]],
    session_for: Any,
    *,
    augmented: Path,
    rows_per_text: int,
    sample_texts: int,
) -> dict[str, _Stats]:
    """Per activation tensor: per-channel |max| over every row, and real-token rows of a few texts.
    `augmented`: where the graph with those tensors as outputs is written (in the caller's folder) and removed."""
    import onnx

    proto = onnx.load(str(model))
    have = {o.name for o in proto.graph.output}
    wanted = sorted(set(inputs.values()))
    proto.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in wanted if n not in have
    )
    onnx.save(proto, str(augmented))
    try:
        sess = session_for(augmented)
        names = {i.name for i in sess.get_inputs()}
        stats = {n: _Stats() for n in wanted}
        rng = np.random.default_rng(0)
        for batch in batches:
            outs = dict(zip(wanted, sess.run(wanted, {k: v for k, v in batch.items() if k in names}), strict=True))
            mask = batch.get("attention_mask")
            for name, value in outs.items():
                stats[name].see(value)
                for rows in _per_text(value, mask):
                    stats[name].add(rows, rows_per_text, sample_texts, rng)
        return stats
    finally:
        augmented.unlink(missing_ok=True)


def _per_text(value: np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """A tensor's token rows per text: real tokens only when the tensor is (batch, tokens, channels)."""
    if value.ndim == 3 and mask is not None and value.shape[:2] == mask.shape:
        return [value[b][mask[b].astype(bool)] for b in range(value.shape[0])]
    if value.ndim >= 2:
        return [value.reshape(-1, value.shape[-1])]
    return []


def _quant_weights(w: np.ndarray, levels: int) -> np.ndarray:
    """Symmetric int8 per output channel (columns of a MatMul weight), dequantized."""
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / levels
    return np.clip(np.round(w / scale), -levels, levels) * scale


def _quant_rows(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Asymmetric uint8 with one range (including 0) per row's text (lo, hi: one per row), dequantized."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum(hi - lo, 1e-12) / 255.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(rows / scale) + zero, 0, 255) - zero) * scale


def error(
    stats: _Stats,
    w: np.ndarray,
    s: np.ndarray | None,
    levels: int,
    *,
    static: bool = False,
    exact: np.ndarray | None = None,
) -> float:
    """Relative error of the simulated int8 product on the sampled rows (s: the smoothing, None: without).

    Activations get one range per text (dynamic: ranges are computed per run), or one range for every text
    (static: the calibrated range). `exact`: the float product of the sampled rows, when already known."""
    if not stats.texts:
        return 0.0
    s = np.ones(w.shape[0], np.float32) if s is None else s
    wq = _quant_weights(w * s[:, None], levels)
    lo = np.array([np.min(text_lo / s) for text_lo, _, _ in stats.texts], dtype=np.float32)
    hi = np.array([np.max(text_hi / s) for _, text_hi, _ in stats.texts], dtype=np.float32)
    if static:
        lo, hi = np.full_like(lo, lo.min()), np.full_like(hi, hi.max())
    rows, owner = stats.sampled()
    exact = rows @ w if exact is None else exact
    got = _quant_rows(rows / s, lo[owner, None], hi[owner, None]) @ wq
    return float(np.square(got - exact, dtype=np.float64).sum()) / max(
        float(np.square(exact, dtype=np.float64).sum()), 1e-30
    )


def scales(absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    wmax = np.maximum(np.abs(w).max(axis=1), 1e-8)
    s = np.maximum(absmax, 1e-8) ** alpha / wmax ** (1.0 - alpha)
    return np.clip(s, *SCALE_BOUNDS).astype(np.float32)


def choose(
    stats: _Stats, w: np.ndarray, alpha: float | None, levels: int, static: bool = False
) -> tuple[float | None, float, float]:
    """(alpha kept or None, error without smoothing, error with it)."""
    exact = stats.sampled()[0] @ w if stats.texts else None  # the float product, the same for every alpha
    base = error(stats, w, None, levels, static=static, exact=exact)
    if stats.absmax is None:
        return None, base, base
    tried = [alpha] if alpha is not None else list(ALPHAS)
    errors = {a: error(stats, w, scales(stats.absmax, w, a), levels, static=static, exact=exact) for a in tried}
    best = min(errors, key=lambda a: errors[a])
    if alpha is None and errors[best] > GAIN * base:
        return None, base, base
    return best, base, errors[best]


def rewrite(proto: Any, node_name: str, activation: str, weight: str, s: np.ndarray) -> None:
    """In place: weight rows times s, and a Mul by 1/s between the activation and the MatMul."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    init = next(i for i in graph.initializer if i.name == weight)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * s[:, None], weight))
    inverse = f"{node_name}/smooth_inverse_scale"
    graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
    smoothed = f"{node_name}/smoothed_input"
    index = next(i for i, n in enumerate(graph.node) if n.name == node_name)
    graph.node[index].input[0] = smoothed
    graph.node.insert(index, helper.make_node("Mul", [activation, inverse], [smoothed], name=f"{node_name}/Smooth"))


def smooth(
    source: Path,
    target: Path,
    batches: Iterable[dict[str, np.ndarray]],
    settings: dict[str, Any],
    session_for: Any,
) -> dict[str, Any]:
    """Write the smoothed fp32 graph of `source` to `target`; settings: alpha (None: searched), excluded,
    reduce_range, static (calibrated ranges, not per-run ones), rows_per_text, sample_texts. Returns the
    report (per node: alpha, simulated errors)."""
    import onnx

    start = time.perf_counter()
    proto = onnx.load(str(source))
    nodes = candidates(proto.graph, settings["excluded"])
    stats = collect(
        source,
        {n: a for n, (a, _) in nodes.items()},
        batches,
        session_for,
        augmented=target.with_name("smoothing_augmented.onnx"),  # the stage's folder, not the input's
        rows_per_text=settings["rows_per_text"],
        sample_texts=settings["sample_texts"],
    )
    weights = {i.name: i for i in proto.graph.initializer}
    levels = 63 if settings["reduce_range"] else 127
    per_node: dict[str, Any] = {}
    for name, (activation, weight) in nodes.items():
        w = onnx.numpy_helper.to_array(weights[weight]).astype(np.float32)
        alpha, before, after = choose(stats[activation], w, settings["alpha"], levels, settings.get("static", False))
        per_node[name] = {"alpha": alpha, "error_before": before, "error_after": after}
        absmax = stats[activation].absmax
        if alpha is not None and absmax is not None:
            rewrite(proto, name, activation, weight, scales(absmax, w, alpha))
    onnx.save(proto, str(target))
    smoothed = [n for n, r in per_node.items() if r["alpha"] is not None]
    return {
        "alpha": settings["alpha"] if settings["alpha"] is not None else "auto",
        "smoothed": len(smoothed),
        "candidates": len(nodes),
        "texts_sampled": max((len(s.texts) for s in stats.values()), default=0),
        "seconds": round(time.perf_counter() - start, 2),
        "nodes": per_node,
    }
