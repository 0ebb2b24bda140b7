"""Graph tuning per CPU: fused or split SkipLayerNormalization / BiasGelu, chosen by timing on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from rich.console import Console

from compress.context import Context
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.runtime.session import session
from compress.stages.quantize import tuning
from exporters import unfuse


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture
def fused_export(recipe_for: Callable[..., Path]) -> Path:
    """The tiny BERT's fused fp32 export (SkipLayerNormalization and BiasGelu from ONNX Runtime's optimizer)."""
    return _run(recipe_for(name="fused", stages=[{"type": "export"}])) / "01_export" / "model.onnx"


def test_split_graph_computes_what_the_fused_one_does(fused_export: Path, tmp_path: Path) -> None:
    before = _ops(fused_export)
    assert before.get("SkipLayerNormalization", 0) > 0 and before.get("BiasGelu", 0) > 0
    model = onnx.load(str(fused_export))
    counts = unfuse.split(model, ("skip_layer_norm", "bias_gelu"))
    assert counts == {"skip_layer_norm": before["SkipLayerNormalization"], "bias_gelu": before["BiasGelu"]}
    split_path = tmp_path / "split.onnx"
    onnx.save(model, str(split_path))
    after = _ops(split_path)
    assert "SkipLayerNormalization" not in after and "BiasGelu" not in after
    assert after["LayerNormalization"] == before["SkipLayerNormalization"] + before.get("LayerNormalization", 0)
    settings = {"disabled_optimizers": unfuse.disabled_optimizers(("skip_layer_norm", "bias_gelu"))}
    fused, split = session(fused_export, threads=1), session(split_path, threads=1, settings=settings)
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(5, 90, size=(2, 16)),
        "attention_mask": np.ones((2, 16), np.int64),
        "token_type_ids": np.zeros((2, 16), np.int64),
    }
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in fused.get_inputs()}}
    np.testing.assert_allclose(split.run(None, feeds)[0], fused.run(None, feeds)[0], atol=1e-5)
    # ONNX Runtime's optimizer is told not to fuse the parts again: its graph keeps them split.
    optimized = tmp_path / "optimized.onnx"
    session(split_path, threads=1, settings=settings, optimized_path=optimized)
    assert "SkipLayerNormalization" not in _ops(optimized) and "BiasGelu" not in _ops(optimized)


def test_split_refuses_a_node_whose_statistics_are_read(fused_export: Path) -> None:
    model = onnx.load(str(fused_export))
    node = next(n for n in model.graph.node if n.op_type == "SkipLayerNormalization")
    while len(node.output) < 2:
        node.output.append("")
    node.output[1] = "mean_read"
    model.graph.output.append(onnx.helper.make_tensor_value_info("mean_read", onnx.TensorProto.FLOAT, None))
    with pytest.raises(ValueError, match="mean / inverse-variance outputs are read"):
        unfuse.split(model, ("skip_layer_norm",))


def test_split_is_not_offered_below_opset_17(fused_export: Path) -> None:
    model = onnx.load(str(fused_export))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 16
    assert unfuse.applicable(model, "skip_layer_norm") == 0
    assert unfuse.applicable(model, "bias_gelu") > 0


def test_pick_keeps_the_fused_graph_unless_a_split_beats_the_margin() -> None:
    assert tuning.pick({"fused": 10.0, "split a": 9.9}) == "fused"  # 1%: noise
    assert tuning.pick({"fused": 10.0, "split a": 9.0, "split b": 8.5}) == "split b"
    assert tuning.pick({"fused": 8.0, "split a": 9.0}) == "fused"


def test_quantize_stage_times_variants_and_keeps_its_choice(recipe_for: Callable[..., Path]) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "mode": "dynamic", "tune": {"runs": 5}}]
    run_dir = _run(recipe_for(stages=stages))
    stage = run_dir / "02_quantize"
    tuned = json.loads((stage / "metrics.json").read_text())["graph_tuning"]
    variants = tuned["variants"]
    assert set(variants) == {"fused", "split skip_layer_norm", "split bias_gelu", "split skip_layer_norm+bias_gelu"}
    assert tuned["chosen"] in variants and "refused" not in variants[tuned["chosen"]]
    assert all(v["cosine_to_fp32"] > 0.9 for v in variants.values())
    timed = {name: v["p50_ms"] for name, v in variants.items() if "p50_ms" in v}
    assert tuned["chosen"] == tuning.pick(timed)
    # What ships is what was chosen: the graph and the session settings that keep it so.
    disabled = json.loads((stage / "session.json").read_text()).get("disabled_optimizers", [])
    ops = _ops(stage / "model.onnx")
    assert ("SkipLayerNormalization" in ops) == ("skip_layer_norm" not in tuned["chosen"])
    assert ("SkipLayerNormFusion" in disabled) == ("skip_layer_norm" in tuned["chosen"])
    assert ("BiasGeluFusion" in disabled) == ("bias_gelu" in tuned["chosen"])
    assert not (stage / "tuning").exists()


def test_tuning_disabled_keeps_the_fused_graph(recipe_for: Callable[..., Path]) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "mode": "dynamic", "tune": {"enabled": False}}]
    stage = _run(recipe_for(stages=stages)) / "02_quantize"
    assert json.loads((stage / "metrics.json").read_text())["graph_tuning"]["chosen"] == "fused"
    assert "SkipLayerNormalization" in _ops(stage / "model.onnx")


@pytest.mark.parametrize(
    ("tune", "message"),
    [({"splits": ["layer_norm"]}, "splits"), ({"runs": 1}, "runs"), ({"threads": 0}, "threads")],
)
def test_bad_tuning_settings_exit_2(recipe_for: Callable[..., Path], tune: dict, message: str) -> None:
    path = recipe_for(stages=[{"type": "export"}, {"type": "quantize", "tune": tune}])
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def biased_bert(tiny_bert: Path, tmp_path: Path) -> Path:
    """The tiny BERT with random biases. A fresh BERT's biases are all zero: the export shares one zero tensor
    between them, which the int8 embedding node then quantizes, and no bias is left a constant to fold."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "biased-bert"
    shutil.copytree(tiny_bert, folder)
    weights = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name, value in weights.items():
        if name.endswith(".bias"):
            weights[name] = rng.normal(0.0, 0.02, value.shape).astype(value.dtype)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_split_adds_the_bias_first_so_the_int8_matmul_takes_it(
    recipe_for: Callable[..., Path], biased_bert: Path, tmp_path: Path
) -> None:
    """The bias is added before the residual: ONNX Runtime folds that Add into DynamicQuantizeMatMul's bias, so
    an int8 split graph keeps one Add per SkipLayerNormalization (the residual), not two."""
    stages = [{"type": "export"}, {"type": "quantize", "mode": "dynamic", "tune": {"enabled": False}}]
    recipe = recipe_for(stages=stages, model={"hf": str(biased_bert)})
    model = onnx.load(str(_run(recipe) / "02_quantize" / "model.onnx"))
    constants = {i.name for i in model.graph.initializer}
    skips = [n for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
    assert skips and all(len(n.input) > 4 and n.input[4] in constants for n in skips)  # each has a bias to fold
    unfuse.split(model, ("skip_layer_norm",))
    split_path, optimized = tmp_path / "split.onnx", tmp_path / "optimized.onnx"
    onnx.save(model, str(split_path))
    settings = {"disabled_optimizers": unfuse.disabled_optimizers(("skip_layer_norm",))}
    session(split_path, threads=1, settings=settings, optimized_path=optimized)
    ops = _ops(optimized)
    assert ops.get("Add", 0) == len(skips), ops
    assert ops.get("DynamicQuantizeMatMul", 0) > 0
