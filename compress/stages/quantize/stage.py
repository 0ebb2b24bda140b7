"""quantize: post-training int8 with onnxruntime.quantization (dynamic, or static QDQ with calibration).

The stage fails unless ONNX Runtime's optimized graph of the result really holds int8 kernels.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import StageFailed, UserError
from compress.runtime import feeds, presets
from compress.runtime.fidelity import QDQ_SESSION, quick_fidelity
from compress.runtime.kernels import count_kernels
from compress.runtime.session import session
from compress.stages.quantize import calibration, keep_float, smoothing, tuning
from compress.stages.quantize.config import QuantizeStage
from compress.stages.quantize.sensitivity import Int8Spec

STATIC_DEFAULT_OPS = ("MatMul", "Gemm")
# What quantize_dynamic quantizes by default that does arithmetic (its registry less Transpose).
DYNAMIC_COMPUTE_OPS = ("Attention", "Conv", "EmbedLayerNormalization", "Gather", "LSTM", "MatMul")


def run(artifact: Artifact, cfg: QuantizeStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind != "onnx":
        raise UserError("stages: quantize works on ONNX; put an export stage before it")
    source = artifact.file("model")
    out = ctx.out_dir / "model.onnx"
    excluded = _excluded_nodes(source, cfg.exclude_nodes)
    preset, chosen_by = presets.choose(cfg.preset, ctx.targets)
    types, overrides = _types(cfg, preset)
    ctx.log(f"quantizing for preset {preset.name} ({chosen_by}): {types}")
    if overrides:
        ctx.warn(f"quantize: the recipe overrides preset {preset.name}: {', '.join(overrides)}")

    smoothed, smoothing_report = _smooth(artifact, cfg, ctx, types, excluded)
    try:
        with _quantized(smoothed, cfg, ctx, types, excluded) as q:
            settings, tuned, types = _tune(q, cfg, ctx, artifact, types=types, family=preset.name)
    finally:
        if smoothed is not artifact:
            smoothed.file("model").unlink(missing_ok=True)
    calibration, kept, search_report = q.calibration, q.kept, q.search_report
    # Float by the recipe's choice: excluded, kept for fidelity, attention MatMuls (attention_matmuls: float).
    in_float = len(excluded) + (len(kept["kept_in_float"]["nodes"]) if kept else 0) + len(_float_attention(source, cfg))
    kernels = _int8_kernels(out, settings, cfg, ctx, in_float=in_float)

    fidelity = quick_fidelity(artifact, out, settings, ctx)
    shutil.copytree(artifact.file("tokenizer"), ctx.out_dir / "tokenizer")
    (ctx.out_dir / "session.json").write_text(_json(settings))
    metrics = {
        "mode": cfg.mode,
        "preset": {"name": preset.name, "chosen_by": chosen_by, "why": preset.why, "overrides": overrides},
        **types,
        "calibration": calibration,
        "per_channel": cfg.per_channel,
        "attention_matmuls": _attention_matmuls(cfg),
        "excluded_nodes": excluded,
        **(kept or {"kept_in_float": None}),
        "kernels": kernels,
        "size_bytes": out.stat().st_size,
        "fp32_size_bytes": source.stat().st_size,
        "size_ratio": out.stat().st_size / source.stat().st_size,
        "fidelity_check": fidelity,
        "accuracy_aware": search_report,
        "smoothing": smoothing_report,
        "graph_tuning": tuned,
    }
    meta = {**artifact.meta, "precision": "int8", "session": settings, "preset": preset.name, "int8_types": types}
    files = {**artifact.files, "model": out, "tokenizer": ctx.out_dir / "tokenizer"}
    return Artifact("onnx", files, meta), metrics


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice to the root logger, and its C++ core warns about unused
    initializers it removes itself; our report says what matters. The root logger's level is restored."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass
class _Quantized:
    """What quantizing wrote (ctx.out_dir/model.onnx) and how: its session settings, the calibration summary,
    what stays float and why, the goal's search report, and how to quantize the same nodes in other types."""

    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    kept: dict[str, Any] | None
    search_report: dict[str, Any] | None
    write: Callable[[dict[str, Any], str, Path], dict[str, Any]]
    format: str


