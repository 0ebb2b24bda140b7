"""The Python API: what `edge-compress run` does, for notebooks and other tools.

    import compress
    recipe = compress.load("recipes/minilm-int8.yaml")  # a path, YAML text or a dict
    report = compress.run_recipe(recipe)                 # a Report (report.json as an object)
    artifact, metrics = compress.run_stage(              # one stage, outside a pipeline
        QuantizeStage(type="quantize", mode="dynamic"), report.stage_artifact("export"),
        recipe=recipe, work_dir="scratch")

Failures are exceptions, as the CLI's exit codes are: UserError (bad input), StageFailed (a stage's own
check failed) and GateFailed (a StageFailed: a target missed the validate gate; the run's report.json is
still written and the exception's `metrics` hold the figures). Each carries the one line the CLI prints.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from compress import pipeline
from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.logs import quiet_library_logs
from compress.pipeline.preflight import source_artifact
from compress.recipe import Recipe, load_recipe, recipe_from_dict, recipe_from_text
from compress.report import read_report
from compress.stages import STAGES, StageConfig

RecipeLike = Recipe | str | Path | Mapping[str, Any]

__all__ = ["RecipeLike", "Report", "load", "run", "run_stage"]


def load(recipe: RecipeLike) -> Recipe:
    """A validated Recipe from a path, YAML text or a dict (a Recipe is returned as it is).

    A Path, or a str without a line break that names an existing file or ends in .yaml/.yml, is read as a
    file; any other str is YAML text. Bad input is one UserError line: "FILE:LINE: field: why",
    "<string>:LINE: field: why" or "<dict>: field: why".
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path):
        return load_recipe(recipe)
    if isinstance(recipe, str):
        return load_recipe(recipe) if _names_a_file(recipe) else recipe_from_text(recipe, "<string>")
    if isinstance(recipe, Mapping):
        return recipe_from_dict(dict(recipe), "<dict>")
    raise TypeError(f"a recipe is a path, YAML text or a dict, not {type(recipe).__name__}")


def _names_a_file(text: str) -> bool:
    if "\n" in text or not text.strip():
        return False
    if text.endswith((".yaml", ".yml")):
        return True
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the system, a NUL: not a path, so YAML text
        return False


@dataclass(frozen=True)
class Report:
    """A finished run: its folder and its report.json (`data`), with the figures at hand."""

    run_dir: Path
    data: dict[str, Any]

    @classmethod
    def read(cls, run_dir: str | Path) -> Report:
        """The report of a run folder (also one an earlier `edge-compress run` wrote)."""
        run_dir = Path(run_dir)
        return cls(run_dir, read_report(run_dir))

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def task(self) -> str:
        return str(self.data["task"])

    @property
    def stages(self) -> list[dict[str, Any]]:
        """One dict per stage: index, type, dir, reused, seconds, metrics."""
        return list(self.data["stages"])

    @property
    def targets(self) -> dict[str, dict[str, Any]]:
        """Target name -> the validate stage's figures there (fidelity, speedup_p50, drop, gate...)."""
        return dict(self.data["targets"])

    @property
    def warnings(self) -> list[str]:
        return list(self.data["warnings"])

    @property
    def passed(self) -> bool:
        """Every target's gate passed (a target without a gate passes)."""
        return all((t.get("gate") or {}).get("passed", True) for t in self.data["targets"].values())

    @property
    def artifact(self) -> Path | None:
        """The final model.onnx of the run (None when no stage produced ONNX)."""
        for stage in reversed(self.data["stages"]):
            if (self.run_dir / stage["dir"] / "artifact.json").is_file():
                model = self.stage_artifact(stage["index"]).files.get("model")
                if model is not None and model.suffix == ".onnx" and model.is_file():
                    return model
        return None

    def stage_artifact(self, stage: str | int) -> Artifact:
        """The artifact a stage of this run produced, by stage type ("export") or index (1 for the first)."""
        found = next((s for s in self.data["stages"] if stage in (s["type"], s["index"])), None)
        if found is None:
            raise UserError(f"{self.run_dir}: no stage {stage!r} in this run")
        path = self.run_dir / found["dir"] / "artifact.json"
        if not path.is_file():
            raise UserError(f"{path}: missing (the stage did not finish)")
        named = self.data.get("model")
        model = Path(named) if isinstance(named, str) and named else None
        return Artifact.from_json(
            path.read_text(), self.run_dir, model if model is not None and model.is_dir() else None
        )


