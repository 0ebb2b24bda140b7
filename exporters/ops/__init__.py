"""Our custom ONNX ops (domain ai.edgecompress, version 1): WindowedAttention and BlockSparseAttention.

Each op has a PyTorch reference (shared with the zoo), a registered ONNX OpSchema with shape
inference, a torch custom op that the dynamo exporter translates into the op's node, and an ONNX
function body in standard ops that `attach_functions` adds to every exported model: any ONNX Runtime
runs the model with no native code, and uses the native kernel (exporters/native/) when registered.
"""

from __future__ import annotations

from typing import Any

from exporters.ops.common import DOMAIN, VERSION

__all__ = ["DOMAIN", "OP_NAMES", "VERSION", "attach_functions", "register_schemas"]

OP_NAMES = ("WindowedAttention", "BlockSparseAttention")
_registered = False


def _modules() -> list[Any]:
    from exporters.ops import block_sparse_attention, windowed_attention

    return [windowed_attention, block_sparse_attention]


def register_schemas() -> None:
    """Register the ops' schemas with onnx (once per process): the dynamo exporter and onnx.checker need them."""
    global _registered  # noqa: PLW0603 (onnx's schema registry is process-wide too)
    if _registered:
        return
    from onnx import defs

    for module in _modules():
        schema = module.op_schema()
        schema.set_type_and_shape_inference_function(_infer_like_q)
        if not defs.has(module.NAME, VERSION, DOMAIN):
            defs.register_schema(schema)
    _registered = True


def _infer_like_q(ctx: Any) -> None:
    """Y has Q's type and shape; the masks must be (B, S) where both are known."""
    from onnx import TensorProto

    q = ctx.get_input_type(0)
    shape = q.tensor_type.shape
    dims = list(shape.dim) if q.tensor_type.HasField("shape") else []
    if dims and len(dims) != 4:
        raise ValueError(f"Q must be (B, H, S, D), got rank {len(dims)}")
    for i in (3, 4):
        if i >= ctx.get_num_inputs() or not ctx.has_input(i):
            continue
        t = ctx.get_input_type(i)
        if t is None or not t.tensor_type.HasField("shape") or not dims:
            continue
        mdims = list(t.tensor_type.shape.dim)
        if t.tensor_type.elem_type == TensorProto.BOOL and len(mdims) == 2:
            for a, b in ((mdims[0], dims[0]), (mdims[1], dims[2])):
                if a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value:
                    raise ValueError(f"mask input {i} has shape {[d.dim_value for d in mdims]}, not (B, S)")
    ctx.set_output_type(0, q)


def function_protos(used: set[str]) -> list[Any]:
    """The function bodies of the ops named in `used`."""
    return [m.function_proto() for m in _modules() if m.NAME in used]


def attach_functions(model: Any) -> list[str]:
    """Add the function body of every custom op the model uses (and the domain import); returns their names."""
    from onnx import helper

    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    unknown = used - set(OP_NAMES)
    if unknown:
        raise ValueError(f"the graph uses {DOMAIN} ops this version does not define: {', '.join(sorted(unknown))}")
    have = {(f.domain, f.name) for f in model.functions}
    for proto in function_protos(used):
        if (proto.domain, proto.name) not in have:
            model.functions.append(proto)
    domains = {o.domain for o in model.opset_import}
    if used and DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return sorted(used)
