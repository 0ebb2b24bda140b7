"""quantize: post-training int8 with onnxruntime.quantization (dynamic, or static QDQ with calibration).

The stage fails unless ONNX Runtime's optimized graph of the result really holds int8 kernels.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compress import feeds
from compress.artifact import Artifact
from compress.context import Context
from compress.errors import StageFailed, UserError
from compress.kernels import count_kernels
from compress.metrics import cosine_fidelity
from compress.recipe import QuantizeStage
from compress.targets.native import session

# Static QDQ: ONNX Runtime's MatMulAddFusion rewrites MatMul+Add on 3-D activations into Reshape->Gemm,
# after which the QDQ pairs no longer fuse into int8 kernels (../shared/notes/quantization-facts.md).
QDQ_SESSION = {"disabled_optimizers": ["MatMulAddFusion"]}
STATIC_DEFAULT_OPS = ("MatMul", "Gemm")


def run(artifact: Artifact, cfg: QuantizeStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if artifact.kind != "onnx":
        raise UserError("stages: quantize works on ONNX; put an export stage before it")
    source = artifact.file("model")
    out = ctx.out_dir / "model.onnx"
    excluded = _excluded_nodes(source, cfg.exclude_nodes)
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    # Custom-domain ops (fused Attention...) defeat ONNX's shape inference; their outputs are float.
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    settings: dict[str, Any] = {}
    import onnxruntime as ort

    # ONNX Runtime's quantizer logs advice to the root logger and its C++ core warns about unused
    # initializers it removes itself; our report says what matters.
    logging.getLogger().setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    if cfg.mode == "dynamic":
        ctx.log("quantizing: dynamic int8" + (", per-channel" if cfg.per_channel else ""))
        quantize_dynamic(
            source,
            out,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            weight_type=qtype[cfg.weight_type],
            op_types_to_quantize=list(cfg.op_types) if cfg.op_types else None,
            nodes_to_exclude=excluded,
            extra_options=extra,
        )
    else:
        method = cfg.calibration or "minmax"
        ctx.log(f"quantizing: static QDQ, {method} calibration on {cfg.calibration_samples} texts")
        if method == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        typed = _with_shapes(source, ctx)
        try:
            quantize_static(
                typed,
                out,
                _Calibration(ctx, artifact, cfg.calibration_samples),
                quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                activation_type=qtype[cfg.activation_type],
                weight_type=qtype[cfg.weight_type],
                op_types_to_quantize=list(cfg.op_types or STATIC_DEFAULT_OPS),
                nodes_to_exclude=excluded,
                calibrate_method=_calibration_method(method),
                extra_options=extra,
            )
        except ValueError as exc:
            raise StageFailed(f"quantize: {method} calibration failed in ONNX Runtime: {exc}") from None
        finally:
            typed.unlink(missing_ok=True)
        settings = QDQ_SESSION

    kernels = count_kernels(out, settings)
    if kernels["int8_total"] == 0:
        raise StageFailed(
            "quantize: ONNX Runtime's optimized graph has no int8 kernel: the model would run in float "
            f"(float compute ops: {kernels['float']})"
        )
    ctx.log(f"ONNX Runtime runs {kernels['int8_total']} int8 kernels: {kernels['int8']}")
    if kernels["float_total"] > len(excluded):
        ctx.warn(
            f"quantize: {kernels['float_total']} compute ops still run in float after {cfg.mode} quantization "
            f"({kernels['float']}); ONNX Runtime's {cfg.mode} quantizer does not cover them"
        )

    fidelity = _quick_fidelity(artifact, out, settings, ctx)
    shutil.copytree(artifact.file("tokenizer"), ctx.out_dir / "tokenizer")
    (ctx.out_dir / "session.json").write_text(_json(settings))
    metrics = {
        "mode": cfg.mode,
        "calibration": (cfg.calibration or "minmax") if cfg.mode == "static" else None,
        "per_channel": cfg.per_channel,
        "reduce_range": cfg.reduce_range,
        "excluded_nodes": excluded,
        "kernels": kernels,
        "size_bytes": out.stat().st_size,
        "fp32_size_bytes": source.stat().st_size,
        "size_ratio": out.stat().st_size / source.stat().st_size,
        "fidelity_check": fidelity,
    }
    meta = {**artifact.meta, "precision": "int8", "session": settings}
    files = {**artifact.files, "model": out, "tokenizer": ctx.out_dir / "tokenizer"}
    return Artifact("onnx", files, meta), metrics


def _with_shapes(source: Path, ctx: Context) -> Path:
    """A copy of the model with symbolic shape inference run (it knows ONNX Runtime's fused ops).

    Without tensor types, static quantization finds no float tensor to calibrate after a fused op
    and quietly quantizes nothing (measured on MiniLM: 0 of 36 MatMul inputs).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    typed = ctx.out_dir / "shape_inferred.onnx"
    try:
        quant_pre_process(str(source), str(typed), skip_optimization=True)
    except Exception as exc:  # ONNX Runtime raises bare Exception for incomplete inference
        ctx.warn(f"quantize: symbolic shape inference failed ({exc}); calibrating without tensor types")
        shutil.copy2(source, typed)
    return typed


def _excluded_nodes(model: Path, patterns: tuple[str, ...]) -> list[str]:
    """Node names matching any pattern; a pattern matching nothing is an error, not a silent no-op."""
    if not patterns:
        return []
    import onnx

    names = [node.name for node in onnx.load(str(model), load_external_data=False).graph.node]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            raise UserError(f"stages: quantize.exclude_nodes: {pattern!r} matches no node of the model")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


class _Calibration:
    """Feeds calibration texts in batches (CalibrationDataReader protocol: get_next() until None)."""

    def __init__(self, ctx: Context, artifact: Artifact, samples: int) -> None:
        self._batches = self._make(ctx, artifact, samples)

    @staticmethod
    def _make(ctx: Context, artifact: Artifact, samples: int) -> Iterator[dict[str, np.ndarray]]:
        # Every batch has one shape, (batch_size, max_length): ONNX Runtime's histogram calibrators
        # (entropy, percentile) stack the batches and fail on ragged ones. A last partial batch is dropped.
        encode = feeds.encoder(artifact)
        texts = ctx.calibration.texts[:samples]
        size = min(ctx.recipe.data.batch_size, len(texts))
        length = _length(ctx, artifact)
        for start in range(0, len(texts) - size + 1, size):
            yield encode(texts[start : start + size], length, length)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quick_fidelity(artifact: Artifact, model: Path, settings: dict[str, Any], ctx: Context) -> dict[str, float]:
    """Cosine of the int8 outputs to the fp32 reference's on a few evaluation texts (validate does the rest)."""
    inputs = feeds.encoder(artifact)(feeds.evaluation_texts(ctx)[:8], _length(ctx, artifact), None)
    ref = session(artifact.file("reference"), threads=2).run(None, inputs)[0]
    got = session(model, threads=2, settings=settings).run(None, inputs)[0]
    mask = inputs["attention_mask"].astype(bool)
    if got.shape[:2] == mask.shape:  # per-token outputs (LM logits): real tokens only
        got, ref = got[mask], ref[mask]
    return cosine_fidelity(got, ref)


def _length(ctx: Context, artifact: Artifact) -> int:
    """data.max_length, within the model's positions."""
    positions = artifact.meta.get("max_positions")
    return min(ctx.recipe.data.max_length, positions) if isinstance(positions, int) else ctx.recipe.data.max_length


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True) + "\n"
