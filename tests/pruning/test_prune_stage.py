"""The prune stage on a tiny BERT and a tiny zoo model: masks, structured removal, reload, export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.pipeline import run
from compress.pruning.structured import prune_bert
from compress.recipe import load_recipe


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


def _metrics(run_dir: Path, stage: str = "01_prune") -> dict[str, Any]:
    return json.loads((run_dir / stage / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("prune", "check"),
    [
        ({"method": "unstructured", "sparsity": 0.8}, lambda layer: abs(layer["sparsity"] - 0.8) < 1e-3),
        ({"method": "nm", "n": 2, "m": 4}, lambda layer: abs(layer["sparsity"] - 0.5) < 1e-6),
        ({"method": "block", "block": [4, 1], "sparsity": 0.5}, lambda layer: abs(layer["sparsity"] - 0.5) < 1e-6),
    ],
)
def test_mask_methods_on_bert(recipe_for: Callable[..., Path], prune: dict[str, Any], check: Any) -> None:
    run_dir = _run(recipe_for(stages=[{"type": "prune", **prune}, {"type": "export"}]))
    m = _metrics(run_dir)
    assert m["layers"] and all(check(layer) for layer in m["layers"])
    assert not any("pooler" in layer["name"] for layer in m["layers"])  # excluded by default
    assert m["compressed_size_bytes"] < m["dense_size_bytes"]
    assert "size only" in m["speed"]
    export = _metrics(run_dir, "02_export")
    assert export["max_abs_diff"] <= 1e-4  # the pruned model exports and matches


def test_global_scope_reaches_the_total(recipe_for: Callable[..., Path]) -> None:
    run_dir = _run(recipe_for(stages=[{"type": "prune", "method": "unstructured", "scope": "global", "sparsity": 0.6}]))
    layers = _metrics(run_dir)["layers"]
    zeros = sum(layer["sparsity"] * layer["parameters"] for layer in layers)
    assert zeros / sum(layer["parameters"] for layer in layers) == pytest.approx(0.6, abs=1e-3)


def test_per_pattern_targets(recipe_for: Callable[..., Path]) -> None:
    targets = [{"pattern": r"intermediate\.dense", "sparsity": 0.9}, {"pattern": r"attention", "sparsity": 0.2}]
    m = _metrics(_run(recipe_for(stages=[{"type": "prune", "method": "unstructured", "targets": targets}])))
    by_name = {layer["name"]: layer["sparsity"] for layer in m["layers"]}
    assert all(v == pytest.approx(0.9, abs=1e-3) for k, v in by_name.items() if "intermediate.dense" in k)
    assert all(v == pytest.approx(0.2, abs=1e-3) for k, v in by_name.items() if "attention" in k)
    assert not any(k.endswith("output.dense") and "attention" not in k for k in by_name)  # not targeted


def test_structured_removal_equals_zeroed_model(tiny_bert: Path) -> None:
    """Zero the heads and neurons that will be removed: removing them must not change the output."""
    model = hf.load_model(tiny_bert)
    with torch.no_grad():
        for layer in model.encoder.layer:
            size = layer.attention.self.attention_head_size
            for name in ("query", "key", "value"):
                lin = getattr(layer.attention.self, name)
                lin.weight[:size] = 0
                lin.bias[:size] = 0
            layer.attention.output.dense.weight[:, :size] = 0
            layer.intermediate.dense.weight[:32] = 0
            layer.intermediate.dense.bias[:32] = 0
            layer.output.dense.weight[:, :32] = 0
    ids = torch.randint(5, 40, (2, 9))
    mask = torch.ones_like(ids)
    before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    structure = prune_bert(model, heads=0.25, ffn=0.5, p=2)
    assert structure == {"heads": [3, 3], "intermediate": [32, 32]}
    after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(before, after, atol=1e-5)


def test_structured_checkpoint_reloads_and_exports(recipe_for: Callable[..., Path]) -> None:
    prune = {"type": "prune", "method": "structured", "heads": 0.25, "ffn": 0.5}
    run_dir = _run(recipe_for(stages=[prune, {"type": "export"}, {"type": "quantize"}]))
    m = _metrics(run_dir)
    assert m["parameters"] < m["parameters_before"] and "speed and size" in m["speed"]
    folder = run_dir / "01_prune" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["edge_compress_structure"] == {"heads": [3, 3], "intermediate": [32, 32]}
    reloaded = hf.load_model(folder)
    assert reloaded.encoder.layer[0].attention.self.query.out_features == 24
    assert _metrics(run_dir, "02_export")["max_abs_diff"] <= 1e-4
    assert _metrics(run_dir, "03_quantize")["kernels"]["int8_total"] > 0


def test_zoo_models_take_masks(tmp_path: Path, recipe_for: Callable[..., Path]) -> None:
    from compress.models.attention import AttentionConfig
    from compress.models.config import ZooConfig
    from compress.models.encoder import build_model
    from compress.models.zoo import load_zoo, save_zoo

    cfg = ZooConfig(
        vocab_size=259,
        max_len=64,
        d_model=32,
        n_heads=2,
        n_layers=2,
        d_ff=64,
        attention=AttentionConfig("windowed", window=8),
    )
    save_zoo(build_model(cfg), tmp_path / "zoo")
    path = recipe_for(
        model={"zoo": str(tmp_path / "zoo")},
        task="classification",
        stages=[{"type": "prune", "method": "nm"}],
    )
    spec = path.read_text().replace("max_length: 32", "max_length: 32\n  tokenizer: bytes")
    path.write_text(spec.replace("pair_fields:\n    - a\n    - b\n    score_field: score\n", "label_field: a\n"))
    run_dir = _run(path)
    pruned = load_zoo(run_dir / "01_prune" / "model")
    up = pruned.backbone.body.blocks[0].g.up.weight  # type: ignore[union-attr, index]
    assert (up.reshape(64, 8, 4) != 0).sum(-1).max() <= 2
    assert pruned.head.weight.count_nonzero() == pruned.head.weight.numel()  # the task head stays dense


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"method": "unstructured", "sparsity": 1.0}, "less than 1"),
        ({"method": "unstructured", "sparsity": -0.1}, "greater than or equal to 0"),
        ({"method": "sparsify"}, "'unstructured', 'nm', 'block' or 'structured'"),
        ({"method": "nm", "n": 4, "m": 4}, "N:M pruning needs N < M"),
        ({"method": "structured"}, "needs heads > 0 or ffn > 0"),
    ],
)
def test_bad_prune_configs(recipe_for: Callable[..., Path], prune: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe(recipe_for(stages=[{"type": "prune", **prune}]))


def test_regex_matching_nothing_is_an_error(recipe_for: Callable[..., Path]) -> None:
    targets = [{"pattern": "no_such_layer", "sparsity": 0.5}]
    with pytest.raises(UserError, match="'no_such_layer' matches no Linear layer"):
        _run(recipe_for(stages=[{"type": "prune", "method": "unstructured", "targets": targets}]))
