"""Hugging Face Longformer -> ONNX with WindowedAttention: ONNX Runtime against transformers' own forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers import LongformerConfig, LongformerModel
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from exporters.dynamo_export import check_graph
from exporters.hf_attention import sparse_attention_kind
from exporters.longformer import (
    ExportLongformerSelfAttention,
    export_longformer,
    exportable_longformer,
    load_longformer,
)
from exporters.ops import DOMAIN
from tests.exporters.hf_windowed import max_real_diff, token_batch

VOCAB, PAD = 60, 1
# Two-sided windows per layer (one side 4 and 2): lengths below, at, at multiples of and above both.
WINDOWS = [8, 4]
LENGTHS = (3, 8, 16, 24, 37)
TOLERANCE = 1e-4


def _config(**overrides: Any) -> LongformerConfig:
    # initializer_range 0.2 (not 0.02): sharp attention, so a wrong window or mask moves outputs by ~1
    # instead of ~1e-2, far beyond the tolerance.
    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "attention_window": WINDOWS,
        "pad_token_id": PAD,
        "initializer_range": 0.2,
    }
    return LongformerConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-longformer")
    torch.manual_seed(0)
    LongformerModel(_config()).save_pretrained(out)  # model.safetensors + config.json
    return out


@pytest.fixture(scope="module")
def reference(folder: Path) -> LongformerModel:
    model = LongformerModel.from_pretrained(folder).eval()
    assert isinstance(model, LongformerModel)
    return model


def _inputs(rng: np.random.Generator, b: int, s: int, pad: int = 0) -> dict[str, np.ndarray]:
    feeds = token_batch(rng, b, s, vocab=VOCAB, pad_id=PAD, pad=pad)
    return {**feeds, "global_attention_mask": np.zeros((b, s), np.int64)}


@pytest.fixture(scope="module")
def exported(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """One export (from the folder) at a length that is not a multiple of any window, one global token."""
    example = _inputs(np.random.default_rng(1), 2, 13, pad=4)
    example["global_attention_mask"][:, 0] = 1
    path = tmp_path_factory.mktemp("onnx") / "longformer.onnx"
    return path, export_longformer(folder, path, example=example)


@pytest.fixture(scope="module")
def session(exported: tuple[Path, list[int]]) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(exported[0]), so, providers=["CPUExecutionProvider"])


def _variants(s: int) -> dict[str, dict[str, np.ndarray]]:
    """Padding and global tokens, given both ways HF accepts them (attention_mask 2, global_attention_mask)."""
    rng = np.random.default_rng(s)
    mid = s // 2
    plain = _inputs(rng, 2, s)
    padded = _inputs(rng, 2, s, pad=max(1, s // 3))
    mask2 = _inputs(rng, 2, s, pad=max(1, s // 3))
    mask2["attention_mask"][0, [0, mid]] = 2  # row 0: two global tokens, row 1: none (G padded per row)
    gmask = _inputs(rng, 2, s)
    gmask["global_attention_mask"][:, 0] = 1
    gmask["global_attention_mask"][1, s - 1] = 1
    return {"plain": plain, "padded": padded, "mask2+pad": mask2, "global_mask": gmask}


@pytest.mark.parametrize("length", LENGTHS)
def test_onnx_matches_transformers(length: int, session: ort.InferenceSession, reference: LongformerModel) -> None:
    """Below, equal to, a multiple of and above the window; with padding and global tokens."""
    diffs = {name: max_real_diff(session, reference, feeds) for name, feeds in _variants(length).items()}
    assert max(diffs.values()) < TOLERANCE, diffs


def test_global_tokens_change_the_outputs(reference: LongformerModel) -> None:
    """The comparison above can fail: global tokens (their own projections) move the outputs a lot."""
    feeds = {k: torch.from_numpy(v) for k, v in _inputs(np.random.default_rng(0), 1, 24).items()}
    with torch.no_grad():
        local = reference(**feeds).last_hidden_state
        feeds["global_attention_mask"][0, 5] = 1
        glob = reference(**feeds).last_hidden_state
    assert float((local - glob).abs().max()) > 0.1


def test_swapped_model_matches_in_pytorch(reference: LongformerModel) -> None:
    """The export form (our op's PyTorch reference + the global rows) equals HF's forward in eager mode,
    and the context manager restores the model."""
    feeds = {k: torch.from_numpy(v) for k, v in _variants(37)["mask2+pad"].items()}
    with torch.no_grad():
        want = reference(**feeds).last_hidden_state
        with exportable_longformer(reference) as windows:
            assert isinstance(reference.encoder.layer[0].attention.self, ExportLongformerSelfAttention)
            got = reference(**feeds).last_hidden_state
    assert windows == [w // 2 for w in WINDOWS]
    real = feeds["attention_mask"] > 0
    assert float((got - want).abs()[real].max()) < 1e-5
    assert all(type(layer.attention.self) is LongformerSelfAttention for layer in reference.encoder.layer)
    assert "forward" not in vars(reference)


def test_graph_is_mapped_and_banded(exported: tuple[Path, list[int]]) -> None:
    path, windows = exported
    model = onnx.load(str(path))
    assert windows == [4, 2]
    ops = [n for n in model.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in ops] == ["WindowedAttention"] * 2  # one per layer, nothing else custom
    assert [next(a.i for a in n.attribute if a.name == "window") for n in ops] == [4, 2]
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, "WindowedAttention")]
    check_graph(model, windows)  # dynamic (B, S) inputs, no value with two S axes
    # None of HF's chunked attention, window padding or (B, 1, S, S) mask code reached the graph.
    traces = " ".join(p.value for n in model.graph.node for p in n.metadata_props)
    for hf_code in ("_sliding_chunks", "_pad_to_window_size", "create_bidirectional_mask", "_concat_with_global"):
        assert hf_code not in traces
    assert "ExportLongformerSelfAttention" in traces
    # Global rows: one G x S softmax per layer (G from TopK), not S x S.
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 2


def test_check_graph_refuses_an_s_by_s_value() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", "seq"])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "xt"], ["y"])], "g", [x], [y])
    with pytest.raises(ValueError, match="S x S"):
        check_graph(helper.make_model(graph), [])
    with pytest.raises(ValueError, match="windows"):
        check_graph(helper.make_model(graph), [4])


class _OtherAttention(LongformerSelfAttention):
    pass


def test_refuses_what_it_cannot_map(tmp_path: Path) -> None:
    example = _inputs(np.random.default_rng(0), 1, 5)
    with pytest.raises(ValueError, match="no transformers LongformerModel"):
        export_longformer(torch.nn.Linear(2, 2), tmp_path / "x.onnx", example=example)
    model = LongformerModel(_config(attention_window=8)).eval()
    model.encoder.layer[1].attention.self.__class__ = _OtherAttention
    with pytest.raises(ValueError, match="subclass of LongformerSelfAttention"):
        export_longformer(model, tmp_path / "x.onnx", example=example)
    assert type(model.encoder.layer[0].attention.self) is LongformerSelfAttention  # nothing was swapped
    with pytest.raises(ValueError, match="float32"):
        export_longformer(LongformerModel(_config()).half(), tmp_path / "x.onnx", example=example)
    model = LongformerModel(_config())
    with pytest.raises(ValueError, match="outputs must be among"):
        export_longformer(model, tmp_path / "x.onnx", example=example, output_names=("attentions",))
    with exportable_longformer(model.train()), pytest.raises(ValueError, match="dropout"):
        model(torch.from_numpy(example["input_ids"]))
    with exportable_longformer(model.eval()), pytest.raises(ValueError, match="output_attentions"):
        model(torch.from_numpy(example["input_ids"]), output_attentions=True)
    bigbird = tmp_path / "bigbird"
    bigbird.mkdir()
    (bigbird / "config.json").write_text('{"model_type": "big_bird", "attention_type": "block_sparse"}')
    with pytest.raises(ValueError, match="not a Longformer checkpoint"):
        load_longformer(bigbird)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    ("config", "sparse"),
    [
        ({"model_type": "longformer", "attention_window": 512}, "longformer"),
        ({"model_type": "bert"}, None),
        ({"model_type": "led", "attention_window": [1024]}, "led sliding window"),
        ({"model_type": "big_bird", "attention_type": "block_sparse"}, "big_bird block_sparse"),
        ({"model_type": "big_bird", "attention_type": "original_full"}, None),
        ({"model_type": "mistral", "sliding_window": 4096}, "mistral sliding window"),
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, None),
        ({"model_type": "qwen2", "sliding_window": None}, None),
        ({"model_type": "gemma2", "layer_types": ["sliding_attention", "full_attention"]}, "gemma2 layer_types"),
        ({"model_type": "gpt_neo", "attention_layers": ["global", "local"]}, "gpt_neo local"),
    ],
)
def test_sparse_attention_kind(config: dict[str, Any], sparse: str | None) -> None:
    kind = sparse_attention_kind(config)
    assert kind == sparse if sparse is None else kind is not None and kind.startswith(sparse)
