"""Hugging Face ModernBERT -> ONNX with its local layers as WindowedAttention: ONNX Runtime (function
bodies and native kernels) against transformers' own forward, and what the export refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers import ModernBertConfig, ModernBertModel
from transformers.models.modernbert.modeling_modernbert import ModernBertAttention

from exporters import native
from exporters.dynamo_export import check_graph
from exporters.hf_attention import check_modernbert, modernbert_layer_types, sparse_attention_kind
from exporters.modernbert import (
    ExportModernBertAttention,
    check_global_layers,
    export_modernbert,
    exportable_modernbert,
)
from exporters.ops import DOMAIN
from tests.exporters.hf_windowed import max_real_diff, token_batch

VOCAB, PAD = 60, 0
LOCAL_ATTENTION = 16  # one-sided window 8
LENGTHS = (3, 8, 11, 16, 29, 40)  # below, at, above, a multiple of, past 3 windows, longer
LONG = 8192  # the longest ModernBERT-base input
TOLERANCE = 1e-4


def _config(**overrides: Any) -> ModernBertConfig:
    # initializer_range 0.2 (not 0.02): sharp attention, so a wrong window or mask moves outputs far beyond
    # the tolerance. Layers: global, local, local (global_attn_every_n_layers 3, as in ModernBERT-base).
    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 48,
        "max_position_embeddings": LONG,
        "local_attention": LOCAL_ATTENTION,
        "global_attn_every_n_layers": 3,
        "pad_token_id": PAD,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "cls_token_id": 1,
        "sep_token_id": 2,
        "initializer_range": 0.2,
        "attn_implementation": "eager",
    }
    return ModernBertConfig(**(fields | overrides))


class Outputs(torch.nn.Module):
    """A ModernBertModel called positionally with (input_ids, attention_mask), as the task wrappers are."""

    def __init__(self, model: ModernBertModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def reference() -> ModernBertModel:
    torch.manual_seed(0)
    return ModernBertModel(_config()).eval()


def _inputs(rng: np.random.Generator, b: int, s: int, pad: int = 0) -> dict[str, np.ndarray]:
    return token_batch(rng, b, s, vocab=VOCAB, pad_id=PAD, pad=pad)


@pytest.fixture(scope="module")
def exported(reference: ModernBertModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """One export at a length that is not a multiple of the window, with padding."""
    path = tmp_path_factory.mktemp("onnx") / "modernbert.onnx"
    return path, export_modernbert(Outputs(reference), path, example=_inputs(np.random.default_rng(1), 2, 13, pad=4))


def _session(path: Path, with_native: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if with_native:
        native.register(so)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


KERNELS = ["function body", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no ops"))]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("length", LENGTHS)
def test_onnx_matches_transformers(
    length: int, kernel: str, exported: tuple[Path, list[int]], reference: ModernBertModel
) -> None:
    """Below, equal to, a multiple of and above the window; padded and unpadded batches."""
    session = _session(exported[0], kernel == "native")
    rng = np.random.default_rng(length)
    variants = {"plain": _inputs(rng, 2, length), "padded": _inputs(rng, 2, length, pad=max(1, length // 3))}
    diffs = {name: max_real_diff(session, reference, feeds) for name, feeds in variants.items()}
    assert max(diffs.values()) < TOLERANCE, diffs


def test_onnx_matches_transformers_at_8192_tokens(exported: tuple[Path, list[int]], reference: ModernBertModel) -> None:
    """The longest input, one sequence with a padded tail, with the fastest kernels this machine has."""
    feeds = _inputs(np.random.default_rng(8), 1, LONG)
    feeds["attention_mask"][0, LONG - 100 :] = 0
    assert max_real_diff(_session(exported[0], native.available()), reference, feeds) < TOLERANCE


def test_the_window_matters(reference: ModernBertModel) -> None:
    """The comparisons above can fail: a token beyond the window, seen by the global layer, moves a
    token's output; within the local layers alone it would not (checked through the swapped model)."""
    feeds = {k: torch.from_numpy(v) for k, v in _inputs(np.random.default_rng(0), 1, 40).items()}
    wider = ModernBertModel(_config(local_attention=2 * LOCAL_ATTENTION)).eval()
    wider.load_state_dict(reference.state_dict())
    with torch.no_grad():
        narrow, wide = reference(**feeds).last_hidden_state, wider(**feeds).last_hidden_state
    assert float((narrow - wide).abs().max()) > 0.1


