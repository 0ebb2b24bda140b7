"""Our custom ONNX ops (domain ai.edgecompress, version 1): WindowedAttention, BlockSparseAttention and
LSHAttention.

Each op has a PyTorch reference (shared with the zoo), a registered ONNX OpSchema with shape
inference, a torch custom op that the dynamo exporter translates into the op's node, and an ONNX
function body in standard ops that `attach_functions` adds to every exported model: any ONNX Runtime
runs the model with no native code, and uses the native kernel (exporters/native/) when registered.
"""

from __future__ import annotations

from typing import Any

from exporters.ops import block_sparse_attention, lsh_attention, windowed_attention
from exporters.ops.schema import DOMAIN, VERSION

__all__ = ["DOMAIN", "OP_NAMES", "VERSION", "attach_functions", "register_schemas"]

OP_NAMES = ("WindowedAttention", "BlockSparseAttention", "LSHAttention")
_registered = False


def _modules() -> list[Any]:
    return [windowed_attention, block_sparse_attention, lsh_attention]


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
    if not defs.has("MultiHeadAttention", 1, "com.microsoft"):
        defs.register_schema(_multihead_schema())
    _registered = True


def _multihead_schema() -> Any:
    """The part of ONNX Runtime's com.microsoft::MultiHeadAttention (contrib op, version 1) our exports
    use: query, key, value (B, S, heads * D), no mask, bias or cache; Y like the query. onnx ships no
    schema for ONNX Runtime's contrib ops; the exporter and onnx.checker need one."""
    from onnx import defs, helper

    from exporters.ops.schema import formal

    schema = defs.OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        doc="ONNX Runtime's multi-head attention; here always without a mask (its tiled CPU kernel).",
        inputs=[formal(n, "T", f"{n} (B, S, heads * D)") for n in ("query", "key", "value")],
        outputs=[formal("output", "T", "(B, S, heads * D)")],
        type_constraints=[("T", ["tensor(float)"], "float32")],
        attributes=[
            defs.OpSchema.Attribute("num_heads", defs.OpSchema.AttrType.INT, "number of heads"),
            defs.OpSchema.Attribute("scale", helper.make_attribute("scale", 0.0), "score scale; 0: 1/sqrt(D)"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_like_first)
    return schema


def _infer_like_first(ctx: Any) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


def _infer_like_q(ctx: Any) -> None:
    """Y has Q's type and shape; the masks (rank-2 bool inputs) must be (B, S) where both are known."""
    from onnx import TensorProto

    q = ctx.get_input_type(0)
    shape = q.tensor_type.shape
    dims = list(shape.dim) if q.tensor_type.HasField("shape") else []
    if dims and len(dims) != 4:
        raise ValueError(f"Q must be (B, H, S, D), got rank {len(dims)}")
    for i in range(1, ctx.get_num_inputs()):
        if not ctx.has_input(i):
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
    _fill_absent_masks(model)
    have = {(f.domain, f.name) for f in model.functions}
    for proto in function_protos(used):
        if (proto.domain, proto.name) not in have:
            model.functions.append(proto)
    domains = {o.domain for o in model.opset_import}
    if used and DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return sorted(used)


# Optional mask inputs per op: input index -> the value an absent mask means (all real / none global).
_OPTIONAL_MASKS = {
    "WindowedAttention": {3: True, 4: False},
    "BlockSparseAttention": {3: True},
    "LSHAttention": {2: True},
}


def _fill_absent_masks(model: Any) -> int:
    """Give every node of our ops explicit masks where they are absent ("" or missing); returns how many.

    ONNX has no way for a function body to test whether an optional input was given, so the body takes
    both masks; a node that omits one gets a (B, S) constant of the absent meaning, built from Q's shape
    (Shape -> Gather [0, 2] -> ConstantOfShape). The native kernels read the masks the same way."""
    from onnx import TensorProto, helper

    nodes = []
    filled = 0
    for index, node in enumerate(model.graph.node):
        defaults = _OPTIONAL_MASKS.get(node.op_type) if node.domain == DOMAIN else None
        if defaults:
            last = max(defaults) if node.op_type == "WindowedAttention" else len(node.input) - 1
            inputs = list(node.input) + [""] * max(0, last + 1 - len(node.input))
            prefix = f"{node.name or node.op_type}_{index}_ec"
            for position, value in defaults.items():
                if position < len(inputs) and inputs[position] == "":
                    name = f"{prefix}_mask{position}"
                    nodes += [
                        helper.make_node("Shape", [node.input[0]], [f"{name}_shape"]),
                        helper.make_node("Constant", [], [f"{name}_axes"], value_ints=[0, 2]),
                        helper.make_node("Gather", [f"{name}_shape", f"{name}_axes"], [f"{name}_bs"], axis=0),
                        helper.make_node(
                            "ConstantOfShape",
                            [f"{name}_bs"],
                            [name],
                            value=helper.make_tensor("value", TensorProto.BOOL, [1], [value]),
                        ),
                    ]
                    inputs[position] = name
                    filled += 1
            del node.input[:]
            node.input.extend(inputs)
        nodes.append(node)
    if filled:
        copies = [type(n)() for n in nodes]
        for copy, original in zip(copies, nodes, strict=True):
            copy.CopyFrom(original)
        del model.graph.node[:]
        model.graph.node.extend(copies)
    return filled
