"""Run a sweep: the teacher's fp32 export, each level (a resumable run of its own), the front, the choice.

output.dir/<name>-fp32/      the teacher exported by the recipe's export stage (the yardstick)
output.dir/<name>-<level>/   each level's run (package the chosen one)
output.dir/<name>/           sweep.json, sweep.md, report.html (the front, plotted)
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress import distributed
from compress.context import Context
from compress.errors import GateFailed, StageFailed
from compress.models import hf
from compress.models.spec import HFModel, PackageModel
from compress.pipeline import fingerprints
from compress.pipeline import run as run_pipeline
from compress.pipeline import run_dir as run_dirs
from compress.pipeline.preflight import preflight
from compress.recipe import Recipe, ValidateStage
from compress.report.sweep import write_front
from compress.sweep.front import Entry, final_onnx, measure
from compress.sweep.levels import TEACHER, level_recipes, teacher_recipe


class SweepFailed(StageFailed):
    """No level met the goal (exit 1): the outputs are written first, naming the most accurate level."""


def sweep(recipe: Recipe, fresh: bool = False, log: Any = None) -> Path:
    """Run every level and the front; returns output.dir/<name> (sweep.json, sweep.md, report.html)."""
    assert recipe.sweep is not None
    out = recipe.output.dir / recipe.name
    run_dirs.check_claim(out)
    levels = level_recipes(recipe)
    teacher = teacher_recipe(recipe)
    sources = {}
    for made in (teacher, *(level for _, level in levels)):  # every run is checked before any work
        sources[made.name] = preflight(made)
        run_dirs.check_claim(made.output.dir / made.name)
    ctx = Context(recipe=teacher, run_dir=out)
    say = log or ctx.log
    say(f"[bold]sweep {recipe.name}[/]: the teacher's fp32 export, then {len(levels)} levels")
    teacher_dir = run_pipeline(teacher, fresh=fresh)
    status: dict[str, str] = {}
    dirs = {}
    for index, (name, level) in enumerate(levels):
        say(f"[bold]sweep level {name}[/] ({_describe(recipe, name)}) -> {level.output.dir / level.name}")
        if not fresh and distributed.is_main():  # rank 0 owns the run folders (torchrun)
            others = [made for i, (_, made) in enumerate(levels) if i != index]
            shared = share_stages(level, fingerprints(level, sources[level.name]), others)
            if shared:
                say(f"{name}: reusing {shared} (the same settings and inputs: the same fingerprints)")
        try:
            dirs[name] = run_pipeline(level, fresh=fresh)
            status[name] = "passed" if _validated(level) else "no validate stage"
        except GateFailed as exc:  # measured and shown, never chosen
            dirs[name] = level.output.dir / level.name
            status[name] = f"gate failed: {exc}"
    if not distributed.is_main():
        return out  # torchrun: the levels trained on every rank; rank 0 alone measures and writes the front
    source = hf.model_folder(recipe.model) if isinstance(recipe.model, HFModel | PackageModel) else None
    entries = [Entry(TEACHER, teacher_dir, final_onnx(teacher_dir, source))]
    entries += [Entry(name, d, final_onnx(d, source)) for name, d in dirs.items()]
    rows = measure(entries, ctx, recipe.sweep.examples, recipe.sweep.warmup, _threads(recipe))
    result = summarize(recipe, rows, status)
    run_dirs.claim(out)
    write_front(out, result)
    if result["goal"] is not None and result["chosen"] is None:
        raise SweepFailed(result["verdict"])
    return out


def share_stages(level: Recipe, expected: list[str], others: list[Recipe]) -> str:
    """Link into `level`'s run the finished leading stages of another level's run whose `done` fingerprints are
    the ones `level` expects (`expected`: pipeline.fingerprints; e.g. the same pruning before another number of
    layers), from the run that has the most of them (an earlier sweep may have run a later level). The
    pipeline reuses exactly those stages, as it would its own: sharing never changes a result."""
    target = level.output.dir / level.name
    names = [f"{i:02d}_{stage.type}" for i, stage in enumerate(level.stages, 1)]
    best, count = None, 0
    for other in others:
        source = other.output.dir / other.name
        for i, name in enumerate(names):
            done = source / name / "done"
            if not done.is_file() or done.read_text().strip() != expected[i]:
                break
            if i + 1 > count:
                best, count = source, i + 1
    linked: list[str] = []
    if best is None:
        return ""
    for i, name in enumerate(names[:count]):
        mine = target / name / "done"
        if mine.is_file() and mine.read_text().strip() == expected[i]:
            continue  # this run's own stage will be reused as it is
        run_dirs.claim(target)
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(best / name, target / name, copy_function=_link)
        linked.append(name)
    return f"{', '.join(linked)} of {best}" if linked else ""


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # finished stage files are never written again: a hard link is a safe copy
    except OSError:
        shutil.copy2(src, dst)


def summarize(recipe: Recipe, rows: list[dict[str, Any]], status: dict[str, str]) -> dict[str, Any]:
    """The front with drops and speed-ups against the teacher's row, and the goal's choice."""
    assert recipe.sweep is not None
    teacher = rows[0]
    for row in rows:
        row["drop"] = teacher["value"] - row["value"]
        row["speedup"] = teacher["latency_ms"]["p50"] / row["latency_ms"]["p50"]
        row["status"] = status.get(row["label"], "yardstick")
        row["structure"] = _describe(recipe, row["label"]) if row is not teacher else "teacher, fp32"
    levels = rows[1:]
    goal = recipe.sweep.goal
    chosen, verdict = None, "no goal: nothing chosen"
    if goal is not None:
        fits = [r for r in levels if r["drop"] <= goal.max_drop + 1e-12 and _ok(r)]
        if fits:
            best = min(fits, key=lambda r: r["latency_ms"]["p50"])
            chosen = best["label"]
            verdict = (
                f"chosen: {chosen}, the fastest level within a drop of {goal.max_drop:g} "
                f"({best['metric']} drop {best['drop']:+.4f}, {best['speedup']:.2f}x the teacher's fp32): "
                f"edge-compress package {best['run']}"
            )
        else:
            top = max(levels, key=lambda r: r["value"])
            verdict = (
                f"sweep {recipe.name}: no level that passed its gate is within {goal.max_drop:g} "
                f"{teacher['metric']} of the teacher's fp32 ({teacher['value']:.4f}); the most accurate is "
                f"{top['label']} ({top['value']:.4f}, drop {top['drop']:+.4f}, {top['speedup']:.2f}x, "
                f"{top['status']}): loosen sweep.goal.max_drop or add a lighter level"
            )
    return {
        "name": recipe.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": recipe.task,
        "examples": rows[0]["examples"],
        "goal": goal.model_dump() if goal is not None else None,
        "chosen": chosen,
        "verdict": verdict,
        "rows": rows,
    }


def _ok(row: dict[str, Any]) -> bool:
    return row["status"] in ("passed", "no validate stage")


def _validated(recipe: Recipe) -> bool:
    return any(isinstance(s, ValidateStage) for s in recipe.stages)


def _threads(recipe: Recipe) -> int:
    for stage in recipe.stages:
        if isinstance(stage, ValidateStage):
            return stage.threads
    return 2


def _describe(recipe: Recipe, name: str) -> str:
    assert recipe.sweep is not None
    level = dict(zip(recipe.sweep.level_names(), recipe.sweep.levels, strict=True))[name]
    layers = f"{level.layers} layers" if level.layers is not None else "all layers"
    return f"heads -{level.heads:.0%}, FFN -{level.ffn:.0%}, {layers}"