@contextmanager
def _quantized(
    artifact: Artifact, cfg: QuantizeStage, ctx: Context, types: dict[str, Any], excluded: list[str]
) -> Iterator[_Quantized]:
    """Write ctx.out_dir/model.onnx; its files for quantizing again (the typed graph, the calibration cache)
    last until the context ends."""
    source, out = artifact.file("model"), ctx.out_dir / "model.onnx"
    settings: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    typed: Path | None = None
    ranges = None
    try:
        with _quiet_quantizer():
            if cfg.mode == "dynamic":
                ctx.log("quantizing: dynamic int8" + (", per-channel" if cfg.per_channel else ""))
                quantize: Callable[..., None] = partial(_dynamic, source=source, cfg=cfg)
            else:
                typed = _with_shapes(source, ctx)
                cal = _calibrate(typed, cfg, ctx, artifact)
                calibration = {
                    "method": cal.method,
                    "sequences": cal.sequences,
                    "batches": cal.batches,
                    "chunks": cal.chunks,
                    "batches_per_chunk": cfg.calibration_chunk,
                    "tensors": cal.tensors,
                    "seconds": round(cal.seconds, 2),
                }
                quantize = partial(_static, typed=typed, cfg=cfg, cache=cal.cache)
                settings = QDQ_SESSION
                ranges = calibration_ranges(cal.cache)
            spec = Int8Spec(
                cfg.per_channel, types["reduce_range"], types["weight_type"], types["activation_type"], ranges
            )
            first = partial(quantize, types=types, fmt=_format(cfg))
            plan = keep_float.Plan(first, _candidates(source, cfg, excluded), excluded, spec, settings, out)
            kept, search_report = keep_float.apply(artifact, cfg, ctx, plan)
        in_float = excluded + [n["node"] for n in kept["kept_in_float"]["nodes"]] if kept else list(excluded)
        write = partial(_write_again, quantize, in_float)
        yield _Quantized(settings, calibration, kept, search_report, write, _format(cfg))
    finally:
        if typed is not None:
            typed.unlink(missing_ok=True)


def _format(cfg: QuantizeStage) -> str:
    return "dynamic" if cfg.mode == "dynamic" else "QDQ"


def _write_again(
    quantize: Callable[..., None], in_float: list[str], types: dict[str, Any], fmt: str, out: Path
) -> dict[str, Any]:
    """The same nodes quantized in other int8 types (or, static, another format); returns its session settings."""
    with _quiet_quantizer():
        quantize(in_float, out, types=types, fmt=fmt)
    return QDQ_SESSION if fmt == "QDQ" else {}


