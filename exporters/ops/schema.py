"""What the custom ops share: their domain, schema helpers, the masked-score constant."""

from __future__ import annotations

from typing import Any

import onnxscript

DOMAIN = "ai.edgecompress"
VERSION = 1
EC = onnxscript.values.Opset(DOMAIN, VERSION)
# ONNX Runtime's contrib ops: MultiHeadAttention runs full attention as a tiled (flash) kernel on CPU,
# O(S) memory, when it is given no mask.
MSFT = onnxscript.values.Opset("com.microsoft", 1)
NEG = -1e9  # a masked score (finite, as in the PyTorch reference)


def formal(name: str, type_str: str, doc: str, optional: bool = False) -> Any:
    from onnx import defs

    option = defs.OpSchema.FormalParameterOption
    return defs.OpSchema.FormalParameter(
        name, type_str, doc, param_option=option.Optional if optional else option.Single
    )


def schema(name: str, *, doc: str, inputs: list[Any], attributes: list[Any]) -> Any:
    from onnx import defs

    return defs.OpSchema(
        name,
        DOMAIN,
        VERSION,
        doc=doc,
        inputs=inputs,
        outputs=[formal("Y", "T", "(B, H, S, D), like Q")],
        type_constraints=[("T", ["tensor(float)"], "float32 (quantized models keep the op in float)")],
        attributes=attributes,
    )
