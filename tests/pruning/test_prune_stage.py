"""The prune stage on a tiny BERT and a tiny zoo model: masks, structured removal, reload, export."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console

from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.stages.prune.structured import prune_bert


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


def _peaky_copy(tiny_bert: Path, folder: Path) -> Path:
    """The tiny BERT with query/key weights scaled up: random-init attention is near uniform, which would
    hide a wrong head split in the fused Attention; peaky attention exposes it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_bert, folder)
    weights = load_file(folder / "model.safetensors")
    for name in weights:
        if ".attention.self.query." in name or ".attention.self.key." in name:
            weights[name] = weights[name] * 30
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_structured_checkpoint_reloads_and_exports(
    recipe_for: Callable[..., Path], tiny_bert: Path, tmp_path: Path
) -> None:
    prune = {"type": "prune", "method": "structured", "heads": 0.25, "ffn": 0.5}
    peaky = _peaky_copy(tiny_bert, tmp_path / "peaky")
    run_dir = _run(recipe_for(stages=[prune, {"type": "export"}, {"type": "quantize"}], model={"hf": str(peaky)}))
    m = _metrics(run_dir)
    assert m["parameters"] < m["parameters_before"] and "speed and size" in m["speed"]
    folder = run_dir / "01_prune" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["edge_compress_structure"] == {"heads": [3, 3], "intermediate": [32, 32]}
    reloaded = hf.load_model(folder)
    assert reloaded.encoder.layer[0].attention.self.query.out_features == 24
    export = _metrics(run_dir, "02_export")
    assert export["max_abs_diff"] <= 1e-4
    # the fused Attention must be built with the pruned width (3 heads x 8), not the config's 4 x 8
    assert export["fused_ops"].get("Attention", 0) == 2
    assert _metrics(run_dir, "03_quantize")["kernels"]["int8_total"] > 0


def _tiny_zoo_recipe(tmp_path: Path, recipe_for: Callable[..., Path], prune: dict[str, Any], n_heads: int) -> Path:
    """A recipe pruning a random-init 2-layer windowed zoo classifier, on the byte tokenizer."""
    from compress.models.attention import AttentionConfig
    from compress.models.config import ZooConfig
    from compress.models.encoder import build_model
    from compress.models.zoo import save_zoo

    cfg = ZooConfig(
        vocab_size=259,
        max_len=64,
        d_model=32,
        n_heads=n_heads,
        n_layers=2,
        d_ff=64,
        attention=AttentionConfig("windowed", window=8),
    )
    save_zoo(build_model(cfg), tmp_path / "zoo")
    path = recipe_for(model={"zoo": str(tmp_path / "zoo")}, task="classification", stages=[{"type": "prune", **prune}])
    spec = path.read_text().replace("max_length: 32", "max_length: 32\n  tokenizer: bytes")
    path.write_text(spec.replace("pair_fields:\n    - a\n    - b\n    score_field: score\n", "label_field: a\n"))
    return path


def test_zoo_models_take_masks(tmp_path: Path, recipe_for: Callable[..., Path]) -> None:
    from compress.models.zoo import load_zoo

    run_dir = _run(_tiny_zoo_recipe(tmp_path, recipe_for, {"method": "nm"}, n_heads=2))
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


@pytest.mark.parametrize(
    ("structure", "expected"),
    [
        (None, (12, 384)),
        ({"heads": [9, 9, 9], "intermediate": [768, 768, 768]}, (9, 288)),
        ({"heads": [9, 8, 9], "intermediate": [768, 768, 768]}, (0, 0)),  # no single width: no Attention fusion
    ],
)
def test_fusion_uses_the_pruned_attention_width(structure: dict[str, Any] | None, expected: tuple[int, int]) -> None:
    from exporters.ort_fusion import _attention_shape

    config: dict[str, Any] = {"num_attention_heads": 12, "hidden_size": 384}
    if structure:
        config["edge_compress_structure"] = structure
    assert _attention_shape(config) == expected


