"""ai.edgecompress::LSHAttention: Reformer's LSH attention (Kitaev et al. 2020) with fixed rotations.

    Y = LSHAttention(QK, V, key_padding_mask?, rotations; chunk, causal=0)
    QK, V, Y: (B, H, S, D) float; key_padding_mask: (B, S) bool; rotations: (R, D, K/2) float.

Queries and keys are the same vectors (QK); key j is QK_j / |QK_j|. In each of the R rounds, position i
gets bucket argmax([QK_i R_r, -QK_i R_r]) in 0..K-1 (first maximum on ties), padding gets bucket K.
Positions are sorted by (bucket, position) and cut into S / chunk chunks (S must be a multiple of
chunk); a query sees the keys of its own chunk and of the chunk before it (the first chunk: its own).
Among those it may attend key j iff j is real and, when causal, j <= i; its own position scores -1e5
(it is seen only when nothing else is). Scores are QK_i·key_j / sqrt(D); round r gives out_r and
lse_r = log-sum-exp of its scores, and Y_i = sum_r softmax_r(lse_r) out_r.

The three implementations of these semantics:
- PyTorch: `compress.models.lsh.lsh_attention`, the zoo's `lsh` kind (in training it draws fresh
  rotations; the exported model has the saved ones as this input);
- the ONNX function body below, standard opset-18 ops: TopK sorts, GatherElements and ScatterElements
  move rows to and from the sorted order; scores are R x (S / chunk) x chunk x 2·chunk, memory
  O(R·S·chunk), never S x S;
- the native kernel in exporters/native/ (when its library is registered with the session).
"""

from __future__ import annotations

from typing import Any

import onnxscript
from onnxscript import BOOL, FLOAT
from onnxscript import opset18 as op

from exporters.ops.schema import DOMAIN, EC, NEG, formal, schema

NAME = "LSHAttention"
SELF = -1e5  # a position's score for itself (compress.models.lsh.SELF)


def op_schema() -> Any:
    from onnx import defs, helper

    return schema(
        NAME,
        doc=__doc__ or "",
        inputs=[
            formal("QK", "T", "shared queries and keys (B, H, S, D)"),
            formal("V", "T", "values (B, H, S, D)"),
            formal("key_padding_mask", "tensor(bool)", "(B, S): true for real tokens; absent: all real", True),
            formal("rotations", "T", "(R, D, K/2): one random rotation per hashing round; K buckets"),
        ],
        attributes=[
            defs.OpSchema.Attribute("chunk", defs.OpSchema.AttrType.INT, "positions per chunk; divides S"),
            defs.OpSchema.Attribute("causal", helper.make_attribute("causal", 0), "1: query i sees keys j <= i"),
        ],
    )


