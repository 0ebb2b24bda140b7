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


def test_minilm_pruning_reconstruction_on_held_out_news(tmp_path: Path) -> None:
    """The shipped pruning recipe's prune stage: heads and neurons chosen by least error and the output
    projections refitted bring held-out news far closer to the original than magnitude pruning alone."""
    spec = yaml.safe_load((REPO / "recipes" / "minilm-prune-int8.yaml").read_text())
    prune = next(s for s in spec["stages"] if s["type"] == "prune")
    prune["reconstruct"]["texts"] = 120  # 108 fitted, 12 held out (the recipe reads all 300)
    spec["stages"] = [prune, {"type": "export"}]
    spec["output"] = {"dir": str(tmp_path)}
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(path)
    run_dir = run(recipe, Context(recipe=recipe, run_dir=tmp_path / recipe.name, console=Console(quiet=True)))
    report = json.loads((run_dir / "report.json").read_text())
    prune_metrics, export = report["stages"][0]["metrics"], report["stages"][1]["metrics"]
    rec = prune_metrics["reconstruction"]
    assert rec["held_out_texts"] == 12 and rec["select"] == "error"
    assert rec["held_out_cosine_magnitude_only"] < 0.75  # measured 0.57 on all 300 documents
    assert rec["held_out_cosine"] >= 0.85
    assert all(row["ffn_output"]["kept"] == 768 and row["attention_output"]["kept"] == 9 for row in rec["layers"])
    assert export["max_abs_diff"] <= 1e-4
    assert export["fused_ops"]["Attention"] == 6  # every layer keeps 9 heads: one width, still fused
