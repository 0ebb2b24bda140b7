"""A run's deployable bundle: the shipped ONNX model, its tokenizer and the metadata the server reports.

    BUNDLE/model.onnx       a copy of the last stage's model (never a link: editing one leaves the other)
    BUNDLE/tokenizer/       tokenizer.json (WordPiece) or edge_tokenizer.json (bytes)
    BUNDLE/metadata.json    task, inputs, input_kind (text, pair or words), labels (id2label in order), limits,
                            session settings, the sha256 of every file ("files"), the resolved recipe (host
                            paths removed), and the validation figures from report.json

A validated run is packaged only if its model is the very file validate measured (same sha256). The bundle
is written to a temporary folder and renamed into place, so a failed package leaves the previous bundle
whole; --out replaces only a bundle of ours or an empty folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.data.marker import MARKER
from compress.errors import UserError
from compress.pipeline.run_dir import stage_index
from compress.report import read_report
from compress.serving.bundle_check import FORMAT, INPUT_KINDS, OLDEST, PAIRS_VERSION, TASKS, sha256_of

# An absolute path (or ~/...) after a start, a blank, a quote, "=", "(", "[", "," or a scheme such as hf: or
# file: (not //, which is a URL's host). Inside a longer text a path ends at a blank.
HOST_PATH = re.compile(r"""(^|[\s'"=(\[,]|\b[A-Za-z][\w+.-]*:)(~?/(?!/)[^\s'",)\]]+)""", re.MULTILINE)


def final_stage(run_dir: Path) -> Path:
    """The run's last finished stage folder; a clear error when the run is missing or unfinished."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    stages = _stage_folders(run_dir)
    if not stages:
        raise UserError(f"{run_dir}: not a run folder (no NN_<stage> folders; run `edge-compress run RECIPE` first)")
    unfinished = [p.name for p in stages if not (p / "done").is_file()]
    if unfinished:
        raise UserError(f"{run_dir}: stage {unfinished[0]} did not finish; rerun the recipe before packaging")
    return stages[-1]


def write_bundle(run_dir: Path, out: Path, allow_unvalidated: bool = False) -> dict[str, Any]:
    """Write the bundle of `run_dir` to `out` (replacing a bundle of ours whole) and return its metadata."""
    run_dir = run_dir.resolve()
    meta, sources = describe(run_dir, allow_unvalidated)
    write_files([run_dir], out.resolve(), sources, meta)  # adds "files": the sha256 of every file of the bundle
    return meta


RUN_TIME_RANGES = {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"}


def batch_invariant(model: Path) -> bool:
    """Whether a text's answer is the same whatever it is batched with: not when the graph computes int8
    activation ranges at run time (one range per tensor, over the whole batch: dynamic int8)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
    return not ops & RUN_TIME_RANGES


def describe(run_dir: Path, allow_unvalidated: bool = False) -> tuple[dict[str, Any], dict[str, Path]]:
    """The bundle metadata of `run_dir` (no "files" yet) and the files to copy: bundle name -> source."""
    last = final_stage(run_dir)
    artifact = Artifact.from_json((last / "artifact.json").read_text(), run_dir)
    if artifact.kind != "onnx":
        raise UserError(f"{run_dir}: the last stage ({last.name}) holds no ONNX model; add an export stage")
    report = read_report(run_dir)
    task = report.get("task")
    if task not in TASKS:
        raise UserError(f"{run_dir}: task {task!r} cannot be served; the server answers {', '.join(TASKS)}")
    input_kind = str(artifact.meta.get("input_kind", "text"))  # artifacts exported before it was recorded: text
    if input_kind not in INPUT_KINDS[task]:
        raise UserError(f"{run_dir}: the model takes {input_kind} inputs, which a {task} bundle cannot serve")
    model = artifact.file("model")
    digest = sha256_of(model)
    validated = _validation(report, run_dir, model, digest)
    if not validated["passed"] and not allow_unvalidated:
        raise UserError(f"{run_dir}: {validated['why']}; package it anyway with --allow-unvalidated")
    tokenizer = artifact.files.get("tokenizer")
    if tokenizer is None or not tokenizer.is_dir():
        raise UserError(f"{run_dir}: the artifact carries no tokenizer folder")
    kind = _tokenizer_kind(tokenizer)
    if input_kind != "text" and kind != "wordpiece":
        raise UserError(f"{tokenizer}: a model of {input_kind} inputs is served with its tokenizer.json only")
    if any(p.name.endswith(".data") for p in model.parent.iterdir()):
        raise UserError(f"{model}: models with external data files are not packaged yet")
    sources = {"model.onnx": model}
    for name in ("tokenizer.json", "tokenizer_config.json", MARKER):
        if (tokenizer / name).is_file():
            sources[f"tokenizer/{name}"] = tokenizer / name
    resolved = run_dir / "resolved_recipe.yaml"
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": OLDEST if input_kind == "text" else PAIRS_VERSION,  # the oldest server that reads it right
        "name": report.get("name", run_dir.name),
        "task": task,
        "inputs": list(artifact.meta["inputs"]),
        "outputs": list(artifact.meta.get("outputs", [])),
        "max_length": _max_length(resolved, artifact),
        "tokenizer": kind,
        "input_kind": input_kind,
        "labels": list(artifact.meta.get("labels") or ()) or _labels(run_dir),
        "precision": artifact.meta.get("precision", "fp32"),
        "batch_invariant": batch_invariant(model),
        "preset": artifact.meta.get("preset"),
        "int8_types": artifact.meta.get("int8_types"),
        "custom_ops": list(artifact.meta.get("custom_ops", [])),
        "session": artifact.meta.get("session", {}),
        "model_sha256": digest,
        "model_bytes": model.stat().st_size,
        "validated": validated,
        "targets": _target_figures(report),
        "recipe": _recipe_text(resolved),
        "packaged": datetime.now(UTC).isoformat(timespec="seconds"),
        "edge_compress": _version(),
    }
    return _without_host_paths(meta), sources


