"""Every Hugging Face encoder architecture in compress/models/architectures.py, on a tiny random-init model
(tests/hf_archs.py): the tokenizer loads and feeds the model, export matches PyTorch, ONNX Runtime's
attention fusion happens exactly where the table says it can, dynamic int8 runs int8 MatMul kernels, a
classification head loads with its labels, and a recipe runs end to end for a few of them. Anything
else is refused by `edge-compress check` in one line.

Kernel counts that depend on the CPU or on ONNX Runtime's session optimizer are only asserted present,
never pinned (QAttention counts differed between machines).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import compress
from compress.models import hf
from compress.models.architectures import ARCHITECTURES, check_supported
from compress.models.spec import HFModel
from compress.runtime.kernels import count_kernels
from compress.stages.export.config import ExportStage
from compress.tasks import embedding
from exporters import native, onnx_export, ort_fusion
from exporters.longformer import export_longformer
from exporters.modernbert import export_modernbert
from tests.conftest import TEXTS
from tests.hf_archs import ARCHS, VOCABS, WINDOW, build
from tests.test_cli import assert_user_error, cli

TOLERANCE = ExportStage(type="export").tolerance  # the export stage's default
LAYERS = 2  # of every tiny model (tests/hf_archs.py)
MAX_LENGTH = 32
INT8_MATMULS = ("QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul")
END_TO_END = ("distilbert", "deberta-v2", "modernbert")  # fused attention; unfused; local layers as our op


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """arch -> its tiny checkpoint folder, built once per module."""
    root = tmp_path_factory.mktemp("encoders")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build(arch, root / arch)
        return built[arch]

    return get


def test_the_test_models_cover_the_table() -> None:
    assert set(ARCHS) == set(ARCHITECTURES) == set(VOCABS)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_loads_and_gives_the_model_its_inputs(arch: str, tiny: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    folder = tiny(arch)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert type(tokenizer).__name__ in (VOCABS[arch].tokenizer_class, "TokenizersBackend")
    names = hf.input_names(tokenizer, hf.read_config(folder))
    assert ("token_type_ids" in names) == ARCHITECTURES[arch].token_type_ids
    enc = tokenizer(list(TEXTS), padding=True)
    assert set(names) <= set(enc)
    ids = np.asarray(enc["input_ids"])
    assert (ids == tokenizer.unk_token_id).sum() == 0  # trained on these texts: every word is known
    assert ids[0, 0] == tokenizer.cls_token_id


def _batches(tokenizer: Any, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The export example and the checked batches: the export stage's three shapes, and unpadded runs of
    real tokens shorter and longer than the local-attention window (where a window bug would show)."""
    texts = list(TEXTS)
    long_text = " ".join(texts)
    checks = [
        hf.encode(tokenizer, texts, MAX_LENGTH, names),
        hf.encode(tokenizer, texts[:1], MAX_LENGTH, names),
        hf.encode(tokenizer, texts[:2], MAX_LENGTH, names, pad_to=MAX_LENGTH),
    ]
    for length in (3, WINDOW - 1, WINDOW + 3, 2 * WINDOW + 1, MAX_LENGTH):
        checks.append(hf.encode(tokenizer, [long_text, texts[3] + " " + long_text], length, names))
    return hf.encode(tokenizer, texts[:2], MAX_LENGTH, names), checks