def run(recipe: RecipeLike, *, fresh: bool = False, quiet: bool = True) -> Report:
    """Run a recipe (path, YAML text, dict or Recipe) like `edge-compress run` and return its Report.

    A finished stage whose inputs did not change is reused, as by the CLI; fresh=True recomputes all.
    quiet=False prints the stages' progress and warnings (to stderr); warnings are in Report.warnings
    either way. Raises UserError, StageFailed or GateFailed (see the module's docstring).
    """
    parsed = load(recipe)
    ctx = Context(recipe=parsed, run_dir=parsed.output.dir / parsed.name, console=_console(quiet))
    with quiet_library_logs():
        return Report.read(pipeline.run(parsed, ctx, fresh=fresh))


def load_bundle(
    folder: str | Path, *, threads: int | None = None, cpu_family: str | None = None, ops_library: str | None = None
) -> Any:
    """A packaged bundle, loaded as the server loads it: `.predict(examples)` answers what POST /v1/predict
    answers. A bundle of CPU-family variants loads the one of this CPU (or `cpu_family`); `.variant` says
    which. A bundle that cannot be served (bad hash, a family nobody validated, missing kernels) raises
    UserError with the server's one line."""
    import os

    from compress.serving.bundle_check import BundleError
    from compress.serving.server import Model

    try:
        return Model(Path(folder), threads or len(os.sched_getaffinity(0)), ops_library, cpu_family)
    except (BundleError, OSError) as exc:
        raise UserError(str(exc)) from None


def run_stage(
    stage_config: StageConfig,
    artifact: Artifact,
    *,
    recipe: RecipeLike,
    work_dir: str | Path,
    quiet: bool = True,
) -> tuple[Artifact, dict[str, Any]]:
    """Run one stage on an artifact, outside a pipeline: its files go to work_dir/<type>/.

    `recipe` supplies what the stage reads besides the artifact (data, task, targets, model). The folder
    work_dir/<type> is created; an existing non-empty one is refused (UserError), and it is removed again
    when the stage fails. It receives the stage's files plus artifact.json and metrics.json, as in a run.
    Returns the new artifact and the stage's metrics (with seconds and warnings).
    """
    kind = STAGES.get(getattr(stage_config, "type", ""))
    if kind is None or not isinstance(stage_config, kind.config):
        raise TypeError(f"stage_config: a stage's config object (e.g. QuantizeStage), not {stage_config!r}")
    parsed = load(recipe)
    out = Path(work_dir) / stage_config.type
    existed = _claim_empty(out)
    ctx = Context(recipe=parsed, run_dir=Path(work_dir), console=_console(quiet), out_dir=out, work_dir=out / ".work")
    try:
        ctx.source = source_artifact(parsed)
        ctx.work_dir.mkdir()
        start = time.perf_counter()
        with quiet_library_logs():
            result, metrics = kind.run(artifact, stage_config, ctx)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # it was empty or absent: leave it as it was
        if existed:
            out.mkdir()
        raise
    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    metrics = {**metrics, "seconds": round(time.perf_counter() - start, 2), "warnings": ctx.warnings}
    source = ctx.source.files.get("model") if ctx.source else None
    (out / "artifact.json").write_text(result.to_json(out, source))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return result, metrics


def _claim_empty(out: Path) -> bool:
    """Create `out`, or accept it empty; True when it existed already."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder; give run_stage another work_dir")
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"{out}: not empty; run_stage writes only into a new or empty folder")
        existed = out.is_dir()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot be used ({exc.strerror or exc})") from None
    return existed


def _console(quiet: bool) -> Console:
    return Console(stderr=True, quiet=quiet)
