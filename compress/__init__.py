"""edge-compress: compress trained transformers into validated int8 ONNX artifacts for CPUs.

`import compress` is cheap: nothing heavy (torch, onnxruntime) is imported until it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress.errors import StageFailed, UserError

if TYPE_CHECKING:
    from compress.api import Report, load, load_bundle, run_stage
    from compress.api import run as run_recipe
    from compress.pipeline import run
    from compress.recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = [
    "Recipe",
    "Report",
    "StageFailed",
    "UserError",
    "__version__",
    "load",
    "load_bundle",
    "load_recipe",
    "run",
    "run_recipe",
    "run_stage",
]
_API = {"load": "load", "load_bundle": "load_bundle", "run_recipe": "run", "run_stage": "run_stage", "Report": "Report"}


def __getattr__(name: str) -> Any:
    if name in ("Recipe", "load_recipe"):
        from compress import recipe

        return getattr(recipe, name)
    if name == "run":
        from compress.pipeline import run

        return run
    if name in _API:  # the Python API (compress/api.py): load, load_bundle, run_recipe, run_stage, Report
        from compress import api

        return getattr(api, _API[name])
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
