"""Run a recipe: the run directory, stage by stage, resumable, then the report.

runs/<name>/
  resolved_recipe.yaml          the recipe with every default filled in
  NN_<stage>/                   artifact files, artifact.json, metrics.json, `done` (written last)
  report.json, report.md

A stage writes into a hidden temporary folder that is renamed into place when it succeeds, and its
`done` marker records a fingerprint of everything that stage depends on. A rerun reuses a stage whose
fingerprint matches and recomputes it, and every stage after it, otherwise. A failed stage leaves the
finished ones untouched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress import distributed
from compress.artifact import Artifact
from compress.context import Context
from compress.data.cache import write_atomic
from compress.errors import GateFailed, UserError
from compress.pipeline import run_dir as run_dirs
from compress.pipeline.preflight import check_task_data, content_fingerprint, preflight, teacher_fingerprint
from compress.recipe import Recipe
from compress.report import StageRecord, write_report
from compress.stages import STAGES

TRAINING_STAGES = ("train", "prune", "distill")


def run(recipe: Recipe, ctx: Context | None = None, fresh: bool = False, until: str | None = None) -> Path:
    """Run the stages of `recipe` (all, or up to and including the stage type `until`).

    Returns the run directory (holding report.json and report.md).
    """
    run_dir = recipe.output.dir / recipe.name
    ctx = ctx or Context(recipe=recipe, run_dir=run_dir)
    source = preflight(recipe)
    ctx.source = source
    _load_data_up_front(recipe, ctx)
    if distributed.is_main():
        run_dirs.claim(run_dir)  # refuses a non-empty folder edge-compress did not make, before touching it
    if not distributed.is_main():  # torchrun: rank 0 owns the run directory; see compress/distributed.py
        distributed.barrier()  # rank 0 has taken the lock (and wiped, with fresh)
        with tempfile.TemporaryDirectory(prefix=f"edge-compress-rank{distributed.rank()}-") as scratch:
            return _run_stages(recipe, ctx, source, run_dir, until, scratch=Path(scratch))
    with _exclusive(run_dir):
        if fresh:
            kept = run_dirs.clear(run_dir)
            if kept:
                ctx.log(f"--fresh kept what edge-compress did not write: {', '.join(kept[:5])}")
        distributed.barrier()
        return _run_stages(recipe, ctx, source, run_dir, until)


@contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """One process per run directory: a second concurrent run would overwrite the first's stages."""
    with (run_dir / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir} is in use by another edge-compress run; wait for it to finish") from None
        yield


def _run_stages(  # noqa: PLR0917
    recipe: Recipe,
    ctx: Context,
    artifact: Artifact,
    run_dir: Path,
    until: str | None,
    scratch: Path | None = None,
) -> Path:
    """Run the stages; `scratch` (torchrun ranks other than 0) receives this process's outputs instead."""
    folder = artifact.files.get("model")
    if scratch is None:
        write_atomic(run_dir / "resolved_recipe.yaml", _resolved_yaml(recipe, folder).encode())
    records: list[StageRecord] = []
    stale = False
    stages = recipe.stages
    if until is not None:
        stages = stages[: [str(s.type) for s in stages].index(until) + 1]
    for (index, stage), fingerprint in zip(enumerate(stages, 1), fingerprints(recipe, artifact), strict=False):
        stage_dir = run_dir / f"{index:02d}_{stage.type}"
        synced = stage.type in TRAINING_STAGES  # torchrun ranks meet only in the stages that train
        if scratch is not None and not synced:
            break  # export, quantize, validate: rank 0's alone (a second process would skew latency)
        if synced:
            distributed.barrier()
        done = _is_done(stage_dir, fingerprint)
        if not stale and (distributed.agree(done) if synced else done):
            artifact = Artifact.from_json((stage_dir / "artifact.json").read_text(), run_dir, folder)
            metrics = json.loads((stage_dir / "metrics.json").read_text())
            ctx.log(f"[dim]{stage_dir.name}: finished earlier, reused[/]")
            records.append(StageRecord(index, stage.type, stage_dir, True, 0.0, metrics))
            continue
        stale = True  # everything after a recomputed stage is recomputed too
        ctx.log(f"[bold]{stage_dir.name}[/]")
        work = run_dir / f".{stage_dir.name}.work"
        if scratch is not None:
            artifact = _run_elsewhere(ctx, stage, artifact, scratch / stage_dir.name, work)
            continue
        try:
            artifact, record = _run_stage(ctx, stage, artifact, (index, stage_dir, work), fingerprint, synced)
        except GateFailed as exc:  # the report still shows every figure, and which target failed and why
            records.append(StageRecord(index, stage.type, stage_dir, False, 0.0, exc.metrics))
            write_report(run_dir, recipe, folder, records)
            raise
        records.append(record)
    if scratch is not None:
        return run_dir
    if until is None:
        run_dirs.drop_stages_after(run_dir, len(recipe.stages))
    write_report(run_dir, recipe, folder, records)
    return run_dir


def fingerprints(recipe: Recipe, source: Artifact) -> list[str]:
    """Each stage's fingerprint, in order: a hash of everything it depends on (the recipe's settings, the bytes
    of the files it reads, the versions that make the artifacts, its settings and every earlier stage's). A
    stage folder whose `done` holds it is reused."""
    fingerprint, out = _source_fingerprint(recipe, source), []
    for stage in recipe.stages:
        fingerprint = _hash(fingerprint + stage.model_dump_json() + json.dumps(teacher_fingerprint(stage)))
        out.append(fingerprint)
    return out


