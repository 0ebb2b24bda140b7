"""export: PyTorch -> fp32 ONNX (fused where ONNX Runtime's optimizer can), checked against PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compress.artifact import Artifact, usable_length
from compress.context import Context
from compress.data.tokenizers import data_tokenizer
from compress.errors import UserError
from compress.models import hf
from compress.models.architectures import usable_positions
from compress.models.encoder import ZooCausalLM
from compress.models.zoo import load_zoo
from compress.stages.export.config import ExportStage
from compress.stages.export.kind import windowed_kind
from compress.stages.export.windowed import (
    announce,
    check_lengths,
    custom_op_checks,
    export_windowed,
    window_checks,
)
from compress.tasks import HEADS, TASKS
from exporters import native, onnx_export, ort_fusion
from exporters.hf_attention import sparse_attention_kind


def run(artifact: Artifact, cfg: ExportStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind == "zoo":
        return _run_zoo(artifact, cfg, ctx)
    if artifact.kind != "hf":
        raise UserError(f"stages: export needs a PyTorch model, but the previous stage produced {artifact.kind}")
    folder = artifact.file("model")
    config = hf.read_config(folder)
    windowed = windowed_kind(config, cfg)
    announce(windowed, config, cfg, ctx)
    tokenizer = hf.load_tokenizer(folder)
    names = hf.input_names(tokenizer, config)
    task, kind = TASKS[ctx.task], ctx.input_kind
    module = task.build_module(hf.load_model(folder, HEADS[ctx.task]), ctx.model, names)
    max_length = ctx.data.max_length
    positions = usable_positions(config)  # RoBERTa-style position ids start after padding_idx
    if isinstance(positions, int) and max_length > positions:
        raise UserError(f"data.max_length: {max_length} exceeds the model's {positions} positions")

    example, checks = _checks(tokenizer, ctx, cfg, names, (windowed, config))
    model_path = ctx.out_dir / "model.onnx"
    exporter, opset, fused = _export(module, example, model_path, windowed, config=config, cfg=cfg, ctx=ctx)
    agreement = onnx_export.check_against_torch(module, model_path, checks, cfg.tolerance)
    ctx.log(f"ONNX Runtime matches PyTorch: max |diff| {agreement.max_abs_diff:.2e} <= {cfg.tolerance:g}")
    extra: dict[str, Any] = {}
    if windowed:  # our op, checked with its native kernels too; reported like a zoo model's export
        agreement, extra = custom_op_checks(module, model_path, checks, agreement, cfg=cfg, ctx=ctx)
    elif cfg.dense_attention and sparse_attention_kind(config):
        extra = {"attention": "dense (dense_attention: true)"}

    tok_dir = ctx.out_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    for name in ("config.json",):
        shutil.copy2(folder / name, ctx.out_dir / name)
    metrics = {
        "exporter": exporter,
        "opset": opset,
        "fused_ops": fused,
        **_check_metrics(agreement, cfg, model_path, module),
        **extra,
    }
    meta: dict[str, Any] = {
        "inputs": list(names),
        "outputs": list(task.OUTPUT_NAMES),
        "input_kind": kind,
        **({"labels": list(hf.model_labels(folder) or ())} if ctx.task != "embedding" else {}),
        "precision": "fp32",
        "session": {},
        "max_positions": positions,
        **({"custom_ops": sorted(extra["custom_ops"])} if "custom_ops" in extra else {}),
    }
    # "torch": the PyTorch model this graph came from (quantization-aware training trains it)
    files: dict[str, Path] = {"model": model_path, "reference": model_path, "tokenizer": tok_dir, "torch": folder}
    return Artifact("onnx", files, meta), metrics


def _export(
    module: Any,
    example: dict[str, Any],
    model_path: Path,
    windowed: str | None,
    *,
    config: dict[str, Any],
    cfg: ExportStage,
    ctx: Context,
) -> tuple[str, int, dict[str, int] | str]:
    """Export (our op for windowed attention) and fuse where ONNX Runtime can into model_path;
    (exporter, opset, fused operators or why none)."""
    task = TASKS[ctx.task]
    raw = ctx.out_dir / "raw.onnx"
    exporter = "dynamo" if windowed else cfg.exporter or "torchscript"
    opset = 18 if windowed else cfg.opset  # our ops' function bodies are opset 18
    ctx.log(f"exporting with the {exporter} exporter (opset {opset})")
    if windowed:
        export_windowed(windowed, module, example, raw, task.OUTPUT_NAMES)
    else:
        onnx_export.export(
            module,
            example=example,
            path=raw,
            output_names=task.OUTPUT_NAMES,
            exporter=exporter,
            opset=cfg.opset,
            per_token=ctx.input_kind == "words",
        )
    fused: dict[str, int] | str = "disabled in the recipe"
    if windowed:
        fused = "none: ONNX Runtime's fusions do not know the ai.edgecompress attention op"
    elif cfg.optimize:
        fused = ort_fusion.fuse(raw, model_path, config)
        if isinstance(fused, str):
            ctx.warn(f"export: no operator fusion ({fused}); int8 kernels will cover fewer operators")
    if model_path.exists():
        raw.unlink()
    else:
        raw.rename(model_path)
    return exporter, opset, fused


def _checks(
    tokenizer: Any, ctx: Context, cfg: ExportStage, names: tuple[str, ...], windowed: tuple[str | None, dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The export example and the checked shapes: a padded batch of real examples, one alone, a
    full-length batch (and a windowed model's window lengths)."""
    kind, max_length = ctx.input_kind, ctx.data.max_length
    texts = ctx.examples("evaluation")[: cfg.check_samples]
    if len(texts) < 2:
        raise UserError("data.evaluation: export checks need at least 2 examples")
    example = hf.encode(tokenizer, texts[:2], max_length, names, kind=kind)
    checks = [
        hf.encode(tokenizer, texts, max_length, names, kind=kind),
        hf.encode(tokenizer, texts[:1], max_length, names, kind=kind),
        hf.encode(tokenizer, texts[:2], max_length, names, pad_to=max_length, kind=kind),
    ]
    kind_of_attention, config = windowed
    if kind_of_attention is not None:
        checks += window_checks(kind_of_attention, tokenizer, texts, config, max_length, names, kind)
    return example, checks


