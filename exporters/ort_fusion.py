"""Operator fusion with ONNX Runtime's transformers optimizer (Attention, SkipLayerNorm, EmbedLayerNorm, Gelu).

Fused Attention and EmbedLayerNormalization are what ONNX Runtime's quantizer turns into its int8
kernels (QAttention, QEmbedLayerNormalization); unfused, a transformer quantizes to slower graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

# Hugging Face model_type -> the optimizer's model family. Others are left unfused, and the report says so.
OPTIMIZER_FAMILY = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "mpnet": "bert",
}


def fuse(source: Path, target: Path, config: dict[str, Any]) -> dict[str, int] | str:
    """Fuse `source` into `target`. Returns the fused operator counts, or why nothing was fused."""
    from onnxruntime.transformers import optimizer

    family = OPTIMIZER_FAMILY.get(str(config.get("model_type")))
    if family is None:
        return f"model type {config.get('model_type')!r} is not one ONNX Runtime's optimizer fuses"
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    logging.getLogger("fusion").setLevel(logging.ERROR)
    optimized = optimizer.optimize_model(
        str(source),
        model_type=family,
        num_heads=int(config.get("num_attention_heads", 0)),
        hidden_size=int(config.get("hidden_size", 0)),
    )
    optimized.save_model_to_file(str(target))
    return {op: int(n) for op, n in optimized.get_fused_operator_statistics().items() if n}