def test_swapped_model_matches_in_pytorch(reference: ModernBertModel) -> None:
    """The export form (our op's PyTorch reference) equals transformers' forward, and the context
    manager restores the model."""
    feeds = {k: torch.from_numpy(v) for k, v in _inputs(np.random.default_rng(3), 2, 37, pad=9).items()}
    with torch.no_grad():
        want = reference(**feeds).last_hidden_state
        with exportable_modernbert(reference) as windows:
            kinds = [type(layer.attn) for layer in reference.layers]
            got = reference(**feeds).last_hidden_state
    assert windows == [LOCAL_ATTENTION // 2] * 2
    assert kinds == [ExportModernBertAttention] * 3
    real = feeds["attention_mask"] > 0
    assert float((got - want).abs()[real].max()) < 1e-5
    assert all(type(layer.attn) is ModernBertAttention for layer in reference.layers)
    assert "forward" not in vars(reference)


def test_graph_is_mapped_and_banded(exported: tuple[Path, list[int]]) -> None:
    """Local layers: our op; the global layer: ONNX Runtime's MultiHeadAttention with no mask input (its
    O(S)-memory kernel); no S x S value anywhere."""
    path, windows = exported
    model = onnx.load(str(path))
    ops = [n for n in model.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in ops] == ["WindowedAttention"] * 2  # the two local layers, nothing else custom
    assert [next(a.i for a in n.attribute if a.name == "window") for n in ops] == windows == [8, 8]
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, "WindowedAttention")]
    check_graph(model, windows)  # dynamic (B, S) inputs, no value with two S axes
    check_global_layers(model, 1)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 0  # no attention left as standard ops
    with pytest.raises(ValueError, match="expected 2 unmasked"):
        check_global_layers(model, 2)
    traces = " ".join(p.value for n in model.graph.node for p in n.metadata_props)
    assert "create_bidirectional" not in traces  # no S x S mask was built


def test_a_masked_multihead_node_is_refused() -> None:
    """A mask input would switch ONNX Runtime's MultiHeadAttention to its O(S^2) path."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    m = helper.make_tensor_value_info("m", TensorProto.INT32, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    node = helper.make_node("MultiHeadAttention", ["x", "x", "x", "", "m"], ["y"], domain="com.microsoft")
    with pytest.raises(ValueError, match="1 with a mask"):
        check_global_layers(helper.make_model(helper.make_graph([node], "g", [x, m], [y])), 1)


def test_refuses_what_it_cannot_map(reference: ModernBertModel, tmp_path: Path) -> None:
    example = _inputs(np.random.default_rng(0), 1, 5)
    out = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="no transformers ModernBertModel"):
        export_modernbert(torch.nn.Linear(2, 2), out, example=example)
    with pytest.raises(ValueError, match="float32"):
        export_modernbert(Outputs(ModernBertModel(_config()).half()), out, example=example)
    flash = ModernBertModel(_config())
    flash.config._attn_implementation = "flash_attention_2"  # the unpadded (varlen) path
    with pytest.raises(ValueError, match="unpadded path"):
        export_modernbert(Outputs(flash), out, example=example)
    other = ModernBertModel(_config())
    other.layers[1].attn.__class__ = type("OtherAttention", (ModernBertAttention,), {})
    with pytest.raises(ValueError, match="not ModernBertAttention"):
        export_modernbert(Outputs(other), out, example=example)
    assert type(other.layers[2].attn) is ModernBertAttention  # nothing was swapped
    with exportable_modernbert(reference.train()), pytest.raises(ValueError, match="dropout"):
        reference.layers[1].attn.dropout = 0.1
        reference(torch.from_numpy(example["input_ids"]))
    reference.eval()
    assert not out.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"layer_types": ["full_attention", "chunked_attention"]}, "are not sliding_attention"),
        ({"local_attention": 1}, "window of >= 2"),
        ({"local_attention": "128"}, "window of >= 2"),
        ({"local_attention": 8192, "max_position_embeddings": 8192}, "covers all 8192 positions"),
        ({"global_attn_every_n_layers": 0}, "not a positive int"),
    ],
)
def test_configs_it_cannot_keep_efficient_are_refused(config: dict[str, Any], message: str) -> None:
    base = {"model_type": "modernbert", "num_hidden_layers": 3, "max_position_embeddings": 8192}
    with pytest.raises(ValueError, match=message) as info:
        check_modernbert(base | config)
    assert "\n" not in str(info.value)


def test_layer_kinds_read_from_config_json() -> None:
    assert modernbert_layer_types({"num_hidden_layers": 4}) == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert check_modernbert({"num_hidden_layers": 22, "local_attention": 128}) == (14, 64)  # ModernBERT-base
    assert sparse_attention_kind({"model_type": "modernbert", "num_hidden_layers": 3}) == "modernbert"
    all_global = {"model_type": "modernbert", "num_hidden_layers": 3, "global_attn_every_n_layers": 1}
    assert sparse_attention_kind(all_global) is None  # dense: nothing to keep
