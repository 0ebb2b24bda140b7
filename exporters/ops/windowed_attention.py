"""ai.edgecompress::WindowedAttention: sliding-window attention with global tokens (Longformer-style).

    Y = WindowedAttention(Q, K, V, key_padding_mask?, global_mask?; window, causal=0)
    Q, K, V, Y: (B, H, S, D) float; key_padding_mask, global_mask: (B, S) bool.

Query i attends key j iff key j is real (key_padding_mask) and, when causal, j <= i, and at least one
of: |i - j| <= window, j is global, i is global. A global position that is padding is not global.
Scores are q·k / sqrt(D), softmax over the allowed keys; a query row with no allowed key is 0.

The three implementations of these semantics:
- PyTorch: `compress.models.attention.banded_attention`, shared with the zoo (it leaves rows with no
  allowed key unspecified: outputs at padding positions are compared masked);
- the ONNX function body below, standard opset-18 ops, banded: queries in chunks of `window`, each
  against its own and its two neighbour chunks of keys (3·window), plus G global key columns and G
  global query rows. Memory O(S·(3w + G) + G·S), never S x S;
- the native kernel in exporters/native/ (when its library is registered with the session).
"""

from __future__ import annotations

from typing import Any

import onnxscript
from onnxscript import BOOL, FLOAT
from onnxscript import opset18 as op

from exporters.ops.schema import DOMAIN, EC, NEG, formal, schema

NAME = "WindowedAttention"


def op_schema() -> Any:
    from onnx import defs, helper

    return schema(
        NAME,
        doc=__doc__ or "",
        inputs=[
            formal("Q", "T", "queries (B, H, S, D)"),
            formal("K", "T", "keys (B, H, S, D)"),
            formal("V", "T", "values (B, H, S, D)"),
            formal("key_padding_mask", "tensor(bool)", "(B, S): true for real tokens; absent: all real", True),
            formal("global_mask", "tensor(bool)", "(B, S): true for global tokens; absent: none", True),
        ],
        attributes=[
            defs.OpSchema.Attribute("window", defs.OpSchema.AttrType.INT, "half-width w > 0: |i - j| <= w"),
            defs.OpSchema.Attribute("causal", helper.make_attribute("causal", 0), "1: query i sees keys j <= i"),
        ],
    )