ZOO_VARIANTS = {
    "windowed": {"attention": {"kind": "windowed", "window": 4, "global_tokens": 1}},
    "block_sparse": {"attention": {"kind": "block_sparse", "block": 4}},
    "linformer": {"attention": {"kind": "linformer", "proj_len": 8, "max_len": 32}},
    "kernelized": {"attention": {"kind": "kernelized", "features": 16}},
    "lsh": {"attention": {"kind": "lsh", "chunk": 8, "n_hashes": 2, "buckets": 4}},  # shared QK: no k
    "reversible": {"attention": {"kind": "dense"}, "reversible": True},
    "hourglass-lm": {
        "task": "lm",
        "n_layers": 0,
        "attention": {"kind": "windowed", "window": 4, "causal": True},
        "hourglass": {"factor": 2, "pre": 1, "inner": 1, "post": 1},
    },
}


@pytest.mark.parametrize("variant", sorted(ZOO_VARIANTS))
def test_zoo_structured_removal_equals_zeroed_model(variant: str) -> None:
    """On every zoo architecture: zero head 0 and half the FFN neurons of each block, then remove them."""
    from compress.models.blocks import Block
    from compress.models.config import ZOO_FORMAT, ZOO_VERSION, ZooConfig
    from compress.models.encoder import build_model
    from compress.stages.prune.structured import prune_zoo

    raw = {"vocab_size": 50, "max_len": 32, "d_model": 16, "n_heads": 4, "n_layers": 2, "d_ff": 32}
    torch.manual_seed(0)
    model = build_model(
        ZooConfig.from_dict({"format": ZOO_FORMAT, "version": ZOO_VERSION, **raw, **ZOO_VARIANTS[variant]})
    )
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, Block)):
            for name in block.f.attn.projections:
                getattr(block.f.attn, name).weight[:4] = 0
                getattr(block.f.attn, name).bias[:4] = 0
            block.f.attn.out.weight[:, :4] = 0
            block.g.up.weight[:16] = 0
            block.g.up.bias[:16] = 0
            block.g.down.weight[:, :16] = 0
    ids = torch.randint(3, 50, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        before = model(ids, mask)
    n_before = sum(p.numel() for p in model.parameters())
    pruned, structure = prune_zoo(model, heads=0.25, ffn=0.5, p=2)
    assert pruned.cfg.n_heads == 3 and pruned.cfg.head_dim == 4 and pruned.cfg.d_ff == 16
    assert set(structure["heads"]) == {3}
    assert sum(p.numel() for p in pruned.parameters()) < n_before
    with torch.no_grad():
        after = pruned(ids, mask)
    assert torch.allclose(before, after, atol=1e-5)


def test_zoo_structured_stage_reloads(tmp_path: Path, recipe_for: Callable[..., Path]) -> None:
    from compress.models.zoo import load_zoo

    prune = {"method": "structured", "heads": 0.5, "ffn": 0.5}
    run_dir = _run(_tiny_zoo_recipe(tmp_path, recipe_for, prune, n_heads=4))
    m = _metrics(run_dir)
    pruned = load_zoo(run_dir / "01_prune" / "model")
    assert (pruned.cfg.n_heads, pruned.cfg.head_dim, pruned.cfg.d_ff) == (2, 8, 32)
    assert m["parameters"] == sum(p.numel() for p in pruned.parameters()) < m["parameters_before"]
    assert "speed and size" in m["speed"]


def _zoo_classifier_recipe(tmp_path: Path, recipe_for: Callable[..., Path], prune: dict[str, Any]) -> Path:
    from conftest import spam_rows

    from compress.models.attention import AttentionConfig
    from compress.models.config import ZooConfig
    from compress.models.encoder import build_model
    from compress.models.zoo import save_zoo

    for name, n, seed in (("train", 64, 0), ("valid", 16, 1)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spam_rows(n, seed)))
    cfg = ZooConfig(
        vocab_size=259,
        max_len=64,
        d_model=32,
        n_heads=2,
        n_layers=1,
        d_ff=64,
        attention=AttentionConfig("windowed", window=8),
    )
    torch.manual_seed(0)
    save_zoo(build_model(cfg), tmp_path / "zoo")
    data = {
        "train": {"path": str(tmp_path / "train.jsonl"), "label_field": "label"},
        "evaluation": {"path": str(tmp_path / "valid.jsonl"), "label_field": "label"},
        "tokenizer": "bytes",
        "max_length": 64,
        "batch_size": 8,
    }
    return recipe_for(
        model={"zoo": str(tmp_path / "zoo")}, task="classification", data=data, stages=[{"type": "prune", **prune}]
    )