def write_files(run_dirs: list[Path], out: Path, sources: dict[str, Path], meta: dict[str, Any]) -> None:
    """Copy the files into a temporary folder beside `out`, hash the copies, then rename it into place."""
    for run_dir in run_dirs:
        _check_out(out, run_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    try:
        for name, src in sources.items():
            shutil.copyfile(src, tmp / name)  # a copy, never a hard link: the bundle and the run stay apart
        meta["files"] = {name: sha256_of(tmp / name) for name in sources}
        expected = {v["file"]: v["sha256"] for v in meta.get("variants", {}).values()} or {
            "model.onnx": meta["model_sha256"]
        }
        for name, digest in expected.items():
            if meta["files"][name] != digest:
                raise UserError(f"{sources[name]}: the file changed while it was being packaged; package again")
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_out(out: Path, run_dir: Path) -> None:
    """--out may replace a bundle edge-compress wrote, or an empty folder; nothing else of someone's."""
    if out == run_dir or run_dir.is_relative_to(out):
        raise UserError(f"--out {out} would replace the run folder itself")
    if not out.exists():
        return
    try:
        ours = out.is_dir() and (not any(out.iterdir()) or (_is_bundle(out) and not _foreign(out)))
    except OSError:
        ours = False
    if not ours:
        raise UserError(
            f"--out {out} exists and is not an edge-compress bundle (or holds files of yours besides one); "
            "choose another folder or remove it yourself"
        )


def _stage_folders(run_dir: Path) -> list[Path]:
    """The run's stage folders in order: only names edge-compress writes (NN_<stage type>), never a user's."""
    return sorted(
        p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and stage_index(p.name) is not None
    )


def _foreign(bundle: Path) -> list[str]:
    """Files in a bundle folder that the bundle does not list (a user's): replacing the folder would lose them."""
    try:
        listed = set(json.loads((bundle / "metadata.json").read_bytes()).get("files", {})) | {"metadata.json"}
    except (OSError, ValueError, AttributeError):
        return ["metadata.json"]
    found = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() or p.is_symlink()}
    return sorted(found - listed)


