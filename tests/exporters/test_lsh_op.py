"""ai.edgecompress::LSHAttention: its function body (and, where built, its native kernel) against the
PyTorch reference given the same rotations, its schema, and its errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from compress.models.attention import AttentionConfig
from compress.models.lsh import lsh_attention, rotations
from exporters import native
from exporters.ops import DOMAIN, attach_functions, register_schemas

H, D = 2, 8


def lsh_model(chunk: int, causal: int, with_mask: bool = True) -> onnx.ModelProto:
    inputs = ["QK", "V", "m" if with_mask else "", "R"]
    node = helper.make_node("LSHAttention", inputs, ["Y"], domain=DOMAIN, chunk=chunk, causal=causal)
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", H, "S", D]) for n in ("QK", "V")]
    if with_mask:
        values.append(helper.make_tensor_value_info("m", TensorProto.BOOL, ["B", "S"]))
    values.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, ["R", D, "K"]))
    graph = helper.make_graph(
        [node], "lsh", values, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", H, "S", D])]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)], ir_version=10
    )
    attach_functions(model)
    return model


def session(model: onnx.ModelProto, use_native: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if use_native:
        assert native.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def case(s: int, chunk: int, *, hashes: int, buckets: int, pad: int, seed: int) -> tuple[dict[str, np.ndarray], Any]:
    gen = torch.Generator().manual_seed(seed)
    qk, v = torch.randn(2, H, s, D, generator=gen), torch.randn(2, H, s, D, generator=gen)
    mask = torch.ones(2, s, dtype=torch.bool)
    if pad:
        mask[1, s - pad :] = False
    rot = rotations(AttentionConfig("lsh", chunk=chunk, n_hashes=hashes, buckets=buckets, seed=seed), D)
    feeds = {"QK": qk.numpy(), "V": v.numpy(), "m": mask.numpy(), "R": rot.numpy()}
    return feeds, (qk, v, mask, rot)


KERNELS = ["function body"] + (["native"] if native.available() else [])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize(
    ("s", "chunk", "hashes", "buckets", "pad"),
    [(8, 8, 1, 2, 0), (16, 4, 2, 4, 3), (48, 8, 3, 8, 5), (64, 16, 2, 6, 0), (96, 32, 4, 4, 17)],
)
def test_matches_reference(
    kernel: str, causal: int, *, s: int, chunk: int, hashes: int, buckets: int, pad: int
) -> None:
    sess = session(lsh_model(chunk, causal), kernel == "native")
    feeds, (qk, v, mask, rot) = case(s, chunk, hashes=hashes, buckets=buckets, pad=pad, seed=s + causal)
    want = lsh_attention(qk, v, mask, rot, chunk=chunk, causal=bool(causal)).numpy()
    got = sess.run(None, feeds)[0]
    real = mask.numpy()[:, None, :, None].repeat(H, 1).repeat(D, 3)
    assert np.abs(got - want)[real].max() < 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_absent_mask_means_all_real(kernel: str) -> None:
    sess = session(lsh_model(8, 0, with_mask=False), kernel == "native")
    feeds, (qk, v, _, rot) = case(32, 8, hashes=2, buckets=4, pad=0, seed=7)
    del feeds["m"]
    want = lsh_attention(qk, v, torch.ones(2, 32, dtype=torch.bool), rot, chunk=8, causal=False).numpy()
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_length_not_a_multiple_of_the_chunk_is_an_error(kernel: str) -> None:
    sess = session(lsh_model(8, 0), kernel == "native")
    feeds, _ = case(12, 8, hashes=1, buckets=2, pad=0, seed=1)
    with pytest.raises(Exception, match=r"(?i)multiple|reshape|chunk"):
        sess.run(None, feeds)


def test_schema_infers_the_output_shape() -> None:
    register_schemas()
    model = lsh_model(8, 1)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", H, "S", D]


def test_long_sequence_matches_and_the_body_sorts() -> None:
    """At S=1024 the body still matches; it sorts (TopK) and scatters back instead of scoring S x S."""
    sess = session(lsh_model(32, 0), use_native=False)
    feeds, (qk, v, mask, rot) = case(1024, 32, hashes=2, buckets=16, pad=0, seed=3)
    want = lsh_attention(qk, v, mask, rot, chunk=32, causal=False).numpy()
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, atol=1e-5)
    from exporters.ops import lsh_attention as body

    ops = {n.op_type for n in body.function_proto().node}
    assert "TopK" in ops and "ScatterElements" in ops