def test_gradual_schedule_reaches_the_target_and_picks_a_full_sparsity_epoch(
    tmp_path: Path, recipe_for: Callable[..., Path]
) -> None:
    recovery = {"epochs": 3, "batch_size": 8, "lr": 3e-3, "distill": False, "patience": 3}
    prune = {
        "method": "unstructured",
        "sparsity": 0.8,
        "schedule": "gradual",
        "ramp_epochs": 2,
        "frequency": 2,
        "recovery": recovery,
    }
    run_dir = _run(_zoo_classifier_recipe(tmp_path, recipe_for, prune))
    m = _metrics(run_dir)
    assert all(abs(layer["sparsity"] - 0.8) < 1e-3 for layer in m["layers"])
    history = m["recovery"]["history"]
    # the ramp ends with epoch 2: epoch 1 (at partial sparsity) may not be picked as the best
    assert [h.get("eligible", True) for h in history] == [False, True, True]
    assert m["recovery"]["best_epoch"] in (2, 3) and m["schedule"] == "gradual"


def test_mask_keeper_follows_the_cubic_ramp() -> None:
    from compress.stages.prune.gradual import MaskKeeper

    lin = torch.nn.Linear(10, 10)
    model = torch.nn.Sequential(lin)
    seen: list[float] = []

    def make(weights: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        seen.append(fraction)
        from compress.stages.prune import masks

        return {n: masks.unstructured(w, 0.5 * fraction) for n, w in weights.items()}

    keeper = MaskKeeper(["0"], make, ramp_steps=100, frequency=25, root=lambda m: m)
    with torch.no_grad():
        for step in range(1, 121):
            keeper(model, step)
            lin.weight.add_(0.01)  # an optimizer step would regrow pruned weights; the keeper re-zeroes them
    assert seen == [keeper.ramp(s) for s in (0, 25, 50, 75, 100)]
    assert seen[-1] == 1.0 and 0 < seen[1] < seen[2] < seen[3] < 1
    keeper(model, 121)
    assert abs(float((lin.weight == 0).float().mean()) - 0.5) < 1e-6
    assert not keeper.eligible(99) and keeper.eligible(100)


def test_one_shot_recovery_keeps_masks_on_bert(recipe_for: Callable[..., Path]) -> None:
    recovery = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "losses": {"embedding_cosine": 1.0}}
    path = recipe_for(stages=[{"type": "prune", "method": "nm", "recovery": recovery}])
    spec = yaml.safe_load(path.read_text())
    spec["data"]["train"] = spec["data"]["calibration"]
    path.write_text(yaml.safe_dump(spec))
    run_dir = _run(path)
    m = _metrics(run_dir)
    assert all(abs(layer["sparsity"] - 0.5) < 1e-6 for layer in m["layers"])
    assert m["recovery"]["epochs_run"] == 1 and "best_spearman" in m["recovery"]


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"method": "nm", "schedule": "gradual", "recovery": {"epochs": 3}}, "applies to unstructured and block"),
        ({"method": "unstructured", "schedule": "gradual"}, "give recovery settings"),
        (
            {"method": "unstructured", "schedule": "gradual", "recovery": {"epochs": 2}, "ramp_epochs": 2},
            "ramp_epochs < recovery.epochs",
        ),
        ({"method": "structured", "heads": 0.5, "recovery": {"epochs": 2}}, "follow the prune stage with a distill"),
    ],
)
def test_bad_schedules(recipe_for: Callable[..., Path], prune: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe(recipe_for(stages=[{"type": "prune", **prune}]))
