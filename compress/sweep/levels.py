"""Each sweep level as a recipe of its own, and the teacher's fp32 export run the levels are measured against."""

from __future__ import annotations

from typing import Any

from compress.errors import UserError
from compress.models import hf
from compress.models.spec import HFModel, PackageModel
from compress.recipe import Recipe, recipe_from_dict
from compress.recipe.sweep import SweepLevel

TEACHER = "fp32"  # the teacher's run: output.dir/<name>-fp32, its export stage alone


def spaced_layers(depth: int, kept: int) -> tuple[int, ...]:
    """`kept` of `depth` layers, evenly spaced, the top layer always among them (6 -> 3: 1, 3, 5)."""
    if kept > depth:
        raise UserError(f"sweep: a level keeps {kept} layers of a {depth}-layer model")
    return tuple((i + 1) * depth // kept - 1 for i in range(kept))


def model_depth(recipe: Recipe) -> int:
    """Transformer layers of the recipe's model (config.json's num_hidden_layers)."""
    if not isinstance(recipe.model, HFModel | PackageModel):
        raise UserError("sweep: structure levels are for Hugging Face encoders")
    config = hf.read_config(hf.model_folder(recipe.model))
    depth = config.get("num_hidden_layers")
    if not isinstance(depth, int) or depth < 1:
        raise UserError(f"sweep: {hf.model_folder(recipe.model)}/config.json gives no num_hidden_layers")
    return depth


def level_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """(level name, its recipe): the prune stage set to the level's heads and ffn (dropped when both are 0),
    distill keeping the level's layers; named <name>-<level>, without the sweep block."""
    assert recipe.sweep is not None
    depth = model_depth(recipe) if any(level.layers for level in recipe.sweep.levels) else 0
    out = []
    for name, level in zip(recipe.sweep.level_names(), recipe.sweep.levels, strict=True):
        body = _without_sweep(recipe, f"{recipe.name}-{name}")
        body["stages"] = [s for s in (_staged(stage, level, depth) for stage in body["stages"]) if s is not None]
        out.append((name, recipe_from_dict(body, f"sweep level {name}")))
    return out


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The teacher exported as the recipe's export stage exports (fused fp32): the front's yardstick."""
    body = _without_sweep(recipe, f"{recipe.name}-{TEACHER}")
    body["stages"] = [s for s in body["stages"] if s["type"] == "export"]
    body["data"]["transfer"] = []  # read by distillation only
    return recipe_from_dict(body, f"sweep {TEACHER} export")


def _without_sweep(recipe: Recipe, name: str) -> dict[str, Any]:
    body = recipe.model_dump(mode="json", exclude={"sweep"})
    body["name"] = name
    return body


def _staged(stage: dict[str, Any], level: SweepLevel, depth: int) -> dict[str, Any] | None:
    if stage["type"] == "prune":
        if not (level.heads or level.ffn):
            return None
        return {**stage, "heads": level.heads, "ffn": level.ffn}
    if stage["type"] == "distill" and level.layers is not None:
        return {**stage, "keep_layers": list(spaced_layers(depth, level.layers)), "keep_every": None}
    return stage
