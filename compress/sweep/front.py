"""The front: every level's final artifact and the teacher's fp32 export, scored and timed in one pass.

Each evaluation example goes through every model in turn (batch 1, the example's own length up to
data.max_length; the model first in line rotates per example), so the machine's drift hits all alike.
The same outputs give the task metric; latency is the median of the per-example times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.runtime import feeds
from compress.runtime.evaluation import pad_outputs, task_scoring
from compress.runtime.latency import round_robin, summarize
from compress.runtime.session import session


@dataclass(frozen=True)
class Entry:
    """A model on the front: its label, its run folder and the final ONNX artifact in it."""

    label: str
    run_dir: Path
    artifact: Artifact


def final_onnx(run_dir: Path, source: Path | None) -> Artifact:
    """The last ONNX artifact a finished run wrote (quantize's, qat's, or export's)."""
    found = None
    for stage_dir in sorted(p for p in run_dir.glob("[0-9][0-9]_*") if (p / "done").is_file()):
        artifact = Artifact.from_json((stage_dir / "artifact.json").read_text(), run_dir, source)
        if artifact.kind == "onnx":
            found = artifact
    if found is None:
        raise UserError(f"sweep: {run_dir} has no finished ONNX artifact")
    return found


def measure(entries: list[Entry], ctx: Context, limit: int | None, warmup: int, threads: int) -> list[dict[str, Any]]:
    """One row per entry: the task metric on data.evaluation, latency, size, parameters, in entry order."""
    examples = ctx.examples("evaluation")[:limit]
    calls, inputs, scorings = {}, {}, {}
    for e in entries:
        max_length = e.artifact.usable_length(ctx.data.max_length)
        encode = feeds.encoder(e.artifact)
        inputs[e.label] = [encode([ex], max_length, None) for ex in examples]
        sess = session(e.artifact.file("model"), threads, e.artifact.meta.get("session"), idle_spinning=False)
        calls[e.label] = _runner(sess)
        scorings[e.label] = task_scoring(ctx, e.artifact, max_length)
    ctx.log(f"sweep: {len(examples)} examples x {len(entries)} models, round-robin, {threads} threads")
    ms, outputs = round_robin(calls, inputs, warmup)
    rows = []
    for e in entries:
        scoring = scorings[e.label]
        task = scoring.score(pad_outputs(outputs[e.label]), len(examples))
        if not isinstance(task.get(scoring.metric), float | int):
            raise UserError(f"sweep.examples: {len(examples)} examples of data.evaluation give no {scoring.metric}")
        rows.append(
            {
                "label": e.label,
                "run": str(e.run_dir),
                "model": str(e.artifact.file("model")),
                "metric": scoring.metric,
                "value": task.get(scoring.metric),
                "ci95": task.get(f"{scoring.metric}_ci95"),
                "task": task,
                "examples": len(examples),
                "latency_ms": summarize(ms[e.label]),
                "size_bytes": _size(e.artifact.file("model")),
                "parameters": _parameters(e.run_dir),
                "precision": e.artifact.meta.get("precision"),
            }
        )
    return rows


def _runner(sess: Any) -> Any:
    def call(feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(sess.run(None, feed)[0])

    return call


def _size(model: Path) -> int:
    return sum(p.stat().st_size for p in (model, Path(f"{model}.data")) if p.is_file())


def _parameters(run_dir: Path) -> int | None:
    """The PyTorch model's parameter count after the last stage that trained or pruned it (None: unchanged)."""
    found = None
    for metrics in sorted(run_dir.glob("[0-9][0-9]_*/metrics.json")):
        value = json.loads(metrics.read_text()).get("parameters")
        if isinstance(value, int):
            found = value
    return found