@onnxscript.script(EC, default_opset=op)
def WindowedAttention(
    Q: FLOAT, K: FLOAT, V: FLOAT, key_padding_mask: BOOL, global_mask: BOOL, window: int, causal: int = 0
) -> FLOAT:
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    w = op.Unsqueeze(op.Constant(value_int=window), zero)  # (1,)
    is_causal = op.Greater(op.Constant(value_int=causal), op.Constant(value_int=0))  # () bool
    neg = op.Constant(value_float=NEG)

    shape = op.Shape(Q)
    b = op.Slice(shape, zero, one)
    h = op.Slice(shape, one, two)
    s = op.Slice(shape, two, op.Constant(value_ints=[3]))
    d = op.Slice(shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    n = op.Div(op.Sub(op.Add(s, w), one), w)  # chunks of w queries: ceil(S / w)
    p = op.Mul(n, w)  # padded length
    pad = op.Sub(p, s)
    scale = op.Reciprocal(op.Sqrt(op.Cast(d, to=1)))

    pad4 = op.Concat(zero, zero, zero, zero, zero, zero, pad, zero, axis=0)  # pad axis 2 at its end
    chunked = op.Concat(b, h, n, w, d, axis=0)
    qc = op.Reshape(op.Pad(op.Mul(Q, scale), pad4), chunked)  # (B, H, n, w, D), pre-scaled
    kc = op.Reshape(op.Pad(K, pad4), chunked)
    vc = op.Reshape(op.Pad(V, pad4), chunked)
    # Each chunk's keys: the previous, its own and the next chunk (zeros beyond the ends), 3w positions.
    before = op.Concat(zero, zero, one, zero, zero, zero, zero, zero, zero, zero, axis=0)
    after = op.Concat(zero, zero, zero, zero, zero, zero, zero, one, zero, zero, axis=0)
    kw = op.Concat(
        op.Slice(op.Pad(kc, before), zero, n, two), kc, op.Slice(op.Pad(kc, after), one, op.Add(n, one), two), axis=3
    )  # (B, H, n, 3w, D)
    vw = op.Concat(
        op.Slice(op.Pad(vc, before), zero, n, two), vc, op.Slice(op.Pad(vc, after), one, op.Add(n, one), two), axis=3
    )

    # Keys inside windows: real and not global (global keys are scored once, in their own columns).
    real = key_padding_mask
    glob = op.And(global_mask, real)
    local = op.And(real, op.Not(glob))
    mpad = op.Concat(zero, zero, zero, pad, axis=0)
    mc = op.Reshape(op.Pad(op.Cast(local, to=1), mpad), op.Concat(b, n, w, axis=0))  # (B, n, w), 1.0 = visible
    mbefore = op.Concat(zero, one, zero, zero, zero, zero, axis=0)
    mafter = op.Concat(zero, zero, zero, zero, one, zero, axis=0)
    mw = op.Concat(
        op.Slice(op.Pad(mc, mbefore), zero, n, one),
        mc,
        op.Slice(op.Pad(mc, mafter), one, op.Add(n, one), one),
        axis=2,
    )  # (B, n, 3w)
    mw = op.Greater(mw, op.Constant(value_float=0.5))
    # The band: query i of a chunk sees span position j iff |j - w - i| <= w (and j - w - i <= 0 if causal).
    ws = op.Squeeze(w, zero)
    qi = op.Range(op.Constant(value_int=0), ws, op.Constant(value_int=1))  # (w,)
    kj = op.Range(op.Constant(value_int=0), op.Mul(ws, op.Constant(value_int=3)), op.Constant(value_int=1))
    rel = op.Sub(op.Sub(op.Unsqueeze(kj, zero), ws), op.Unsqueeze(qi, one))  # (w, 3w)
    band = op.And(
        op.LessOrEqual(op.Abs(rel), ws), op.Or(op.Not(is_causal), op.LessOrEqual(rel, op.Constant(value_int=0)))
    )
    allowed_w = op.And(op.Unsqueeze(band, op.Constant(value_ints=[0, 1])), op.Unsqueeze(mw, two))  # (B, n, w, 3w)

    # Global keys: the G leading true positions of global_mask per row (G = the most in any row, >= 1).
    count = op.ReduceMax(op.ReduceSum(op.Cast(glob, to=7), one, keepdims=0), keepdims=1)
    g = op.Max(count, one)
    gval, gidx = op.TopK(op.Cast(glob, to=1), g, axis=1, largest=1, sorted=1)  # (B, G): ties by position
    gvalid = op.Greater(gval, op.Constant(value_float=0.5))
    gshape = op.Concat(b, h, g, d, axis=0)
    gidx4 = op.Expand(op.Unsqueeze(gidx, op.Constant(value_ints=[1, 3])), gshape)  # (B, H, G, D)
    kg = op.GatherElements(K, gidx4, axis=2)
    vg = op.GatherElements(V, gidx4, axis=2)
    qpos = op.Reshape(
        op.Range(op.Constant(value_int=0), op.Squeeze(p, zero), op.Constant(value_int=1)), op.Concat(n, w, one, axis=0)
    )
    gcausal = op.Or(op.Not(is_causal), op.LessOrEqual(op.Unsqueeze(gidx, op.Constant(value_ints=[1, 2])), qpos))
    allowed_g = op.And(op.Unsqueeze(gvalid, op.Constant(value_ints=[1, 2])), gcausal)  # (B, n, w, G)

    scores = op.Concat(
        op.MatMul(qc, op.Transpose(kw, perm=[0, 1, 2, 4, 3])),
        op.MatMul(qc, op.Unsqueeze(op.Transpose(kg, perm=[0, 1, 3, 2]), two)),
        axis=4,
    )  # (B, H, n, w, 3w + G)
    allowed = op.Unsqueeze(op.Concat(allowed_w, allowed_g, axis=3), one)  # (B, 1, n, w, 3w + G)
    probs = op.Mul(op.Softmax(op.Where(allowed, scores, neg), axis=4), op.Cast(allowed, to=1))  # no key: 0
    values = op.Concat(vw, op.Expand(op.Unsqueeze(vg, two), op.Concat(b, h, n, g, d, axis=0)), axis=3)
    out = op.MatMul(probs, values)  # (B, H, n, w, D)
    out = op.Slice(op.Reshape(out, op.Concat(b, h, p, d, axis=0)), zero, s, two)  # (B, H, S, D)

    # Global queries see every real key (and, if causal, the ones before them): G rows of S, O(G·S).
    qg = op.GatherElements(op.Mul(Q, scale), gidx4, axis=2)  # (B, H, G, D)
    kpos = op.Range(op.Constant(value_int=0), op.Squeeze(s, zero), op.Constant(value_int=1))  # (S,)
    rcausal = op.Or(op.Not(is_causal), op.LessOrEqual(kpos, op.Unsqueeze(gidx, two)))  # (B, G, S)
    rallowed = op.Unsqueeze(op.And(op.Unsqueeze(real, one), rcausal), one)  # (B, 1, G, S)
    rscores = op.MatMul(qg, op.Transpose(K, perm=[0, 1, 3, 2]))  # (B, H, G, S)
    rprobs = op.Mul(op.Softmax(op.Where(rallowed, rscores, neg), axis=3), op.Cast(rallowed, to=1))
    rows = op.MatMul(rprobs, V)  # (B, H, G, D)
    keep = op.Unsqueeze(gvalid, op.Constant(value_ints=[1, 3]))  # (B, 1, G, 1): padded G entries keep theirs
    rows = op.Where(keep, rows, op.GatherElements(out, gidx4, axis=2))
    return op.ScatterElements(out, gidx4, rows, axis=2)


def function_proto() -> Any:
    """The op's ONNX function (the portable body), for model.functions."""
    proto = WindowedAttention.to_function_proto()
    assert proto.domain == DOMAIN
    return proto