def _run_zoo(artifact: Artifact, cfg: ExportStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    """A zoo model: dynamo export with windowed/block-sparse attention as our custom ops, checked at
    lengths below, at, at multiples of and above the window (or block), with padding and globals."""
    folder = artifact.file("model")
    model = load_zoo(folder)
    zcfg = model.cfg
    tokenizer = data_tokenizer(ctx.data.tokenizer)
    lm = isinstance(model, ZooCausalLM)
    outputs = ("logits",)
    max_length = usable_length(ctx.data.max_length, zcfg.max_len)
    texts = list(ctx.texts("evaluation").texts if lm else ctx.labeled("evaluation").texts)[: cfg.check_samples]
    if len(texts) < 2:
        raise UserError("data.evaluation: export checks need at least 2 texts")
    example = tokenizer.encode(texts[:2], max_length)
    checks = [tokenizer.encode(texts, max_length), tokenizer.encode(texts[:1], max_length)]
    att = zcfg.attention
    for length in check_lengths(att.window or att.block or att.chunk or att.proj_len or 64, max_length):
        checks.append(tokenizer.encode(texts[:2], length, pad_to=length))
        checks.append(tokenizer.encode(texts[:3], length))  # padded to the longest of three
    model_path = ctx.out_dir / "model.onnx"
    ctx.log("exporting with the dynamo exporter (opset 18), attention as ai.edgecompress ops")
    try:
        kinds = onnx_export.export_zoo(
            model, example=example, path=model_path, output_names=outputs, max_len=zcfg.max_len
        )
    except ValueError as exc:  # an attention module the exporter refuses (would come out dense)
        raise UserError(str(exc)) from None
    ops = onnx_export.custom_ops(model_path)
    agreement = onnx_export.check_against_torch(model, model_path, checks, cfg.tolerance)
    ctx.log(f"ONNX Runtime (function bodies) matches PyTorch: max |diff| {agreement.max_abs_diff:.2e}")
    kernel = "function body"
    if ops and native.available():
        fast = onnx_export.check_against_torch(model, model_path, checks, cfg.tolerance, native=True)
        ctx.log(f"ONNX Runtime (native kernels) matches PyTorch: max |diff| {fast.max_abs_diff:.2e}")
        kernel = "native"
        agreement = max(agreement, fast, key=lambda a: a.max_abs_diff)
    elif ops:
        ctx.warn(
            "export: no native kernel library for this machine; ONNX Runtime runs the attention ops' "
            "function bodies (portable, slower): run `edge-compress build-ops`"
        )
    tok_dir = ctx.out_dir / "tokenizer"
    tokenizer.save(tok_dir)
    shutil.copy2(folder / "config.json", ctx.out_dir / "config.json")
    metrics = {
        "exporter": "dynamo",
        "opset": 18,
        "attention": kinds,
        "custom_ops": ops,
        "custom_op_kernel": kernel if ops else "none",
        **_check_metrics(agreement, cfg, model_path, model),
    }
    meta: dict[str, Any] = {
        "inputs": ["input_ids", "attention_mask"],
        "outputs": list(outputs),
        "precision": "fp32",
        "session": {},
        "max_positions": zcfg.max_len,
        "custom_ops": sorted(ops),
    }
    files: dict[str, Path] = {"model": model_path, "reference": model_path, "tokenizer": tok_dir, "torch": folder}
    return Artifact("onnx", files, meta), metrics


def _check_metrics(agreement: Any, cfg: ExportStage, model_path: Path, module: Any) -> dict[str, Any]:
    """The figures every export reports: its ONNX Runtime vs PyTorch agreement, file size, parameters."""
    return {
        "max_abs_diff": agreement.max_abs_diff,
        "mean_abs_diff": agreement.mean_abs_diff,
        "tolerance": cfg.tolerance,
        "shapes_checked": [list(s) for s in agreement.shapes_checked],
        "size_bytes": model_path.stat().st_size,
        "parameters": sum(p.numel() for p in module.parameters()),
    }
