"""A run's deployable bundle: the shipped ONNX model, its tokenizer and the metadata the server reports.

    BUNDLE/model.onnx       the last stage's model (hard-linked when it can be)
    BUNDLE/tokenizer/       tokenizer.json (WordPiece) or edge_tokenizer.json (bytes)
    BUNDLE/metadata.json    task, inputs, limits, session settings, model sha256, the resolved recipe,
                            and the validation figures of every target from report.json

The bundle is written to a temporary folder and renamed into place, so a failed package leaves the
previous bundle whole.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.data.tokenizers import MARKER
from compress.errors import UserError
from compress.serving.server import FORMAT, sha256_of

TASKS = ("embedding", "classification")


def final_stage(run_dir: Path) -> Path:
    """The run's last finished stage folder; a clear error when the run is missing or unfinished."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    stages = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit() and "_" in p.name)
    if not stages:
        raise UserError(f"{run_dir}: not a run folder (no NN_<stage> folders; run `edge-compress run RECIPE` first)")
    unfinished = [p.name for p in stages if not (p / "done").is_file()]
    if unfinished:
        raise UserError(f"{run_dir}: stage {unfinished[0]} did not finish; rerun the recipe before packaging")
    return stages[-1]


def write_bundle(run_dir: Path, out: Path, allow_unvalidated: bool = False) -> dict[str, Any]:
    """Write the bundle of `run_dir` to `out` (replacing it whole) and return its metadata."""
    run_dir = run_dir.resolve()
    last = final_stage(run_dir)
    artifact = Artifact.from_json((last / "artifact.json").read_text(), run_dir)
    if artifact.kind != "onnx":
        raise UserError(f"{run_dir}: the last stage ({last.name}) holds no ONNX model; add an export stage")
    report = _report(run_dir)
    task = report.get("task")
    if task not in TASKS:
        raise UserError(f"{run_dir}: task {task!r} cannot be served; the server answers {' and '.join(TASKS)}")
    validated = _validation(report)
    if not validated["passed"] and not allow_unvalidated:
        raise UserError(f"{run_dir}: {validated['why']}; package it anyway with --allow-unvalidated")
    tokenizer = artifact.files.get("tokenizer")
    if tokenizer is None or not tokenizer.is_dir():
        raise UserError(f"{run_dir}: the artifact carries no tokenizer folder")
    kind = _tokenizer_kind(tokenizer)
    model = artifact.file("model")
    if any(p.name.endswith(".data") for p in model.parent.iterdir()):
        raise UserError(f"{model}: models with external data files are not packaged yet")
    resolved = run_dir / "resolved_recipe.yaml"
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "name": report.get("name", run_dir.name),
        "task": task,
        "inputs": list(artifact.meta["inputs"]),
        "outputs": list(artifact.meta.get("outputs", [])),
        "max_length": _max_length(resolved, artifact),
        "tokenizer": kind,
        "labels": _labels(run_dir),
        "precision": artifact.meta.get("precision", "fp32"),
        "preset": artifact.meta.get("preset"),
        "int8_types": artifact.meta.get("int8_types"),
        "custom_ops": list(artifact.meta.get("custom_ops", [])),
        "session": artifact.meta.get("session", {}),
        "model_sha256": sha256_of(model),
        "model_bytes": model.stat().st_size,
        "validated": validated,
        "targets": _target_figures(report),
        "recipe": resolved.read_text() if resolved.is_file() else None,
        "packaged": datetime.now(UTC).isoformat(timespec="seconds"),
        "edge_compress": _version(),
    }
    out = out.resolve()
    if out == run_dir or run_dir.is_relative_to(out):
        raise UserError(f"--out {out} would replace the run folder itself")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _link_or_copy(model, tmp / "model.onnx")
        (tmp / "tokenizer").mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", MARKER):
            if (tokenizer / name).is_file():
                _link_or_copy(tokenizer / name, tmp / "tokenizer" / name)
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no report.json (the run did not finish)")
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def _validation(report: dict[str, Any]) -> dict[str, Any]:
    """Whether every target's gate passed; runs without a validate stage are not validated."""
    targets = report.get("targets") or {}
    if not targets:
        return {"passed": False, "why": "the run has no validate stage, so nothing checked the artifact", "targets": []}
    failed = [name for name, t in targets.items() if not t.get("gate", {}).get("passed", True)]
    if failed:
        return {
            "passed": False,
            "why": f"the validation gate failed on {', '.join(failed)}",
            "targets": sorted(targets),
        }
    return {"passed": True, "why": "every target's gate passed", "targets": sorted(targets)}


def _target_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Per target: the task metric, agreement with fp32, and the native latency, as the report has them."""
    figures = {}
    for name, target in (report.get("targets") or {}).items():
        artifact = target.get("artifact", {})
        figures[name] = {
            "task": artifact.get("task"),
            "agreement": target.get("agreement"),
            "consistency": target.get("consistency"),
            "latency_ms_p50": (artifact.get("latency_ms") or {}).get("p50"),
            "emulated": target.get("setup", {}).get("kind") == "emulated",
            "gate": target.get("gate"),
        }
    return figures


def _tokenizer_kind(folder: Path) -> str:
    marker = folder / MARKER
    kind = json.loads(marker.read_text()).get("kind") if marker.is_file() else "wordpiece"
    if kind == "bytes":
        return "bytes"
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder}: no tokenizer.json (only fast tokenizers can be served)")
    return "wordpiece"


def _max_length(resolved: Path, artifact: Artifact) -> int:
    """The recipe's data.max_length (what the model was evaluated at), within the model's positions."""
    import yaml

    recipe = yaml.safe_load(resolved.read_text()) if resolved.is_file() else {}
    length = int((recipe.get("data") or {}).get("max_length") or 512)
    positions = artifact.meta.get("max_positions")
    return min(length, int(positions)) if positions else length


def _labels(run_dir: Path) -> list[str] | None:
    """Class names from a Hugging Face config's id2label, when they are more than LABEL_0, LABEL_1, ..."""
    for config in sorted(run_dir.glob("*/config.json")):
        id2label = json.loads(config.read_text()).get("id2label")
        if isinstance(id2label, dict) and id2label:
            names = [str(id2label[k]) for k in sorted(id2label, key=int)]
            if any(n != f"LABEL_{i}" for i, n in enumerate(names)):
                return names
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _version() -> str:
    from importlib.metadata import version

    return version("edge-compress")
