"""validate: task metrics, fidelity, latency, size and memory of the artifact beside its fp32 reference."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.kernels import count_kernels
from compress.latency import interleaved, peak_memory
from compress.metrics import cosine_fidelity
from compress.models import hf
from compress.recipe import ValidateStage
from compress.targets import TARGETS
from compress.tasks import TASKS


def run(artifact: Artifact, cfg: ValidateStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind != "onnx":
        raise UserError("stages: validate works on ONNX; put an export stage before it")
    positions = artifact.meta.get("max_positions")
    if isinstance(positions, int) and cfg.sequence_length > positions:
        raise UserError(
            f"stages: validate.sequence_length {cfg.sequence_length} exceeds the model's {positions} positions"
        )
    tokenizer = hf.load_tokenizer(artifact.file("tokenizer"))
    names = tuple(artifact.meta["inputs"])
    settings = artifact.meta.get("session", {})
    model, reference = artifact.file("model"), artifact.file("reference")
    data = ctx.evaluation
    task = TASKS[ctx.recipe.task]
    size = ctx.recipe.data.batch_size

    # Latency inputs: real evaluation text, truncated/padded to exactly sequence_length tokens.
    timing_texts = [data.texts[i % len(data.texts)] for i in range(cfg.batch_size)]
    timing_feeds = hf.encode(tokenizer, timing_texts, cfg.sequence_length, names, pad_to=cfg.sequence_length)

    results: dict[str, Any] = {}
    for target in ctx.recipe.targets:
        backend = TARGETS[target]
        backend.check_host()
        ctx.log(f"validating on {target}: {len(data.texts)} texts, {cfg.runs} timed runs per model")
        sessions = {
            "artifact": backend.session(model, cfg.threads, settings, spinning=False),
            "reference": backend.session(reference, cfg.threads, spinning=False),
        }
        outputs = {}
        for role, sess in sessions.items():
            chunks = [
                sess.run(None, hf.encode(tokenizer, data.texts[i : i + size], ctx.recipe.data.max_length, names))[0]
                for i in range(0, len(data.texts), size)
            ]
            outputs[role] = np.concatenate(chunks)
        with ctx.progress() as bar:
            task_id = bar.add_task(f"timing on {target} (artifact and reference in turn)", total=cfg.runs)
            latency = interleaved(
                {role: _runner(sess, timing_feeds) for role, sess in sessions.items()},
                warmup=cfg.warmup,
                runs=cfg.runs,
                items_per_run=cfg.batch_size,
                on_round=partial(bar.advance, task_id),
            )
        per_model: dict[str, Any] = {}
        for role, path in (("artifact", model), ("reference", reference)):
            role_settings = settings if role == "artifact" else {}
            per_model[role] = {
                "task": task.score(outputs[role], data),
                "latency_ms": latency[role],
                "size_bytes": path.stat().st_size,
                "memory": peak_memory(path, timing_feeds, cfg.threads, role_settings),
                "kernels": count_kernels(path, role_settings),
            }
        art, ref = per_model["artifact"], per_model["reference"]
        results[target] = {
            **per_model,
            "fidelity": cosine_fidelity(outputs["artifact"], outputs["reference"]),
            "speedup_p50": ref["latency_ms"]["p50"] / art["latency_ms"]["p50"],
            "size_ratio": art["size_bytes"] / ref["size_bytes"],
            "setup": {
                "batch_size": cfg.batch_size,
                "sequence_length": cfg.sequence_length,
                "threads": cfg.threads,
                "warmup": cfg.warmup,
                "runs": cfg.runs,
                "evaluation_set": data.name,
                "kind": "native",
                "thread_spinning": False,
            },
        }
        if art["kernels"]["int8_total"] == 0 and artifact.meta.get("precision") == "int8":
            ctx.warn(f"validate: on {target} ONNX Runtime ran the int8 artifact with no int8 kernel")
    return artifact, {"targets": results}


def _runner(sess: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: sess.run(None, feeds)
