"""Which export a Hugging Face config.json asks for: dense, or windowed attention as our op (Longformer,
ModernBERT). Needs only the config, no torch: preflight asks it too, so `check` refuses what export would."""

from __future__ import annotations

from typing import Any

from compress.errors import UserError
from compress.stages.export.config import ExportStage
from exporters.hf_attention import check_modernbert, sparse_attention_kind

WINDOWED = ("longformer", "modernbert")


def windowed_kind(config: dict[str, Any], cfg: ExportStage) -> str | None:
    """ "longformer" or "modernbert" when the model's windowed attention exports as our op; None for a
    dense export (dense attention, or ModernBERT with `dense_attention: true`). A one-line UserError for
    attention we cannot keep and for a setting that contradicts the op. Needs only config.json: preflight
    calls it too, so `check` refuses what the export would."""
    try:
        kind = sparse_attention_kind(config)
        if kind == "modernbert" and not cfg.dense_attention:
            check_modernbert(config)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if kind is None:
        return None
    if kind not in WINDOWED:
        raise UserError(
            f"model: {kind} would be exported as dense attention; only Longformer's and ModernBERT's sliding "
            "windows map to our attention ops (use a checkpoint with dense attention)"
        )
    if cfg.dense_attention:
        if kind == "longformer":
            raise UserError("stages: export: dense_attention: Longformer has no dense export here; remove it")
        return None
    if cfg.exporter == "torchscript":
        raise UserError(f"stages: export: {kind} exports with the dynamo exporter; remove `exporter: torchscript`")
    return kind
