"""Graph tuning, first round: the int8 types and format the preset leaves open, timed on this CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper
from rich.console import Console

from compress.context import Context
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.serving.bundle_check import host_family
from compress.stages.quantize import tuning

VNNI = {"activation_type": "uint8", "weight_type": "int8", "reduce_range": False}
AVX2 = {"activation_type": "uint8", "weight_type": "int8", "reduce_range": True}


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


def _int8_weight_types(path: Path) -> set[str]:
    """The element types of the int8 weight matrices the int8 MatMuls read."""
    graph = onnx.load(str(path)).graph
    weights = {i.name: i for i in graph.initializer}
    where = {"DynamicQuantizeMatMul": 1, "MatMulInteger": 1, "QAttention": 1, "QLinearMatMul": 3, "DequantizeLinear": 0}
    found = set()
    for node in graph.node:
        name = node.input[where[node.op_type]] if node.op_type in where else ""
        if name in weights and len(weights[name].dims) == 2:
            found.add(str(numpy_helper.to_array(weights[name]).dtype))
    return found


def test_choices_follow_the_preset_and_never_offer_a_saturating_one() -> None:
    assert list(tuning.int8_choices(VNNI, "dynamic", ())) == ["u8s8", "u8u8", "u8s8 reduce_range"]
    # Without VNNI, u8s8 needs 7-bit weights; full-range u8s8 is never offered, u8u8 (no saturation) is.
    avx2 = tuning.int8_choices(AVX2, "dynamic", ())
    assert list(avx2) == ["u8s8 reduce_range", "u8u8"]
    assert avx2["u8u8"][0] == {**AVX2, "weight_type": "uint8", "reduce_range": False}
    assert list(tuning.int8_choices(VNNI, "QDQ", ())) == [
        "u8s8 QDQ",
        "u8u8 QDQ",
        "u8s8 reduce_range QDQ",
        "u8s8 QOperator",
    ]


def test_choices_leave_what_the_recipe_fixed() -> None:
    assert list(tuning.int8_choices(VNNI, "dynamic", ("weight_type",))) == ["u8s8", "u8s8 reduce_range"]
    assert list(tuning.int8_choices(VNNI, "dynamic", ("weight_type", "reduce_range"))) == ["u8s8"]
    # reduce_range fixed: u8u8 keeps the recipe's 7-bit weights.
    fixed = tuning.int8_choices(AVX2, "dynamic", ("reduce_range",))
    assert fixed["u8u8 reduce_range"][0]["reduce_range"] is True


def test_thread_counts_double_up_to_the_setting() -> None:
    assert tuning.thread_counts(2) == [1, 2]
    assert tuning.thread_counts(6) == [1, 2, 4, 6]
    assert tuning.thread_counts(8) == [1, 2, 4, 8]


def test_pick_compares_with_the_named_baseline() -> None:
    assert tuning.pick({"u8s8": 10.0, "u8u8": 9.8}, "u8s8") == "u8s8"
    assert tuning.pick({"u8s8": 10.0, "u8u8": 9.0}, "u8s8") == "u8u8"


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantize_stage_times_int8_types_and_ships_its_choice(recipe_for: Callable[..., Path], mode: str) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "mode": mode, "tune": {"runs": 5}}]
    stage = _run(recipe_for(stages=stages)) / "02_quantize"
    metrics = json.loads((stage / "metrics.json").read_text())
    rounds = metrics["graph_tuning"]["int8"]
    base_types = {**VNNI, "reduce_range": metrics["preset"]["name"] == "x86_64-avx2"}
    fmt = "dynamic" if mode == "dynamic" else "QDQ"
    assert host_family()[0] == metrics["preset"]["name"]  # auto preset on a native target: this CPU's family
    assert set(rounds["variants"]) == set(tuning.int8_choices(base_types, fmt, ()))
    chosen = rounds["variants"][rounds["chosen"]]
    assert "refused" not in chosen and chosen["cosine_to_fp32"] > 0.9
    timed = {name: v["p50_ms"] for name, v in rounds["variants"].items() if "p50_ms" in v}
    assert rounds["chosen"] == tuning.pick(timed, rounds["baseline"])
    # What ships is what was chosen: the weights' type, the types in the metrics, and the format's kernels.
    assert metrics["weight_type"] == chosen["types"]["weight_type"] and metrics["format"] == chosen["format"]
    assert _int8_weight_types(stage / "model.onnx") == {metrics["weight_type"]}
    ops = {n.op_type for n in onnx.load(str(stage / "model.onnx")).graph.node}
    assert ("QLinearMatMul" in ops) == (metrics["format"] == "QOperator")  # QDQ: Q -> DQ -> MatMul in the file
    assert not (stage / "tuning").exists()
    # Thread scaling is reported (the deployment sets the threads), the fastest count named.
    scaling = metrics["graph_tuning"]["thread_scaling"]
    assert set(scaling["p50_ms"]) == {"1", "2"} and scaling["fastest"] in scaling["p50_ms"]
    assert "threads 1:" in (stage.parent / "report.md").read_text()


def test_types_are_not_tuned_for_another_family(recipe_for: Callable[..., Path]) -> None:
    """auto, with an x86-64 target without VNNI: the AVX2 preset; on a VNNI host its timings would not transfer."""
    stages = [{"type": "export"}, {"type": "quantize", "tune": {"runs": 5}}]
    path = recipe_for(stages=stages, targets=["x86_64", "x86_64-avx2"])
    metrics = json.loads((_run(path) / "02_quantize" / "metrics.json").read_text())
    rounds = metrics["graph_tuning"]["int8"]
    assert metrics["preset"]["name"] == "x86_64-avx2"
    if host_family()[0] == "x86_64-avx2":
        assert set(rounds["variants"]) == {"u8s8 reduce_range", "u8u8"}
    else:
        assert rounds["variants"] == {} and "would not transfer" in rounds["why"]
        assert metrics["weight_type"] == "int8" and metrics["reduce_range"] is True


def test_a_named_preset_fixes_the_types(recipe_for: Callable[..., Path]) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "preset": host_family()[0], "tune": {"runs": 5}}]
    metrics = json.loads((_run(recipe_for(stages=stages)) / "02_quantize" / "metrics.json").read_text())
    assert metrics["graph_tuning"]["int8"]["variants"] == {}
    assert "quantize.preset named" in metrics["graph_tuning"]["int8"]["why"]


def test_int8_round_can_be_turned_off(recipe_for: Callable[..., Path]) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "tune": {"int8": False, "runs": 5}}]
    metrics = json.loads((_run(recipe_for(stages=stages)) / "02_quantize" / "metrics.json").read_text())
    assert metrics["graph_tuning"]["int8"]["why"] == "tune.int8 is false"
    assert set(metrics["graph_tuning"]["variants"]) >= {"fused"}  # the split round still runs
