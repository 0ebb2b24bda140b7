"""The export stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.strict import Strict


class ExportStage(Strict):
    type: Literal["export"]
    exporter: Literal["torchscript", "dynamo"] | None = Field(
        None,
        description=(
            "torch.onnx exporter; default torchscript for Hugging Face models, dynamo for zoo models. "
            "torchscript: ONNX Runtime's transformers optimizer fuses its graph into Attention/SkipLayerNorm/"
            "EmbedLayerNorm, which the quantizer turns into int8 kernels. dynamo: the newer exporter; its graph "
            "fuses less; zoo models need it (windowed and block-sparse attention become custom ops)."
        ),
    )
    dense_attention: bool = Field(
        False,
        description=(
            "Export a ModernBERT's sliding-window layers as dense scores under a band mask (standard ONNX ops "
            "only, quadratic in the length), for a runtime that cannot load our attention ops. Default: they "
            "become ai.edgecompress::WindowedAttention (linear in the length)."
        ),
    )
    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the exported graph.")
    optimize: bool = Field(
        True, description="Run ONNX Runtime's transformers optimizer (operator fusion) on the exported graph."
    )
    tolerance: float = Field(
        1e-4,
        gt=0,
        le=10,
        description="Largest allowed |ONNX Runtime - PyTorch| on real inputs; beyond it the stage fails.",
    )
    check_samples: int = Field(
        16, ge=1, le=10_000, description="Evaluation texts used for the PyTorch/ONNX Runtime check."
    )
