"""ai.edgecompress::BlockSparseAttention: BigBird-style block-sparse attention.

    Y = BlockSparseAttention(Q, K, V, key_padding_mask?, layout; block_size, global_blocks=0)
    Q, K, V, Y: (B, H, S, D) float; key_padding_mask: (B, S) bool; layout: (T, N, N) bool.

S must be a multiple of block_size; nb = S / block_size blocks, and layout[nb - 1, :nb, :nb] says which
key blocks each query block sees (a table per block count, because seeded random blocks differ with
the length; the exporter stores it as a constant for every length up to the model's maximum). Query i
in block bi attends key j in block bj iff that layout entry is true and key j is real. Scores are
q·k / sqrt(D); a query row with no allowed key is 0.

`global_blocks` g says the first g query blocks have all-true layout rows (BigBird's global tokens):
the function body computes them as g·b dense rows, and the other rows against their K selected key
blocks (K = the most any non-global row has): memory O(S·K·b + g·b·S), never S x S. The native kernel
(exporters/native/) reads the layout alone. The PyTorch reference is the zoo's BlockSparseAttention.
"""

from __future__ import annotations

from typing import Any

import onnxscript
from onnxscript import BOOL, FLOAT
from onnxscript import opset18 as op

from exporters.ops.schema import DOMAIN, EC, NEG, formal, schema

NAME = "BlockSparseAttention"


def op_schema() -> Any:
    from onnx import defs, helper

    return schema(
        NAME,
        doc=__doc__ or "",
        inputs=[
            formal("Q", "T", "queries (B, H, S, D)"),
            formal("K", "T", "keys (B, H, S, D)"),
            formal("V", "T", "values (B, H, S, D)"),
            formal("key_padding_mask", "tensor(bool)", "(B, S): true for real tokens", True),
            formal("layout", "tensor(bool)", "(T, N, N): layout[nb - 1] for nb blocks"),
        ],
        attributes=[
            defs.OpSchema.Attribute("block_size", defs.OpSchema.AttrType.INT, "block size b > 0"),
            defs.OpSchema.Attribute(
                "global_blocks", helper.make_attribute("global_blocks", 0), "leading query blocks with full rows"
            ),
        ],
    )


@onnxscript.script(EC, default_opset=op)
def BlockSparseAttention(
    Q: FLOAT, K: FLOAT, V: FLOAT, key_padding_mask: BOOL, layout: BOOL, block_size: int, global_blocks: int = 0
) -> FLOAT:
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    three = op.Constant(value_ints=[3])
    bs = op.Unsqueeze(op.Constant(value_int=block_size), zero)  # (1,)
    neg = op.Constant(value_float=NEG)

    shape = op.Shape(Q)
    b = op.Slice(shape, zero, one)
    h = op.Slice(shape, one, two)
    s = op.Slice(shape, two, three)
    d = op.Slice(shape, three, op.Constant(value_ints=[4]))
    nb = op.Div(s, bs)
    g = op.Min(op.Unsqueeze(op.Constant(value_int=global_blocks), zero), nb)  # dense leading blocks
    scale = op.Reciprocal(op.Sqrt(op.Cast(d, to=1)))
    qs = op.Mul(Q, scale)
    real = key_padding_mask

    lay = op.Gather(layout, op.Sub(nb, one), axis=0)  # (1, N, N)
    lay = op.Slice(
        op.Squeeze(lay, zero), op.Concat(zero, zero, axis=0), op.Concat(nb, nb, axis=0), op.Constant(value_ints=[0, 1])
    )
    full = op.Cast(lay, to=1)  # (nb, nb)
    rows = op.Slice(full, g, nb, zero)  # (nb - g, nb): the sparse query blocks
    # K key blocks per sparse query block: the most any of them has (at least 1); TopK lists them
    # (over all rows, then the sparse ones are kept: ONNX Runtime's TopK rejects an empty input).
    width = op.ReduceMax(
        op.Concat(op.ReduceSum(rows, one, keepdims=0), op.Constant(value_floats=[1.0]), axis=0), keepdims=1
    )
    kval, order = op.TopK(full, op.Cast(width, to=7), axis=1, largest=1, sorted=1)  # (nb, K)
    kval = op.Slice(kval, g, nb, zero)  # (nb - g, K)
    order = op.Slice(order, g, nb, zero)
    valid = op.Greater(kval, op.Constant(value_float=0.5))
    m = op.Sub(nb, g)
    kb_shape = op.Concat(b, h, nb, bs, d, axis=0)
    kb = op.Gather(op.Reshape(K, kb_shape), order, axis=2)  # (B, H, nb - g, K, b, D)
    vb = op.Gather(op.Reshape(V, kb_shape), order, axis=2)
    span = op.Mul(op.Cast(width, to=7), bs)
    keys = op.Reshape(kb, op.Concat(b, h, m, span, d, axis=0))  # (B, H, nb - g, K·b, D)
    values = op.Reshape(vb, op.Concat(b, h, m, span, d, axis=0))
    mb = op.Gather(op.Reshape(real, op.Concat(b, nb, bs, axis=0)), order, axis=1)  # (B, nb - g, K, b)
    ok = op.And(mb, op.Unsqueeze(op.Unsqueeze(valid, zero), three))
    ok = op.Unsqueeze(
        op.Reshape(ok, op.Concat(b, m, span, axis=0)), op.Constant(value_ints=[1, 3])
    )  # (B, 1, m, 1, K·b)
    qb = op.Slice(op.Reshape(qs, kb_shape), g, nb, two)  # (B, H, nb - g, b, D)
    scores = op.MatMul(qb, op.Transpose(keys, perm=[0, 1, 2, 4, 3]))  # (B, H, nb - g, b, K·b)
    probs = op.Mul(op.Softmax(op.Where(ok, scores, neg), axis=4), op.Cast(ok, to=1))
    sparse = op.Reshape(op.MatMul(probs, values), op.Concat(b, h, op.Mul(m, bs), d, axis=0))

    # The global query blocks: g·b dense rows against every real key.
    gq = op.Slice(qs, zero, op.Mul(g, bs), two)  # (B, H, g·b, D)
    allowed = op.Unsqueeze(real, op.Constant(value_ints=[1, 2]))  # (B, 1, 1, S)
    dscores = op.MatMul(gq, op.Transpose(K, perm=[0, 1, 3, 2]))
    dprobs = op.Mul(op.Softmax(op.Where(allowed, dscores, neg), axis=3), op.Cast(allowed, to=1))
    dense = op.MatMul(dprobs, V)
    return op.Concat(dense, sparse, axis=2)


def function_proto() -> Any:
    """The op's ONNX function (the portable body), for model.functions."""
    proto = BlockSparseAttention.to_function_proto()
    assert proto.domain == DOMAIN
    return proto