def _ops(path: Path) -> Counter[str]:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _quantize_dynamic(source: Path, out: Path) -> None:
    """As the quantize stage's default (recipes/minilm-int8.yaml): dynamic, per-channel, s8 weights."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        out,
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_pytorch_fuses_where_it_can_and_runs_int8(
    arch: str, tiny: Callable[[str], Path], tmp_path: Path
) -> None:
    entry = ARCHITECTURES[arch]
    folder = tiny(arch)
    config = hf.read_config(folder)
    tokenizer = hf.load_tokenizer(folder)
    names = hf.input_names(tokenizer, config)
    module = embedding.build_module(hf.load_model(folder), HFModel(hf=folder), names)
    example, checks = _batches(tokenizer, names)
    raw, fused_path, quantized = tmp_path / "raw.onnx", tmp_path / "model.onnx", tmp_path / "int8.onnx"
    if entry.window == "custom_op":
        exporter = export_longformer if arch == "longformer" else export_modernbert
        exporter(module, raw, example=example, output_names=embedding.OUTPUT_NAMES)
    else:
        onnx_export.export(
            module, example=example, path=raw, output_names=embedding.OUTPUT_NAMES, exporter=entry.exporter, opset=17
        )
    onnx_export.check_against_torch(module, raw, checks, TOLERANCE)  # raises beyond the tolerance

    fused = ort_fusion.fuse(raw, fused_path, config)
    if entry.ort_model_type is None:
        assert isinstance(fused, str) and entry.unfused_because in fused
        assert not fused_path.exists()
        fused_path = raw
    else:
        assert isinstance(fused, dict)
    attention = _ops(fused_path)["Attention"] + _ops(fused_path)["MultiHeadAttention"]
    ours = 1 if arch == "modernbert" else 0  # ModernBERT's global layer exports as MultiHeadAttention itself
    assert attention - ours == (LAYERS if entry.ort_model_type else 0), fused
    agreement = onnx_export.check_against_torch(module, fused_path, checks, TOLERANCE)
    assert 0 <= agreement.max_abs_diff <= TOLERANCE

    _quantize_dynamic(fused_path, quantized)
    assert (_ops(quantized)["QAttention"] > 0) == (entry.ort_model_type is not None)  # the file, not the CPU
    kernels = count_kernels(quantized)
    assert sum(kernels["int8"].get(op, 0) for op in INT8_MATMULS) > 0, kernels


@pytest.mark.parametrize("arch", ARCHS)
def test_classification_heads_load_with_their_labels(arch: str, tmp_path: Path) -> None:
    labels = ("neg", "neutral", "pos")
    for head, shape in (("sequence", (2, 3)), ("token", (2, None, 3))):
        folder = build(arch, tmp_path / head, head=head, labels=labels)
        assert hf.model_labels(folder) == labels
        model = hf.load_model(folder, head)
        tokenizer = hf.load_tokenizer(folder)
        feeds = hf.encode(tokenizer, TEXTS[:2], MAX_LENGTH, hf.input_names(tokenizer, hf.read_config(folder)))
        import torch

        with torch.no_grad():
            logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
        expected = tuple(feeds["input_ids"].shape[1] if n is None else n for n in shape)
        assert tuple(logits.shape) == expected


@pytest.mark.parametrize("arch", END_TO_END)
def test_recipe_runs_end_to_end(
    arch: str, tiny: Callable[[str], Path], recipe_for: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    report = compress.run_recipe(recipe_for(name=f"tiny-{arch}", model={"hf": str(tiny(arch))}))
    assert [s["type"] for s in report.stages] == ["export", "quantize", "validate"]
    export, quantize = (s["metrics"] for s in report.stages[:2])
    assert export["exporter"] == ARCHITECTURES[arch].exporter and export["max_abs_diff"] <= TOLERANCE
    assert isinstance(export["fused_ops"], dict) == (ARCHITECTURES[arch].ort_model_type is not None)
    assert sum(quantize["kernels"]["int8"].get(op, 0) for op in INT8_MATMULS) > 0
    if ARCHITECTURES[arch].window == "custom_op":  # ModernBERT's one local layer (of 2) is our op, in int8 too
        assert export["custom_ops"] == {"WindowedAttention": 1} and export["attention"] == ["windowed", "global"]
        assert export["global_attention"].startswith("com.microsoft::MultiHeadAttention x1, no mask input")
    assert len(report.targets) == 1 and report.passed
    validated = next(iter(report.targets.values()))
    assert validated["artifact"]["task"]["pairs"] > 0
    if ARCHITECTURES[arch].window == "custom_op":  # the report says which implementation of our op ran
        assert validated["setup"]["custom_op_kernel"].startswith("native" if native.available() else "f")
    assert "Traceback" not in capsys.readouterr().err


def test_modernbert_dense_attention_is_a_choice_and_a_window_over_every_position_is_refused(
    tiny: Callable[[str], Path], recipe_for: Callable[..., Path], tmp_path: Path
) -> None:
    """`dense_attention: true` exports the local layers with transformers' band mask (standard ops only),
    said in the metrics; a window that spans every position is refused by `check`, naming that setting."""
    stages = [
        {"type": "export", "dense_attention": True},
        {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 32},
    ]
    report = compress.run_recipe(recipe_for(name="dense", model={"hf": str(tiny("modernbert"))}, stages=stages))
    export = report.stages[0]["metrics"]
    assert export["attention"] == "dense (dense_attention: true)" and "custom_ops" not in export
    assert export["exporter"] == "torchscript" and export["max_abs_diff"] <= TOLERANCE
    wide = tmp_path / "wide"
    shutil.copytree(tiny("modernbert"), wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(config | {"local_attention": config["max_position_embeddings"]}))
    proc = cli("check", str(recipe_for(name="wide", model={"hf": str(wide)})))
    assert_user_error(proc, "stages[0] (export): model: ModernBERT local_attention", "dense_attention: true")
    qat = [{"type": "export"}, {"type": "qat", "epochs": 1}]  # QAT traces transformers' dense attention
    with pytest.raises(compress.UserError, match=r"stages\[1\] \(qat\): a modernbert exports its attention as our ops"):
        recipe = yaml.safe_load(recipe_for(name="qat", model={"hf": str(tiny("modernbert"))}, stages=qat).read_text())
        recipe["data"]["train"] = recipe["data"]["calibration"]
        (tmp_path / "qat.yaml").write_text(yaml.safe_dump(recipe))
        compress.run_recipe(tmp_path / "qat.yaml")
    assert not (tmp_path / "runs" / "qat").exists()  # refused before any work


def _unsupported(model_type: str, folder: Path, tokenizer_from: Path) -> Path:
    """A tiny random-init checkpoint of an architecture transformers knows but we do not export."""
    import torch
    from transformers import AutoConfig, AutoModel

    sizes = {
        "gpt2": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64},
        "t5": {"num_layers": 1, "d_model": 32, "d_kv": 8, "num_heads": 2, "d_ff": 64},
    }
    config = AutoConfig.for_model(model_type, vocab_size=300, **sizes[model_type])
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_from / name, folder / name)
    return folder


def test_an_unsupported_architecture_is_refused_in_one_line(
    tiny: Callable[[str], Path], recipe_for: Callable[..., Path], tmp_path: Path
) -> None:
    gpt2 = _unsupported("gpt2", tmp_path / "gpt2", tiny("bert"))
    proc = cli("check", str(recipe_for(model={"hf": str(gpt2)})))  # one subprocess: the CLI's exit code
    assert_user_error(proc, "model_type 'gpt2' is not a supported", ", ".join(ARCHITECTURES))
    t5 = _unsupported("t5", tmp_path / "t5", tiny("bert"))
    with pytest.raises(compress.UserError) as info:  # what check and run call first, in process
        hf.model_folder(HFModel(hf=t5))
    assert str(info.value) == (
        f"{t5 / 'config.json'}: model_type 't5' is not a supported encoder architecture "
        f"(supported: {', '.join(ARCHITECTURES)})"
    )


def test_check_supported_names_the_type_and_every_supported_one() -> None:
    for config in ({"model_type": "bert"}, {"model_type": "modernbert", "layer_types": ["sliding_attention"]}):
        check_supported(config)
    for config in ({"model_type": "llama"}, {"model_type": None}, {}):
        with pytest.raises(compress.UserError) as info:
            check_supported(config, where="model.hf")
        message = str(info.value)
        assert "\n" not in message and message.startswith("model.hf: model_type ")
        assert message.endswith(f"(supported: {', '.join(ARCHITECTURES)})")
