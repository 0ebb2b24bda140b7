"""export: PyTorch -> fp32 ONNX (fused where ONNX Runtime's optimizer can), checked against PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.recipe import ExportStage
from compress.tasks import TASKS
from exporters import onnx_export, ort_fusion


def run(artifact: Artifact, cfg: ExportStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind != "hf":
        raise UserError(f"stages: export needs a PyTorch model, but the previous stage produced {artifact.kind}")
    folder = artifact.file("model")
    config = hf.read_config(folder)
    tokenizer = hf.load_tokenizer(folder)
    names = hf.input_names(tokenizer, config)
    task = TASKS[ctx.recipe.task]
    module = task.build_module(hf.load_model(folder), ctx.recipe.model, names)
    max_length = ctx.recipe.data.max_length
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and max_length > positions:
        raise UserError(f"data.max_length: {max_length} exceeds the model's {positions} positions")

    texts = ctx.evaluation.texts[: cfg.check_samples]
    example = hf.encode(tokenizer, texts[:2], max_length, names)
    # Checked shapes: a padded batch of real texts, one text alone, and a full-length batch.
    checks = [
        hf.encode(tokenizer, texts, max_length, names),
        hf.encode(tokenizer, texts[:1], max_length, names),
        hf.encode(tokenizer, texts[:2], max_length, names, pad_to=max_length),
    ]

    raw = ctx.out_dir / "raw.onnx"
    model_path = ctx.out_dir / "model.onnx"
    ctx.log(f"exporting with the {cfg.exporter} exporter (opset {cfg.opset})")
    onnx_export.export(
        module, example=example, path=raw, output_names=task.OUTPUT_NAMES, exporter=cfg.exporter, opset=cfg.opset
    )
    fused: dict[str, int] | str = "disabled in the recipe"
    if cfg.optimize:
        fused = ort_fusion.fuse(raw, model_path, config)
        if isinstance(fused, str):
            ctx.warn(f"export: no operator fusion ({fused}); int8 kernels will cover fewer operators")
    if model_path.exists():
        raw.unlink()
    else:
        raw.rename(model_path)
    agreement = onnx_export.check_against_torch(module, model_path, checks, cfg.tolerance)
    ctx.log(f"ONNX Runtime matches PyTorch: max |diff| {agreement.max_abs_diff:.2e} <= {cfg.tolerance:g}")

    tok_dir = ctx.out_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    for name in ("config.json",):
        shutil.copy2(folder / name, ctx.out_dir / name)
    metrics = {
        "exporter": cfg.exporter,
        "opset": cfg.opset,
        "fused_ops": fused,
        "max_abs_diff": agreement.max_abs_diff,
        "mean_abs_diff": agreement.mean_abs_diff,
        "tolerance": cfg.tolerance,
        "shapes_checked": [list(s) for s in agreement.shapes_checked],
        "size_bytes": model_path.stat().st_size,
        "parameters": sum(p.numel() for p in module.parameters()),
    }
    meta: dict[str, Any] = {
        "inputs": list(names),
        "outputs": list(task.OUTPUT_NAMES),
        "precision": "fp32",
        "session": {},
        "max_positions": positions,
    }
    files: dict[str, Path] = {"model": model_path, "reference": model_path, "tokenizer": tok_dir}
    return Artifact("onnx", files, meta), metrics
