"""How close an int8 ONNX model stays to its fp32 reference, measured quickly on a few evaluation texts.

quantize and qat both check their artifact this way before validate measures it in full.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.context import Context
from compress.runtime import feeds
from compress.runtime.session import session
from compress.tasks.metrics import cosine_fidelity

# Static QDQ: ONNX Runtime's MatMulAddFusion rewrites MatMul+Add on 3-D activations into Reshape->Gemm,
# after which the QDQ pairs no longer fuse into int8 kernels (docs/notes/quantization-facts.md).
QDQ_SESSION: dict[str, Any] = {"disabled_optimizers": ["MatMulAddFusion"]}


def quick_fidelity(artifact: Artifact, model: Path, settings: dict[str, Any], ctx: Context) -> dict[str, float]:
    """Cosine of the int8 outputs to the fp32 reference's on 8 evaluation texts (validate does the rest)."""
    length = artifact.usable_length(ctx.data.max_length)
    inputs = feeds.encoder(artifact)(feeds.evaluation_texts(ctx)[:8], length, None)
    ref = session(artifact.file("reference"), threads=2).run(None, inputs)[0]
    got = session(model, threads=2, settings=settings).run(None, inputs)[0]
    mask = inputs["attention_mask"].astype(bool)
    if got.shape[:2] == mask.shape:  # per-token outputs (LM logits): real tokens only
        got, ref = got[mask], ref[mask]
    return cosine_fidelity(got, ref)
