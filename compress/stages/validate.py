"""validate: task metrics, fidelity, latency, size and memory of the artifact beside its fp32 reference."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from compress import feeds
from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.kernels import count_kernels
from compress.latency import interleaved, peak_memory
from compress.metrics import cosine_fidelity
from compress.recipe import ValidateStage
from compress.targets import TARGETS
from compress.tasks import TASKS, classification


def run(artifact: Artifact, cfg: ValidateStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind != "onnx":
        raise UserError("stages: validate works on ONNX; put an export stage before it")
    positions = artifact.meta.get("max_positions")
    if isinstance(positions, int) and cfg.sequence_length > positions:
        raise UserError(
            f"stages: validate.sequence_length {cfg.sequence_length} exceeds the model's {positions} positions"
        )
    encode = feeds.encoder(artifact)
    settings = artifact.meta.get("session", {})
    model, reference = artifact.file("model"), artifact.file("reference")
    texts = feeds.evaluation_texts(ctx)
    scorer, data_name = _scorer(ctx)
    size = ctx.recipe.data.batch_size
    max_length = (
        min(ctx.recipe.data.max_length, positions) if isinstance(positions, int) else ctx.recipe.data.max_length
    )

    # Latency inputs: real evaluation text, truncated/padded to exactly sequence_length tokens.
    timing_texts = [texts[i % len(texts)] for i in range(cfg.batch_size)]
    timing_feeds = encode(timing_texts, cfg.sequence_length, cfg.sequence_length)

    results: dict[str, Any] = {}
    for target in ctx.recipe.targets:
        backend = TARGETS[target]
        backend.check_host()
        ctx.log(f"validating on {target}: {len(texts)} texts, {cfg.runs} timed runs per model")
        sessions = {
            "artifact": backend.session(model, cfg.threads, settings, spinning=False),
            "reference": backend.session(reference, cfg.threads, spinning=False),
        }
        outputs = {}
        for role, sess in sessions.items():
            chunks = [
                sess.run(None, encode(texts[i : i + size], max_length, None))[0] for i in range(0, len(texts), size)
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
                "task": scorer(outputs[role]),
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
                "evaluation_set": data_name,
                "kind": "native",
                "thread_spinning": False,
            },
        }
        ops = artifact.meta.get("custom_ops") or []
        if ops:  # which implementation of our attention ops these figures measured
            from exporters import native

            ran = "native" if native.available() else "function body"
            results[target]["setup"]["custom_op_kernel"] = ran
            if ran != "native":
                ctx.warn(
                    f"validate: on {target} the attention ops ({', '.join(ops)}) ran as their ONNX function "
                    "bodies (no native kernel library for this machine: edge-compress build-ops); the latency "
                    "is the portable path's"
                )
        if art["kernels"]["int8_total"] == 0 and artifact.meta.get("precision") == "int8":
            ctx.warn(f"validate: on {target} ONNX Runtime ran the int8 artifact with no int8 kernel")
    return artifact, {"targets": results}


def _scorer(ctx: Context) -> tuple[Callable[[np.ndarray], dict[str, Any]], str]:
    """The task's metrics on the model's outputs for the evaluation set, and the set's name."""
    if ctx.recipe.task == "classification":
        labeled = ctx.labeled("evaluation")
        labels = np.asarray(labeled.labels)
        return (lambda logits: classification.score(logits, labels)), labeled.name
    pairs = ctx.evaluation
    return (lambda embeddings: TASKS["embedding"].score(embeddings, pairs)), pairs.name


def _runner(sess: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: sess.run(None, feeds)