def _tune(
    q: _Quantized, cfg: QuantizeStage, ctx: Context, artifact: Artifact, *, types: dict[str, Any], family: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The graph tuning (tune.enabled): session settings, its report, and the int8 types of the graph kept."""
    kept = {**types, "format": q.format}
    if not cfg.tune.enabled:
        return q.settings, {"chosen": "fused", "why": "tune.enabled is false"}, kept
    # A preset the recipe names fixes its types: the user chose them for CPUs this one may not be.
    named = cfg.preset != "auto"
    fixed = tuple(name for name in tuning.TYPE_FIELDS if named or getattr(cfg, name) is not None)
    requantize = tuning.Requantize(q.write, types, q.format, fixed, family)
    return tuning.tune(ctx.out_dir / "model.onnx", q.settings, artifact, cfg.tune, ctx, requantize=requantize)


def _smooth(
    artifact: Artifact, cfg: QuantizeStage, ctx: Context, types: dict[str, Any], excluded: list[str]
) -> tuple[Artifact, dict[str, Any]]:
    """The artifact to quantize: its fp32 graph with outlier channels smoothed (or as it is), and the report."""
    if not cfg.smoothing.enabled:
        return artifact, {"enabled": False}
    sm = cfg.smoothing
    texts, _ = keep_float.sensitivity_texts(ctx, sm.samples)
    if not texts:
        ctx.warn("quantize: smoothing skipped: no data.calibration or data.evaluation text to measure channels on")
        return artifact, {"enabled": True, "skipped": "no calibration or evaluation text"}
    if _external_data(artifact.file("model")):
        ctx.warn("quantize: smoothing skipped: the fp32 model keeps its weights in external data files (over 2 GB)")
        return artifact, {"enabled": True, "skipped": "weights in external data files"}
    target = ctx.out_dir / "smoothed.onnx"
    ctx.log(f"smoothing outlier channels on {len(texts)} texts (alpha {sm.alpha})")
    report = smoothing.smooth(
        artifact.file("model"),
        target,
        _batches(ctx, artifact, texts),
        {
            "alpha": None if sm.alpha == "auto" else sm.alpha,
            "excluded": excluded,
            "reduce_range": types["reduce_range"],
            "static": cfg.mode == "static",
            "rows_per_text": sm.rows_per_text,
            "sample_texts": sm.search_texts,
        },
        lambda path: session(path, threads=2),
    )
    ctx.log(f"smoothed {report['smoothed']} of {report['candidates']} MatMuls in {report['seconds']} s")
    return Artifact(artifact.kind, {**artifact.files, "model": target}, artifact.meta), {"enabled": True, **report}


def _external_data(model: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in onnx.load(str(model), load_external_data=False).graph.initializer)


def _attention_matmuls(cfg: QuantizeStage) -> str | None:
    """Dynamic: whether MatMuls of two activations are quantized (float unless the recipe says int8)."""
    return None if cfg.mode == "static" else (cfg.attention_matmuls or "float")


def _candidates(source: Path, cfg: QuantizeStage, excluded: list[str]) -> list[str]:
    """The nodes the quantizer would quantize (its op types), less those the recipe keeps in float."""
    import onnx

    types = set(cfg.op_types or (STATIC_DEFAULT_OPS if cfg.mode == "static" else DYNAMIC_COMPUTE_OPS))
    graph = onnx.load(str(source), load_external_data=False).graph
    skip = set(excluded) | set(_float_attention(source, cfg))
    return [n.name for n in graph.node if n.op_type in types and n.name not in skip]


def _float_attention(source: Path, cfg: QuantizeStage) -> list[str]:
    """MatMuls of two activations that attention_matmuls: float leaves to float (dynamic mode)."""
    if _attention_matmuls(cfg) != "float":
        return []
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def _int8_kernels(
    out: Path, settings: dict[str, Any], cfg: QuantizeStage, ctx: Context, in_float: int
) -> dict[str, Any]:
    """The kernels ONNX Runtime runs for the result: none in int8 fails the stage; more float than asked warns."""
    kernels = count_kernels(out, settings)
    if kernels["int8_total"] == 0:
        raise StageFailed(
            "quantize: ONNX Runtime's optimized graph has no int8 kernel: the model would run in float "
            f"(float compute ops: {kernels['float']})"
        )
    ctx.log(f"ONNX Runtime runs {kernels['int8_total']} int8 kernels: {kernels['int8']}")
    if kernels["float_total"] > in_float:
        ctx.warn(
            f"quantize: {kernels['float_total']} compute ops still run in float after {cfg.mode} quantization "
            f"({kernels['float']}); ONNX Runtime's {cfg.mode} quantizer does not cover them"
        )
    return kernels


def _types(cfg: QuantizeStage, preset: presets.Preset) -> tuple[dict[str, Any], list[str]]:
    """The int8 types used (the preset's unless the recipe sets them) and the recipe's overrides."""
    chosen = preset.settings()
    overrides = []
    for name in ("activation_type", "weight_type", "reduce_range"):
        value = getattr(cfg, name)
        if value is not None and value != chosen[name]:
            overrides.append(f"{name}={value} (preset: {chosen[name]})")
        if value is not None:
            chosen[name] = value
    if cfg.mode == "dynamic":
        chosen["activation_type"] = "uint8"  # ONNX Runtime's dynamic quantization: always u8 activations
    return chosen, overrides


QTYPES = {"int8": "QInt8", "uint8": "QUInt8"}


def _dynamic(
    excluded: list[str], out: Path, *, source: Path, cfg: QuantizeStage, types: dict[str, Any], fmt: str
) -> None:
    """Dynamic int8: ONNX Runtime's QOperator ops (DynamicQuantizeMatMul...), the only format it has."""
    if fmt != "dynamic":
        raise StageFailed(f"quantize: dynamic int8 has no {fmt} format")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        out,
        per_channel=cfg.per_channel,
        reduce_range=types["reduce_range"],
        weight_type=QuantType[QTYPES[types["weight_type"]]],
        op_types_to_quantize=list(cfg.op_types) if cfg.op_types else None,
        nodes_to_exclude=list(excluded),
        extra_options={
            # Custom-domain ops (fused Attention...) defeat ONNX's shape inference; their outputs are float.
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            # quantize_dynamic's default (True) leaves MatMuls of two activations (unfused attention) in float.
            "MatMulConstBOnly": _attention_matmuls(cfg) == "float",
        },
    )


def _static(
    excluded: list[str], out: Path, *, typed: Path, cfg: QuantizeStage, types: dict[str, Any], cache: Path, fmt: str
) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        typed,
        out,
        None,  # ranges come from the calibration cache (streamed once, reused by every trial)
        quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
        per_channel=cfg.per_channel,
        reduce_range=types["reduce_range"],
        activation_type=QuantType[QTYPES[types["activation_type"]]],
        weight_type=QuantType[QTYPES[types["weight_type"]]],
        op_types_to_quantize=list(cfg.op_types or STATIC_DEFAULT_OPS),
        nodes_to_exclude=list(excluded),
        calibrate_method=calibration.method_enum(cfg.calibration or "minmax"),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        calibration_cache_path=cache,
    )


