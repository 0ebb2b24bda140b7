"""The custom ops' ONNX function bodies against the PyTorch references, and their schemas."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.models.attention import AttentionConfig, BlockSparseAttention, banded_attention
from exporters.ops import DOMAIN, attach_functions, register_schemas

H, D = 3, 4


def _model(node: Any, extra_inputs: list[Any], initializers: list[Any] | None = None) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", H, "S", D]) for n in "QKV"] + extra_inputs
    graph = helper.make_graph(
        [node],
        "op",
        inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", H, "S", D])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)], ir_version=10
    )
    attach_functions(model)
    return model


def _masks(b: int, s: int, pad: int, glob: int) -> tuple[torch.Tensor, torch.Tensor]:
    real = torch.ones(b, s, dtype=torch.bool)
    if pad and s > pad:
        real[-1, s - pad :] = False
    glob_mask = torch.zeros(b, s, dtype=torch.bool)
    glob_mask[:, :glob] = True
    return real, glob_mask & real


def _compare_real_rows(got: np.ndarray, want: torch.Tensor, real: torch.Tensor) -> float:
    keep = real.numpy()[:, None, :, None].repeat(got.shape[1], 1).repeat(got.shape[3], 3)
    return float(np.abs(got - want.numpy())[keep].max())


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("causal", [0, 1])
def test_windowed_function_body_matches_reference(causal: int) -> None:
    window = 8
    node = helper.make_node(
        "WindowedAttention", ["Q", "K", "V", "m", "g"], ["Y"], domain=DOMAIN, window=window, causal=causal
    )
    masks = [helper.make_tensor_value_info(n, TensorProto.BOOL, ["B", "S"]) for n in "mg"]
    sess = _session(_model(node, masks))
    torch.manual_seed(causal)
    # lengths below, equal to, a multiple of, above the window, and odd; with and without globals/padding
    for s in (3, 8, 16, 24, 37):
        for glob, pad in ((0, 0), (2, 0), (0, 5), (2, 5)):
            q, k, v = (torch.randn(2, H, s, D) for _ in range(3))
            real, gm = _masks(2, s, pad, glob)
            want = banded_attention(q, k, v, real, window=window, causal=bool(causal), global_mask=gm if glob else None)
            got = sess.run(None, {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy(), "m": real.numpy(), "g": gm.numpy()})
            assert _compare_real_rows(got[0], want, real) < 1e-5, (s, glob, pad)


@pytest.mark.parametrize(
    "inputs", [["Q", "K", "V", "m"], ["Q", "K", "V", "m", ""], ["Q", "K", "V"], ["Q", "K", "V", "", "g"]]
)
def test_windowed_absent_masks_mean_all_real_and_no_globals(inputs: list[str]) -> None:
    """Optional masks left out (or given as "") run in the function body with their documented meaning."""
    node = helper.make_node("WindowedAttention", inputs, ["Y"], domain=DOMAIN, window=4)
    names = [n for n in inputs[3:] if n]
    model = _model(node, [helper.make_tensor_value_info(n, TensorProto.BOOL, ["B", "S"]) for n in names])
    onnx.checker.check_model(model, full_check=True)
    assert list(model.graph.node[-1].input)[3:5] != ["", ""]  # explicit masks were filled in
    q, k, v = (torch.randn(2, H, 13, D) for _ in range(3))
    real, gm = _masks(2, 13, 0, 2)
    feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy(), "m": real.numpy(), "g": gm.numpy()}
    got = _session(model).run(None, {n: feeds[n] for n in ["Q", "K", "V", *names]})[0]
    want = banded_attention(q, k, v, real, window=4, causal=False, global_mask=gm if "g" in names else None)
    assert _compare_real_rows(got, want, real) < 1e-5


def test_windowed_body_is_banded_not_dense() -> None:
    """The function body never builds an S x S score matrix: no MatMul output can be S wide."""
    from exporters.ops.windowed_attention import function_proto

    proto = function_proto()
    ops = [n.op_type for n in proto.node]
    assert ops.count("MatMul") == 5  # window scores, global-key scores, window values, global rows x2
    assert "TopK" in ops  # global tokens gathered, not masked out of a dense matrix


@pytest.mark.parametrize(("global_tokens", "random_blocks"), [(0, 0), (1, 1), (5, 2)])
def test_block_sparse_function_body_matches_reference(global_tokens: int, random_blocks: int) -> None:
    block, most = 4, 12
    att = BlockSparseAttention(
        AttentionConfig(
            kind="block_sparse", block=block, random_blocks=random_blocks, global_tokens=global_tokens, seed=3
        )
    )
    table = np.zeros((most, most, most), dtype=bool)
    for nb in range(1, most + 1):
        table[nb - 1, :nb, :nb] = att.layout(nb).numpy()
    node = helper.make_node(
        "BlockSparseAttention",
        ["Q", "K", "V", "m", "L"],
        ["Y"],
        domain=DOMAIN,
        block_size=block,
        global_blocks=-(-global_tokens // block),
    )
    mask = [helper.make_tensor_value_info("m", TensorProto.BOOL, ["B", "S"])]
    sess = _session(_model(node, mask, [numpy_helper.from_array(table, "L")]))
    for s in (4, 8, 12, 28, 48):
        for pad in (0, 5):
            q, k, v = (torch.randn(2, H, s, D) for _ in range(3))
            real, _ = _masks(2, s, pad, 0)
            got = sess.run(None, {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy(), "m": real.numpy()})
            assert _compare_real_rows(got[0], att(q, k, v, real), real) < 1e-5, (s, pad)


def test_schema_shape_inference_and_checker() -> None:
    register_schemas()
    node = helper.make_node("WindowedAttention", ["Q", "K", "V", "m", "g"], ["Y"], domain=DOMAIN, window=4)
    masks = [helper.make_tensor_value_info(n, TensorProto.BOOL, ["B", "S"]) for n in "mg"]
    model = _model(node, masks)
    onnx.checker.check_model(model, full_check=True)
    del model.graph.output[0].type.tensor_type.shape.dim[:]  # let shape inference find it
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out = inferred.graph.output[0].type.tensor_type
    assert out.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["B", H, "S", D]


def test_shape_inference_rejects_a_mask_of_the_wrong_shape() -> None:
    register_schemas()
    node = helper.make_node("WindowedAttention", ["Q", "K", "V", "m"], ["Y"], domain=DOMAIN, window=4)
    q = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, H, 10, D]) for n in "QKV"]
    m = helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 11])
    graph = helper.make_graph([node], "op", [*q, m], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises((onnx.shape_inference.InferenceError, ValueError), match=r"not \(B, S\)"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_saved_model_keeps_its_functions(tmp_path: Any) -> None:
    node = helper.make_node("WindowedAttention", ["Q", "K", "V", "m", "g"], ["Y"], domain=DOMAIN, window=4)
    masks = [helper.make_tensor_value_info(n, TensorProto.BOOL, ["B", "S"]) for n in "mg"]
    path = tmp_path / "m.onnx"
    onnx.save(_model(node, masks), str(path))
    again = onnx.load(str(path))
    assert [(f.domain, f.name) for f in again.functions] == [(DOMAIN, "WindowedAttention")]
    q = np.random.default_rng(0).standard_normal((1, H, 9, D)).astype(np.float32)
    m = np.ones((1, 9), dtype=bool)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # nothing native registered
    assert sess.run(None, {"Q": q, "K": q, "V": q, "m": m, "g": ~m})[0].shape == (1, H, 9, D)


def test_unknown_op_of_our_domain_is_refused() -> None:
    node = helper.make_node("DilatedAttention", ["Q", "K", "V"], ["Y"], domain=DOMAIN)
    with pytest.raises(ValueError, match="DilatedAttention"):
        _model(node, [])