def _run_stage(  # noqa: PLR0917
    ctx: Context, stage: Any, artifact: Artifact, where: tuple[int, Path, Path], fingerprint: str, synced: bool
) -> tuple[Artifact, StageRecord]:
    """Compute one stage in a temporary folder renamed into place on success; `done` is written last."""
    index, stage_dir, work = where
    run_dir = stage_dir.parent
    tmp = run_dir / f".{stage_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ctx.out_dir = tmp
    ctx.work_dir = _work_dir(work, fingerprint)
    if synced:
        distributed.barrier()  # the other ranks use this work folder (checkpoints) once it is ready
    start = time.perf_counter()
    warned = len(ctx.warnings)
    try:
        artifact, metrics = STAGES[stage.type].run(artifact, stage, ctx)
    except GateFailed as exc:
        # The figures are kept (metrics.json, no `done`): a rerun measures again rather than reuse a failure.
        exc.metrics = {
            **exc.metrics,
            "seconds": round(time.perf_counter() - start, 2),
            "warnings": ctx.warnings[warned:],
        }
        exc.metrics["gate_failed"] = str(exc)
        shutil.rmtree(stage_dir, ignore_errors=True)
        write_atomic(tmp / "metrics.json", (json.dumps(exc.metrics, indent=2) + "\n").encode())
        tmp.rename(stage_dir)
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if [p.name for p in ctx.work_dir.iterdir()] == ["fingerprint"]:
            shutil.rmtree(ctx.work_dir)  # nothing to resume from: leave no clutter
        raise
    seconds = time.perf_counter() - start
    # Warnings live with the stage, so a rerun that reuses it still reports them.
    metrics = {**metrics, "seconds": round(seconds, 2), "warnings": ctx.warnings[warned:]}
    artifact = artifact.moved(tmp, stage_dir)
    write_atomic(
        tmp / "artifact.json", artifact.to_json(run_dir, ctx.source.files.get("model") if ctx.source else None).encode()
    )
    write_atomic(tmp / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    shutil.rmtree(stage_dir, ignore_errors=True)
    tmp.rename(stage_dir)
    write_atomic(stage_dir / "done", (fingerprint + "\n").encode())
    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    if synced:
        distributed.barrier()
    return artifact, StageRecord(index, stage.type, stage_dir, False, seconds, metrics)


def _run_elsewhere(ctx: Context, stage: Any, artifact: Artifact, out: Path, work: Path) -> Artifact:
    """A stage on a torchrun rank other than 0: outputs go to scratch; checkpoints are read from rank 0's
    work folder (rank 0 alone writes them)."""
    out.mkdir(parents=True)
    ctx.out_dir = out
    distributed.barrier()  # rank 0 has prepared the work folder
    ctx.work_dir = work
    artifact, _ = STAGES[stage.type].run(artifact, stage, ctx)
    distributed.barrier()
    return artifact


def _work_dir(work: Path, fingerprint: str) -> Path:
    """A stage's scratch folder that survives a kill; wiped when it belonged to another configuration."""
    marker = work / "fingerprint"
    if work.exists() and not (marker.is_file() and marker.read_text().strip() == fingerprint):
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    write_atomic(marker, (fingerprint + "\n").encode())
    return work


def _load_data_up_front(recipe: Recipe, ctx: Context) -> None:
    """Read the data the stages will need before any stage runs: a bad file fails fast, costing nothing."""
    if recipe.task == "embedding":
        ctx.evaluation  # noqa: B018 (cached property: loads and validates now)
    if ctx.source is not None:
        check_task_data(recipe, ctx.source, ctx)
    if any(getattr(stage, "mode", None) == "static" for stage in recipe.stages):
        ctx.calibration_examples  # noqa: B018
    if recipe.data.transfer:
        ctx.transfer_examples  # noqa: B018


def _is_done(stage_dir: Path, fingerprint: str) -> bool:
    marker = stage_dir / "done"
    return marker.is_file() and marker.read_text().strip() == fingerprint


def _source_fingerprint(recipe: Recipe, source: Artifact) -> str:
    """Everything the first stage depends on: the recipe's settings and the bytes of the files it reads."""
    parts = {
        "model": recipe.model.model_dump(mode="json"),
        # content as well as the recipe's paths: an edited data file or config recomputes even when its path
        # and time stamp stay the same
        "files": content_fingerprint(recipe, source),
        "task": recipe.task,
        "data": recipe.data.model_dump(mode="json"),
        "targets": recipe.targets,
        # A new release of the tool or of the libraries that produce the artifacts recomputes.
        "versions": [_version(d) for d in ("edge-compress", "torch", "transformers", "onnx", "onnxruntime")],
    }
    return _hash(json.dumps(parts, sort_keys=True))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return f"{dist} (not installed)"


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resolved_yaml(recipe: Recipe, folder: Path | None) -> str:
    import yaml

    body = recipe.model_dump(mode="json")
    where = f"; model folder {folder}" if folder is not None else ""
    header = f"# resolved by edge-compress: every default filled in{where}\n"
    return header + yaml.safe_dump(body, sort_keys=False)
