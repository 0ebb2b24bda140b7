"""Recipe parsing: one strict shape, and one clear line naming file:line and the field for bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from compress.errors import UserError
from compress.recipe import ExportStage, QuantizeStage, Recipe, load_recipe, recipe_schema

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
model: {hf: /nowhere}
task: embedding
data:
  calibration: {reference: lee-background, limit: 8}
  evaluation: {reference: lee}
stages:
  - type: export
  - type: quantize
    mode: static
    calibration: percentile
"""


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_recipe_parses_with_defaults() -> None:
    recipe = load_recipe(REPO / "recipes" / "minilm-int8.yaml")
    assert [s.type for s in recipe.stages] == ["export", "quantize", "validate"]
    assert isinstance(recipe.stages[0], ExportStage) and recipe.stages[0].tolerance == 1e-4
    assert recipe.targets == ["x86_64"]


def test_parsed_recipe_is_frozen(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    quant = recipe.stages[1]
    assert isinstance(quant, QuantizeStage) and quant.calibration == "percentile"
    with pytest.raises(ValueError, match="frozen"):
        recipe.name = "other"  # type: ignore[misc]


def test_round_trip_through_json(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    assert Recipe.model_validate(recipe.model_dump(mode="json")) == recipe


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("task: embedding", "task: [embedding"))
    assert message.startswith(f"{tmp_path / 'r.yaml'}:")
    assert "YAML syntax error" in message


def test_unknown_field_names_line_and_allowed(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("    calibration: percentile", "    calibration: percentile\n    bits: 4"))
    assert message.startswith(f"{tmp_path / 'r.yaml'}:12: stages[1].bits: unknown field; allowed:")
    assert "per_channel" in message and "calibration" in message


def test_unknown_stage_type(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("- type: quantize", "- type: quantise"))
    assert ":9: stages[1]" in message
    assert "quantise" in message and "'export', 'quantize', 'qat', 'validate'" in message


def test_wrong_value_type(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("limit: 8", "limit: many"))
    assert ":5: data.calibration.limit:" in message and "'many'" in message


def test_value_out_of_range(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "    calibration_samples: 0\n")
    assert "stages[1].calibration_samples" in message and "greater than or equal to 1" in message


def test_unknown_reference_set(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("reference: lee}", "reference: sts-b}"))
    assert "data.evaluation.reference" in message and "'lee'" in message


def test_missing_field(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("task: embedding\n", ""))
    assert "task: required field is missing" in message


def test_calibration_is_static_only(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("mode: static", "mode: dynamic"))
    assert "calibration applies to mode: static only" in message


def test_stage_order_is_enforced(tmp_path: Path) -> None:
    text = GOOD.replace("  - type: export\n", "") + "  - type: export\n"
    assert "stages must run in the order train -> prune -> distill -> export -> quantize -> qat -> validate" in _error(
        tmp_path, text
    )


def test_quantize_needs_export(tmp_path: Path) -> None:
    assert "add an export stage" in _error(tmp_path, GOOD.replace("  - type: export\n", ""))


def test_bad_regex_in_exclude_nodes(tmp_path: Path) -> None:
    assert "not a regular expression" in _error(tmp_path, GOOD + "    exclude_nodes: ['(']\n")


def test_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "a recipe is a mapping" in _error(tmp_path, "- just\n- a list\n")


def test_schema_describes_every_stage_field() -> None:
    schema = recipe_schema()
    defs = schema["$defs"]
    for stage in ("ExportStage", "QuantizeStage", "ValidateStage"):
        for name, prop in defs[stage]["properties"].items():
            assert name == "type" or prop.get("description"), f"{stage}.{name} has no description"
    assert set(schema["required"]) >= {"name", "model", "task", "data", "stages"}


def test_recipe_for_fixture_is_valid(recipe_for: Callable[..., Path]) -> None:
    assert load_recipe(recipe_for()).name == "tiny"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path: Path) -> None:
    assert load_recipe(path).name
