"""Graph choices that depend on the CPU, measured on the CPU that builds the artifact.

ONNX Runtime's fused SkipLayerNormalization and BiasGelu are not faster everywhere (exporters/unfuse.py
gives a case where the fused node took twice the time of its parts). The quantized model is timed fused
and with each split (and all of them), interleaved, with the validate stage's kind of input. A variant
that is further from the fp32 reference than the fused graph is refused (the splits compute the same sums,
but int8 rounding is not continuous: dynamic ranges move, so a split int8 graph is compared with fp32,
not with the fused int8 graph: measured on MiniLM, both 0.9935 from fp32, 0.9991 from each other), and the
fastest of the rest is kept only when it beats the fused graph by more than the noise margin. Every
timing goes into the report.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.runtime import feeds
from compress.runtime.latency import interleaved
from compress.runtime.session import session
from compress.stages.quantize.config import GraphTuning
from compress.targets.native import cpu_model
from compress.tasks.metrics import cosine_fidelity
from exporters import unfuse

FUSED = "fused"
# A split is kept only when its median is this much below the fused graph's: below it, the difference is noise.
MARGIN = 0.03
# A variant's mean cosine to the fp32 reference may fall at most this much below the fused graph's.
FIDELITY_SLACK = 0.001
CHECK_EXAMPLES = 8


def tune(
    model: Path, settings: dict[str, Any], artifact: Artifact, cfg: GraphTuning, ctx: Context
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time the variants of `model`, replace it with the fastest that keeps its outputs; returns the session
    settings that keep the chosen graph as it is, and the report."""
    import onnx

    base = onnx.load(str(model))
    splits = tuple(name for name in cfg.splits if unfuse.applicable(base, name))
    report: dict[str, Any] = {"cpu": cpu_model(), "threads": cfg.threads, "batch_size": cfg.batch_size}
    if not splits:
        return settings, {**report, "chosen": FUSED, "why": "no fused node this tuning can split", "variants": {}}
    work = ctx.out_dir / "tuning"
    work.mkdir(exist_ok=True)
    try:
        candidates = _write_variants(model, base, splits, settings, work)
        inputs = _inputs(artifact, cfg, ctx)
        report["sequence_length"] = int(inputs["input_ids"].shape[1])
        chosen, variants = _measure(candidates, inputs, _checks(artifact, ctx), cfg)
        ctx.log(
            "graph tuning on this CPU: "
            + ", ".join(f"{name} {v['p50_ms']:.2f} ms" for name, v in variants.items() if "p50_ms" in v)
            + f"; kept {chosen}"
        )
        if chosen != FUSED:
            candidates[chosen][0].replace(model)
        return candidates[chosen][1], {**report, "chosen": chosen, "variants": variants}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_variants(
    model: Path, base: Any, splits: tuple[str, ...], settings: dict[str, Any], work: Path
) -> dict[str, tuple[Path, dict[str, Any], dict[str, int]]]:
    """name -> (graph file, its session settings, nodes split): fused, each split alone, and all of them."""
    import onnx

    combos = [(name,) for name in splits] + ([splits] if len(splits) > 1 else [])
    variants: dict[str, tuple[Path, dict[str, Any], dict[str, int]]] = {FUSED: (model, settings, {})}
    for combo in combos:
        graph = onnx.ModelProto()
        graph.CopyFrom(base)
        counts = unfuse.split(graph, combo)
        path = work / f"{'+'.join(combo)}.onnx"
        onnx.save(graph, str(path))
        disabled = list(settings.get("disabled_optimizers", [])) + unfuse.disabled_optimizers(combo)
        variants["split " + "+".join(combo)] = (path, {**settings, "disabled_optimizers": disabled}, counts)
    return variants


def _inputs(artifact: Artifact, cfg: GraphTuning, ctx: Context) -> dict[str, np.ndarray]:
    """cfg.batch_size evaluation examples padded (or cut) to exactly cfg.sequence_length tokens."""
    examples = feeds.evaluation_texts(ctx)
    batch = [examples[i % len(examples)] for i in range(cfg.batch_size)]
    length = artifact.usable_length(cfg.sequence_length)
    return feeds.encoder(artifact)(batch, length, length)


def _checks(artifact: Artifact, ctx: Context) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """A few evaluation examples, one at a time as deployed, with the fp32 reference's outputs for them."""
    encode = feeds.encoder(artifact)
    length = artifact.usable_length(ctx.data.max_length)
    reference = session(artifact.file("reference"), threads=2)
    names = {i.name for i in reference.get_inputs()}
    checks = []
    for example in feeds.evaluation_texts(ctx)[:CHECK_EXAMPLES]:
        inputs = encode([example], length, None)
        checks.append((inputs, reference.run(None, {k: v for k, v in inputs.items() if k in names})[0]))
    return checks


def _fidelity(s: Any, checks: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> float:
    names = {i.name for i in s.get_inputs()}
    return float(
        np.mean(
            [
                cosine_fidelity(s.run(None, {k: v for k, v in x.items() if k in names})[0], ref)["cosine_min"]
                for x, ref in checks
            ]
        )
    )


def _measure(
    candidates: dict[str, tuple[Path, dict[str, Any], dict[str, int]]],
    inputs: dict[str, np.ndarray],
    checks: list[tuple[dict[str, np.ndarray], np.ndarray]],
    cfg: GraphTuning,
) -> tuple[str, dict[str, Any]]:
    sessions = {
        name: session(path, threads=cfg.threads, settings=settings, idle_spinning=False)
        for name, (path, settings, _) in candidates.items()
    }
    feed = {
        name: {k: v for k, v in inputs.items() if k in {i.name for i in s.get_inputs()}} for name, s in sessions.items()
    }
    floor = _fidelity(sessions[FUSED], checks) - FIDELITY_SLACK
    report: dict[str, Any] = {}
    timed: dict[str, Callable[[], object]] = {}
    for name, s in sessions.items():
        fidelity = _fidelity(s, checks)
        report[name] = {"split_nodes": candidates[name][2], "cosine_to_fp32": round(fidelity, 6)}
        if fidelity >= floor:
            timed[name] = partial(s.run, None, feed[name])
        else:
            report[name]["refused"] = (
                f"mean cosine to fp32 {fidelity:.6f} is below the fused graph's less {FIDELITY_SLACK} ({floor:.6f})"
            )
    stats = interleaved(timed, warmup=3, runs=cfg.runs)
    for name, st in stats.items():
        report[name]["p50_ms"] = round(st["p50"], 3)
        report[name]["p90_ms"] = round(st["p90"], 3)
        report[name]["speedup_vs_fused"] = round(stats[FUSED]["p50"] / st["p50"], 3)
    return pick({name: st["p50"] for name, st in stats.items()}), report


def pick(medians: dict[str, float]) -> str:
    """The variant to keep: the fastest, when it beats the fused graph by more than MARGIN; else the fused one."""
    best = min(medians, key=lambda n: medians[n])
    return best if medians[best] < medians[FUSED] * (1 - MARGIN) else FUSED
