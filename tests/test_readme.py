"""The README is the user's front door: its recipe reference must stay a valid, complete recipe."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from compress import recipe as recipe_module
from compress.data import spec as data_spec
from compress.models import spec as model_spec
from compress.recipe import load_recipe
from compress.stages import STAGE_CONFIGS
from compress.training import settings as training_settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _reference_block() -> str:
    section = README.split("## Recipe reference", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, "README lost its recipe reference block"
    return match.group(1)


def test_readme_recipe_reference_is_a_valid_recipe(tmp_path: Path) -> None:
    path = tmp_path / "readme.yaml"
    path.write_text(_reference_block())
    parsed = load_recipe(path)
    assert [s.type for s in parsed.stages] == ["export", "quantize", "validate"]


def test_readme_mentions_every_recipe_field() -> None:
    block = _reference_block()
    config_modules = [__import__(c.__module__, fromlist=["_"]) for c in STAGE_CONFIGS.values()]
    models = [
        obj
        for module in (recipe_module, data_spec, model_spec, training_settings, *config_modules)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__
    ]
    missing = [
        f"{model.__name__}.{name}"
        for model in models
        for name in model.model_fields
        if not re.search(rf"\b{name}:", block)
    ]
    assert not missing, f"README recipe reference lacks: {missing}"


def test_readme_shows_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README
