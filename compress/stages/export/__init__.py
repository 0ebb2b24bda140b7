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
from compress.tasks import HEADS, TASKS
from exporters import native, onnx_export, ort_fusion
from exporters.longformer import export_longformer, sparse_attention_kind


def run(artifact: Artifact, cfg: ExportStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind == "zoo":
        return _run_zoo(artifact, cfg, ctx)
    if artifact.kind != "hf":
        raise UserError(f"stages: export needs a PyTorch model, but the previous stage produced {artifact.kind}")
    folder = artifact.file("model")
    config = hf.read_config(folder)
    longformer = _is_longformer(config, cfg)
    tokenizer = hf.load_tokenizer(folder)
    names = hf.input_names(tokenizer, config)
    task, kind = TASKS[ctx.task], ctx.input_kind
    module = task.build_module(hf.load_model(folder, HEADS[ctx.task]), ctx.model, names)
    max_length = ctx.data.max_length
    positions = usable_positions(config)  # RoBERTa-style position ids start after padding_idx
    if isinstance(positions, int) and max_length > positions:
        raise UserError(f"data.max_length: {max_length} exceeds the model's {positions} positions")

    example, checks = _checks(tokenizer, ctx, cfg, names, config if longformer else None)
    raw = ctx.out_dir / "raw.onnx"
    model_path = ctx.out_dir / "model.onnx"
    exporter = "dynamo" if longformer else cfg.exporter or "torchscript"
    opset = 18 if longformer else cfg.opset  # our ops' function bodies are opset 18
    ctx.log(f"exporting with the {exporter} exporter (opset {opset})")
    if longformer:
        _export_longformer(module, example, raw, task.OUTPUT_NAMES)
    else:
        onnx_export.export(
            module,
            example=example,
            path=raw,
            output_names=task.OUTPUT_NAMES,
            exporter=exporter,
            opset=cfg.opset,
            per_token=kind == "words",
        )
    fused: dict[str, int] | str = "disabled in the recipe"
    if longformer:
        fused = "none: ONNX Runtime's fusions do not know the ai.edgecompress attention op"
    elif cfg.optimize:
        fused = ort_fusion.fuse(raw, model_path, config)
        if isinstance(fused, str):
            ctx.warn(f"export: no operator fusion ({fused}); int8 kernels will cover fewer operators")
    if model_path.exists():
        raw.unlink()
    else:
        raw.rename(model_path)
    agreement = onnx_export.check_against_torch(module, model_path, checks, cfg.tolerance)
    ctx.log(f"ONNX Runtime matches PyTorch: max |diff| {agreement.max_abs_diff:.2e} <= {cfg.tolerance:g}")
    extra: dict[str, Any] = {}
    if longformer:  # our op, checked with its native kernels too; reported like a zoo model's export
        agreement, extra = _custom_op_checks(module, model_path, checks, agreement, cfg=cfg, ctx=ctx)

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
        **({"custom_ops": sorted(extra["custom_ops"])} if extra else {}),
    }
    # "torch": the PyTorch model this graph came from (quantization-aware training trains it)
    files: dict[str, Path] = {"model": model_path, "reference": model_path, "tokenizer": tok_dir, "torch": folder}
    return Artifact("onnx", files, meta), metrics


def _checks(
    tokenizer: Any, ctx: Context, cfg: ExportStage, names: tuple[str, ...], longformer: dict[str, Any] | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The export example and the checked shapes: a padded batch of real examples, one alone, a
    full-length batch (and a Longformer's window lengths)."""
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
    if longformer is not None:
        checks += _longformer_checks(tokenizer, texts, longformer, max_length, names, kind)
    return example, checks


def _is_longformer(config: dict[str, Any], cfg: ExportStage) -> bool:
    """True for a Longformer (its sliding-window attention exports as our WindowedAttention op). Any
    other attention that is not dense is refused: the exporters would silently turn it dense."""
    kind = sparse_attention_kind(config)
    if kind is None:
        return False
    if kind != "longformer":
        raise UserError(
            f"model: {kind} would be exported as dense attention; only Longformer's sliding window maps to "
            "our attention ops (use a checkpoint with dense attention)"
        )
    if cfg.exporter == "torchscript":
        raise UserError("stages: export: Longformer exports with the dynamo exporter; remove `exporter: torchscript`")
    return True


def _export_longformer(module: Any, example: dict[str, Any], path: Path, outputs: tuple[str, ...]) -> None:
    try:
        export_longformer(module, path, example=example, output_names=outputs)
    except ValueError as exc:  # a Longformer the exporter cannot map exactly (would come out dense)
        raise UserError(str(exc)) from None


def _custom_op_checks(
    module: Any, path: Path, checks: list[dict[str, Any]], agreement: Any, *, cfg: ExportStage, ctx: Context
) -> tuple[Any, dict[str, Any]]:
    """The checks again with our ops' native kernels, when built (validation times the model with
    them); the metrics the report shows for a graph with our ops."""
    ops = onnx_export.custom_ops(path)
    kernel = "function body"
    if native.available():
        fast = onnx_export.check_against_torch(module, path, checks, cfg.tolerance, native=True)
        ctx.log(f"ONNX Runtime (native kernels) matches PyTorch: max |diff| {fast.max_abs_diff:.2e}")
        agreement, kernel = max(agreement, fast, key=lambda a: a.max_abs_diff), "native"
    else:
        ctx.warn(
            "export: no native kernel library for this machine; ONNX Runtime runs the attention ops' "
            "function bodies (portable, slower): run `edge-compress build-ops`"
        )
    windowed = ["windowed"] * ops.get("WindowedAttention", 0)
    return agreement, {"attention": windowed, "custom_ops": ops, "custom_op_kernel": kernel}


def _longformer_checks(  # noqa: PLR0917
    tokenizer: Any, texts: list[Any], config: dict[str, Any], max_length: int, names: tuple[str, ...], kind: str
) -> list[dict[str, Any]]:
    """Lengths below, at, at multiples of and above the one-sided window (where HF pads to a multiple
    of the two-sided one), and a batch whose first tokens are global (attention_mask 2)."""
    windows = config.get("attention_window", 512)  # LongformerConfig's default
    one_side = min(windows if isinstance(windows, list) else [windows]) // 2
    checks = []
    for length in check_lengths(one_side, max_length):
        checks.append(hf.encode(tokenizer, texts[:2], length, names, pad_to=length, kind=kind))
        checks.append(hf.encode(tokenizer, texts[:3], length, names, kind=kind))
    glob = hf.encode(tokenizer, texts[:3], max_length, names, kind=kind)
    glob["attention_mask"][:, 0] *= 2  # real first tokens become global
    return [*checks, glob]


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
    for length in check_lengths(att.window or att.block or att.proj_len or 64, max_length):
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


def check_lengths(window: int, max_length: int) -> list[int]:
    """Sequence lengths that catch windowed/blocked export bugs: below, equal to, a multiple of and
    above the window (block), odd lengths (an Hourglass pads to its shortening factor), and the longest;
    those <= max_length, no repeats."""
    w = max(window, 1)
    wanted = [max(2, w // 2), w, w + 3, 2 * w, 3 * w + 5, max_length]
    return sorted({n for n in wanted if 2 <= n <= max_length})
