"""The real model and data: all-MiniLM-L6-v2 on the Lee document-similarity set (marked integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from compress.context import Context
from compress.data.reference import lee, lee_background
from compress.pipeline import run
from compress.recipe import load_recipe

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_lee_reference_set_is_complete() -> None:
    data = lee()
    assert len(data.texts) == 50 and len(data.pairs) == 1225
    assert all(0.0 <= s <= 1.0 for s in data.scores)
    assert len(lee_background().texts) == 300


def test_minilm_recipe_end_to_end(tmp_path: Path) -> None:
    """The shipped recipe: int8 kernels run, accuracy holds, the artifact is small. (Speed: benchmarks/.)"""
    spec = yaml.safe_load((REPO / "recipes" / "minilm-int8.yaml").read_text())
    spec["output"] = {"dir": str(tmp_path)}
    spec["stages"][-1]["runs"] = 20
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(path)
    run_dir = run(recipe, Context(recipe=recipe, run_dir=tmp_path / recipe.name, console=Console(quiet=True)))
    report = json.loads((run_dir / "report.json").read_text())
    export = report["stages"][0]["metrics"]
    assert export["max_abs_diff"] <= 1e-4
    assert export["fused_ops"]["Attention"] == 6
    target = report["targets"]["x86_64"]
    ref, art = target["reference"], target["artifact"]
    assert ref["task"]["spearman"] == pytest.approx(0.508, abs=0.005)  # fp32 MiniLM on Lee
    assert abs(art["task"]["spearman"] - ref["task"]["spearman"]) <= 0.01
    assert target["fidelity"]["cosine_mean"] >= 0.99
    assert target["size_ratio"] <= 0.30
    assert art["kernels"]["int8"].get("QAttention") == 6
    assert art["kernels"]["float_total"] == 0
    assert report["warnings"] == []