def _calibrate(typed: Path, cfg: QuantizeStage, ctx: Context, artifact: Artifact) -> calibration.CalibrationResult:
    method = cfg.calibration or "minmax"
    ctx.log(
        f"calibrating: {method} on {cfg.calibration_samples} texts, {cfg.calibration_chunk} batches of "
        f"{ctx.data.batch_size} in memory at a time"
    )
    try:
        result = calibration.calibrate(
            typed,
            _calibration_batches(ctx, artifact, cfg.calibration_samples),
            method=method,
            op_types=list(cfg.op_types or STATIC_DEFAULT_OPS),
            chunk_batches=cfg.calibration_chunk,
            work_dir=ctx.out_dir / "calibration",
            percentile=cfg.percentile,
        )
    except ValueError as exc:
        raise StageFailed(f"quantize: {method} calibration failed in ONNX Runtime: {exc}") from None
    ctx.log(f"calibrated {result.tensors} tensors on {result.sequences} texts in {result.seconds:.1f} s")
    return result


def _with_shapes(source: Path, ctx: Context) -> Path:
    """A copy of the model with symbolic shape inference run (it knows ONNX Runtime's fused ops).

    Without tensor types, static quantization finds no float tensor to calibrate after a fused op
    and quietly quantizes nothing (measured on MiniLM: 0 of 36 MatMul inputs).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    typed = (ctx.out_dir / "shape_inferred.onnx").resolve()
    source = source.resolve()  # before the working folder changes what a relative path means
    try:
        with _working_folder(ctx.out_dir.resolve() / "shape_inference"):
            quant_pre_process(str(source), str(typed), skip_optimization=True)
    except Exception as exc:  # ONNX Runtime raises bare Exception for incomplete inference
        ctx.warn(f"quantize: symbolic shape inference failed ({exc}); calibrating without tensor types")
        shutil.copy2(source, typed)
    return typed


@contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """Run in `folder` (removed after): when symbolic shape inference fails, ONNX Runtime 1.32 saves
    "sym_shape_infer_temp.onnx" and a uuid-named external-data file of the whole model's size into the current
    directory (onnxruntime/tools/symbolic_shape_infer.py), which is the user's, not ours."""
    previous = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
        shutil.rmtree(folder, ignore_errors=True)


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


def calibration_ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """The calibrated (min, max) of each activation tensor, from ONNX Runtime's calibration cache."""
    from onnxruntime.quantization import load_tensors_data

    data = load_tensors_data(cache).data
    return {name: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1]))) for name, t in data.items()}


def _calibration_batches(ctx: Context, artifact: Artifact, samples: int) -> Iterator[dict[str, np.ndarray]]:
    return _batches(ctx, artifact, ctx.calibration_examples[:samples])


def _batches(ctx: Context, artifact: Artifact, texts: list[Any]) -> Iterator[dict[str, np.ndarray]]:
    """Texts in batches of data.batch_size, encoded as they are needed.

    Every batch has one shape, (batch_size, max_length): ONNX Runtime's histogram calibrators (entropy,
    percentile) stack the batches of a chunk and fail on ragged ones. A last partial batch is dropped.
    """
    encode = feeds.encoder(artifact)
    size = min(ctx.data.batch_size, len(texts))
    length = artifact.usable_length(ctx.data.max_length)
    for start in range(0, len(texts) - size + 1, size):
        yield encode(texts[start : start + size], length, length)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True) + "\n"