def _is_bundle(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "metadata.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _validation(report: dict[str, Any], run_dir: Path, model: Path, digest: str) -> dict[str, Any]:
    """Whether every target's gate passed on this very model file; runs without a validate stage are not validated.

    A model whose sha256 is not the one validate measured is refused outright: it is not the file validated.
    """
    targets = report.get("targets") or {}
    if not targets:
        return {"passed": False, "why": "the run has no validate stage, so nothing checked the artifact", "targets": []}
    names = sorted(targets)
    path = str(model.resolve().relative_to(run_dir)) if model.resolve().is_relative_to(run_dir) else str(model)
    measured = _validated_model(report, path)
    if measured is None:
        why = "report.json records no sha256 of the model validate measured (rerun the recipe)"
        return {"passed": False, "why": why, "targets": names}
    if measured.get("path") not in {None, path}:
        why = f"validate measured {measured['path']}, not the last stage's {path}"
        return {"passed": False, "why": why, "targets": names}
    if measured["sha256"] != digest:
        raise UserError(
            f"{model}: sha256 {digest[:12]} is not the {measured['sha256'][:12]} validate measured: the file changed "
            "after the run and was not validated; rerun the recipe (edge-compress run RECIPE --fresh)"
        )
    failed = [name for name, t in targets.items() if not t.get("gate", {}).get("passed", True)]
    if failed:
        return {"passed": False, "why": f"the validation gate failed on {', '.join(failed)}", "targets": names}
    return {"passed": True, "why": "every target's gate passed", "targets": names, "sha256": digest}


def _validated_model(report: dict[str, Any], path: str) -> dict[str, Any] | None:
    """{"path", "sha256"} of the model validate measured: its stage's metrics, else the report's hash of the file."""
    for stage in report.get("stages") or []:
        measured = (stage.get("metrics") or {}).get("model") if stage.get("type") == "validate" else None
        if isinstance(measured, dict) and isinstance(measured.get("sha256"), str):
            return measured
    older = ((report.get("provenance") or {}).get("artifact_sha256") or {}).get(path)  # runs before the metric
    return {"path": None, "sha256": older} if isinstance(older, str) else None


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
    return artifact.usable_length(length)


def _labels(run_dir: Path) -> list[str] | None:
    """Artifacts exported before they recorded labels: class names from a Hugging Face config's id2label in a
    stage folder, when they are more than LABEL_0, LABEL_1, ..."""
    for config in (stage / "config.json" for stage in _stage_folders(run_dir)):
        try:
            id2label = json.loads(config.read_text()).get("id2label") if config.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(id2label, dict) and id2label:
            names = [str(id2label[k]) for k in sorted(id2label, key=int)]
            if any(n != f"LABEL_{i}" for i, n in enumerate(names)):
                return names
    return None


def _recipe_text(resolved: Path) -> str | None:
    """The resolved recipe with no host path: each path value cut to <path>/NAME, the header comment replaced."""
    import yaml

    if not resolved.is_file():
        return None
    body = yaml.safe_dump(_without_host_paths(yaml.safe_load(resolved.read_text())), sort_keys=False)
    return "# resolved by edge-compress: every default filled in (host paths cut to <path>/NAME)\n" + body


def _without_host_paths(value: Any) -> Any:
    """Every string with each absolute path in it cut to <path>/NAME: the served /metadata shows no host layout."""
    if isinstance(value, dict):
        return {k: _without_host_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_host_paths(v) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith(("/", "~/")) and not value.startswith("//"):  # a whole path, blanks and all
        return f"<path>/{Path(value).name}".rstrip("/")
    return HOST_PATH.sub(lambda m: f"{m[1]}<path>/{Path(m[2]).name}".rstrip("/"), value)


def _version() -> str:
    from importlib.metadata import version

    return version("edge-compress")