@onnxscript.script(EC, default_opset=op)
def LSHAttention(QK: FLOAT, V: FLOAT, key_padding_mask: BOOL, rotations: FLOAT, chunk: int, causal: int = 0) -> FLOAT:
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    three = op.Constant(value_ints=[3])
    four = op.Constant(value_ints=[4])
    is_causal = op.Greater(op.Constant(value_int=causal), op.Constant(value_int=0))
    c = op.Unsqueeze(op.Constant(value_int=chunk), zero)  # (1,)

    shape = op.Shape(QK)
    b = op.Slice(shape, zero, one)
    h = op.Slice(shape, one, two)
    s = op.Slice(shape, two, three)
    d = op.Slice(shape, three, four)
    r = op.Slice(op.Shape(rotations), zero, one)
    padding_bucket = op.Mul(op.Slice(op.Shape(rotations), two, three), two)  # K: after every real bucket
    n = op.Div(s, c)
    scale = op.Reciprocal(op.Sqrt(op.Cast(d, to=1)))

    # Hash: (B, H, 1, S, D) @ (R, D, K/2) -> (B, H, R, S, K/2); bucket = argmax over [x R, -x R].
    rotated = op.MatMul(op.Unsqueeze(QK, two), rotations)
    hashed = op.ArgMax(op.Concat(rotated, op.Neg(rotated), axis=4), axis=4, keepdims=0)  # (B, H, R, S)
    real4 = op.Unsqueeze(key_padding_mask, op.Constant(value_ints=[1, 2]))  # (B, 1, 1, S)
    buckets = op.Where(real4, hashed, padding_bucket)
    pos = op.Range(op.Constant(value_int=0), op.Squeeze(s, zero), op.Constant(value_int=1))  # (S,)
    sort_key = op.Add(op.Mul(buckets, s), pos)  # unique per round
    each = op.Concat(b, h, r, s, axis=0)
    _values, order = op.TopK(sort_key, s, axis=3, largest=0, sorted=1)  # (B, H, R, S) ascending

    rows = op.Concat(b, h, r, s, d, axis=0)
    idx = op.Expand(op.Unsqueeze(order, four), rows)  # (B, H, R, S, D)
    q_sorted = op.GatherElements(op.Expand(op.Unsqueeze(QK, two), rows), idx, axis=3)
    v_sorted = op.GatherElements(op.Expand(op.Unsqueeze(V, two), rows), idx, axis=3)
    norm = op.Max(op.ReduceL2(q_sorted, four, keepdims=1), op.Constant(value_float=1e-6))
    chunked = op.Concat(b, h, r, n, c, d, axis=0)
    qc = op.Reshape(op.Mul(q_sorted, scale), chunked)  # (B, H, R, n, c, D), pre-scaled
    kc = op.Reshape(op.Div(q_sorted, norm), chunked)
    vc = op.Reshape(v_sorted, chunked)
    slots = op.Concat(b, h, r, n, c, axis=0)
    pc = op.Reshape(order, slots)  # (B, H, R, n, c): original position of each sorted slot
    real = op.Reshape(op.GatherElements(op.Expand(real4, each), order, axis=3), slots)

    # The chunk before each chunk (rolled by one); the first chunk's "before" is masked out below.
    last = op.Sub(n, one)
    kw = op.Concat(op.Concat(op.Slice(kc, last, n, three), op.Slice(kc, zero, last, three), axis=3), kc, axis=4)
    vw = op.Concat(op.Concat(op.Slice(vc, last, n, three), op.Slice(vc, zero, last, three), axis=3), vc, axis=4)
    kpos = op.Concat(op.Concat(op.Slice(pc, last, n, three), op.Slice(pc, zero, last, three), axis=3), pc, axis=4)
    real_before = op.Concat(op.Slice(real, last, n, three), op.Slice(real, zero, last, three), axis=3)
    chunk_index = op.Range(op.Constant(value_int=0), op.Squeeze(n, zero), op.Constant(value_int=1))
    not_first = op.Unsqueeze(op.Greater(chunk_index, op.Constant(value_int=0)), one)  # (n, 1)
    kreal = op.Concat(op.And(real_before, not_first), real, axis=4)  # (B, H, R, n, 2c)

    scores = op.MatMul(qc, op.Transpose(kw, perm=[0, 1, 2, 3, 5, 4]))  # (B, H, R, n, c, 2c)
    qpos = op.Unsqueeze(pc, op.Constant(value_ints=[5]))  # (B, H, R, n, c, 1)
    kpos6 = op.Unsqueeze(kpos, four)  # (B, H, R, n, 1, 2c)
    allowed = op.And(op.Unsqueeze(kreal, four), op.Or(op.Not(is_causal), op.LessOrEqual(kpos6, qpos)))
    scores = op.Where(op.Equal(kpos6, qpos), op.Constant(value_float=SELF), scores)
    scores = op.Where(allowed, scores, op.Constant(value_float=NEG))
    out = op.MatMul(op.Softmax(scores, axis=5), vw)  # (B, H, R, n, c, D)
    lse = op.ReduceLogSumExp(scores, op.Constant(value_ints=[5]), keepdims=0)  # (B, H, R, n, c)

    # Back to the original order; the rounds weighed by softmax over their log-sum-exp.
    out = op.ScatterElements(op.Expand(op.Constant(value_float=0.0), rows), idx, op.Reshape(out, rows), axis=3)
    lse = op.ScatterElements(op.Expand(op.Constant(value_float=0.0), each), order, op.Reshape(lse, each), axis=3)
    weights = op.Unsqueeze(op.Softmax(lse, axis=2), four)  # (B, H, R, S, 1)
    return op.ReduceSum(op.Mul(weights, out), two, keepdims=0)  # (B, H, S, D)


def function_proto() -> Any:
    """The op's ONNX function (the portable body), for model.functions."""
    proto = LSHAttention.to_function_proto()
    assert proto.domain == DOMAIN
    return proto
