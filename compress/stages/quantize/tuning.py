"""Graph choices that depend on the CPU, measured on the CPU that builds the artifact.

Three rounds, each timed interleaved with the validate stage's kind of input:
1. The int8 types and format the preset leaves open (int8_choices): u8s8 against u8u8 weights, full range
   against reduce_range (7-bit weights), and for static int8 QDQ against QOperator. The same nodes are
   quantized again in each; a choice the recipe fixed itself is not varied, and every candidate is one that
   cannot saturate on the preset's CPU family (u8u8 and 7-bit weights never do). Timings only transfer
   within a CPU family, so this round runs only when this CPU is of the preset's family.
2. Fused or split SkipLayerNormalization / BiasGelu, on the graph the first round kept.
3. Reported only: the kept graph with 1, 2, 4 ... tune.threads threads (the deployment sets the count).

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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.runtime import feeds
from compress.runtime.latency import interleaved
from compress.runtime.session import session
from compress.serving.bundle_check import host_family
from compress.stages.quantize.config import GraphTuning
from compress.targets.native import cpu_model
from compress.tasks.metrics import cosine_fidelity
from exporters import unfuse

FUSED = "fused"
# A variant is kept only when its median is this much below the baseline's: below it, the difference is noise.
MARGIN = 0.03
# A variant's mean cosine to the fp32 reference may fall at most this much below the baseline's.
FIDELITY_SLACK = 0.001
CHECK_EXAMPLES = 8
# The int8 type fields a recipe may fix itself (quantize.weight_type, reduce_range); tuning varies the others.
TYPE_FIELDS = ("weight_type", "reduce_range")

Candidates = dict[str, tuple[Path, dict[str, Any], dict[str, Any]]]  # name -> (graph, session settings, details)


@dataclass(frozen=True)
class Requantize:
    """How the stage quantizes the same nodes again in other types: write(types, format, path) writes the
    graph and returns its session settings."""

    write: Callable[[dict[str, Any], str, Path], dict[str, Any]]
    types: dict[str, Any]  # as quantized: activation_type, weight_type, reduce_range
    format: str  # "dynamic", "QDQ" or "QOperator"
    fixed: tuple[str, ...]  # TYPE_FIELDS the recipe set itself
    family: str  # the preset's CPU family


def tune(
    model: Path, settings: dict[str, Any], artifact: Artifact, cfg: GraphTuning, ctx: Context, *, requantize: Requantize
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Time the variants of `model`, replace it with the fastest that keeps its outputs; returns the session
    settings that keep the chosen graph as it is, the report, and the int8 types and format of the graph kept."""
    work = ctx.out_dir / "tuning"
    work.mkdir(exist_ok=True)
    report: dict[str, Any] = {"cpu": cpu_model(), "threads": cfg.threads, "batch_size": cfg.batch_size}
    try:
        inputs = _inputs(artifact, cfg, ctx)
        report["sequence_length"] = int(inputs["input_ids"].shape[1])
        checks = _checks(artifact, ctx)
        if cfg.int8:
            settings, kept, report["int8"] = _tune_int8(model, settings, requantize, (inputs, checks), cfg=cfg, ctx=ctx)
        else:
            kept = {**requantize.types, "format": requantize.format}
            report["int8"] = {"chosen": label(requantize.types, requantize.format), "why": "tune.int8 is false"}
        settings, splits = _tune_splits(model, settings, (inputs, checks), cfg, ctx)
        report["thread_scaling"] = _thread_scaling(model, settings, inputs, cfg, ctx)
        return settings, {**report, **splits}, kept
    finally:
        shutil.rmtree(work, ignore_errors=True)


def label(types: dict[str, Any], fmt: str) -> str:
    """A variant's name: activation and weight types (u8s8...), 7-bit weights, and the static format."""
    short = {"uint8": "u8", "int8": "s8"}
    name = short[types["activation_type"]] + short[types["weight_type"]]
    name += " reduce_range" if types["reduce_range"] else ""
    return name + (f" {fmt}" if fmt != "dynamic" else "")


def int8_choices(types: dict[str, Any], fmt: str, fixed: tuple[str, ...]) -> dict[str, tuple[dict[str, Any], str]]:
    """The quantized graph's own types first, then the alternatives the recipe left open: u8u8 weights
    (full range: u8u8 kernels widen to int16 before multiplying, nothing saturates), 7-bit weights, and
    for static QDQ the QOperator format."""
    choices = {label(types, fmt): (types, fmt)}
    if "weight_type" not in fixed and types["weight_type"] == "int8" and types["activation_type"] == "uint8":
        u8u8 = {**types, "weight_type": "uint8"}
        if "reduce_range" not in fixed:
            u8u8["reduce_range"] = False
        choices[label(u8u8, fmt)] = (u8u8, fmt)
    if "reduce_range" not in fixed and not types["reduce_range"]:
        seven = {**types, "reduce_range": True}
        choices[label(seven, fmt)] = (seven, fmt)
    if fmt == "QDQ":
        choices[label(types, "QOperator")] = (types, "QOperator")
    return choices


def _tune_int8(
    model: Path,
    settings: dict[str, Any],
    rq: Requantize,
    data: tuple[dict[str, np.ndarray], list[tuple[dict[str, np.ndarray], np.ndarray]]],
    *,
    cfg: GraphTuning,
    ctx: Context,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Round 1: the int8 types and format. Returns the settings, types and report of the graph kept."""
    choices = int8_choices(rq.types, rq.format, rq.fixed)
    base = next(iter(choices))
    kept = {**rq.types, "format": rq.format}
    family, evidence = host_family()
    why = None
    if family != rq.family:
        why = f"the artifact is for {rq.family} CPUs, this one is {family} ({evidence}): its timings would not transfer"
    elif len(choices) == 1:
        why = "the recipe fixes the int8 types (quantize.preset named, or weight_type and reduce_range set)"
    if why:
        ctx.log(f"int8 types not tuned: {why}")
        return settings, kept, {"chosen": base, "why": why, "variants": {}}
    candidates: Candidates = {base: (model, settings, {"types": rq.types, "format": rq.format})}
    failed: dict[str, Any] = {}
    for i, (name, (types, fmt)) in enumerate(list(choices.items())[1:]):
        path = ctx.out_dir / "tuning" / f"int8-{i}.onnx"
        try:
            candidates[name] = (path, rq.write(types, fmt, path), {"types": types, "format": fmt})
        except Exception as exc:  # ONNX Runtime's quantizer raises bare exceptions for what it cannot write
            ctx.warn(f"quantize: tuning: {name} could not be written ({str(exc).splitlines()[0][:200]})")
            failed[name] = {"types": types, "format": fmt, "refused": f"quantizer failed: {exc}"[:300]}
    chosen, variants = _measure(candidates, data, cfg, baseline=base)
    _log_round(ctx, "int8 types", variants, chosen)
    if chosen != base:
        candidates[chosen][0].replace(model)
        settings, details = candidates[chosen][1], candidates[chosen][2]
        kept = {**details["types"], "format": details["format"]}
    return settings, kept, {"baseline": base, "chosen": chosen, "variants": {**variants, **failed}}


def _tune_splits(
    model: Path,
    settings: dict[str, Any],
    data: tuple[dict[str, np.ndarray], list[tuple[dict[str, np.ndarray], np.ndarray]]],
    cfg: GraphTuning,
    ctx: Context,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Round 2: fused or split SkipLayerNormalization / BiasGelu on the graph round 1 kept."""
    import onnx

    base = onnx.load(str(model))
    splits = tuple(name for name in cfg.splits if unfuse.applicable(base, name))
    if not splits:
        return settings, {"chosen": FUSED, "why": "no fused node this tuning can split", "variants": {}}
    candidates = _write_variants(model, base, splits, settings, ctx.out_dir / "tuning")
    chosen, variants = _measure(candidates, data, cfg, baseline=FUSED)
    _log_round(ctx, "graph", variants, chosen)
    if chosen != FUSED:
        candidates[chosen][0].replace(model)
    return candidates[chosen][1], {"baseline": FUSED, "chosen": chosen, "variants": variants}


def thread_counts(threads: int) -> list[int]:
    """1, 2, 4, ... below `threads`, and `threads`."""
    counts = [1 << i for i in range(threads.bit_length()) if 1 << i < threads]
    return [*counts, threads]


def _thread_scaling(
    model: Path, settings: dict[str, Any], inputs: dict[str, np.ndarray], cfg: GraphTuning, ctx: Context
) -> dict[str, Any]:
    """Round 3, reported only: the kept graph timed with 1, 2, 4 ... tune.threads intra-op threads. The thread
    count is the deployment's (the server's --threads, all cores by default): the CPU that builds may have
    fewer cores than the one that serves, so nothing is fixed from this."""
    if cfg.threads == 1:
        return {"why": "tune.threads is 1"}
    sessions = {
        n: session(model, threads=n, settings=settings, idle_spinning=False) for n in thread_counts(cfg.threads)
    }
    names = {i.name for i in sessions[cfg.threads].get_inputs()}
    feed = {k: v for k, v in inputs.items() if k in names}
    stats = interleaved({str(n): partial(s.run, None, feed) for n, s in sessions.items()}, warmup=3, runs=cfg.runs)
    medians = {n: round(st["p50"], 3) for n, st in stats.items()}
    ctx.log("threads on this CPU: " + ", ".join(f"{n}: {ms:.2f} ms" for n, ms in medians.items()))
    return {"p50_ms": medians, "fastest": min(medians, key=lambda n: medians[n])}


def _log_round(ctx: Context, what: str, variants: dict[str, Any], chosen: str) -> None:
    ctx.log(
        f"{what} tuned on this CPU: "
        + ", ".join(f"{name} {v['p50_ms']:.2f} ms" for name, v in variants.items() if "p50_ms" in v)
        + f"; kept {chosen}"
    )


def _write_variants(
    model: Path, base: Any, splits: tuple[str, ...], settings: dict[str, Any], work: Path
) -> Candidates:
    """name -> (graph file, its session settings, nodes split): fused, each split alone, and all of them."""
    import onnx

    combos = [(name,) for name in splits] + ([splits] if len(splits) > 1 else [])
    variants: Candidates = {FUSED: (model, settings, {"split_nodes": {}})}
    for combo in combos:
        graph = onnx.ModelProto()
        graph.CopyFrom(base)
        counts = unfuse.split(graph, combo)
        path = work / f"{'+'.join(combo)}.onnx"
        onnx.save(graph, str(path))
        disabled = list(settings.get("disabled_optimizers", [])) + unfuse.disabled_optimizers(combo)
        variants["split " + "+".join(combo)] = (
            path,
            {**settings, "disabled_optimizers": disabled},
            {"split_nodes": counts},
        )
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
    candidates: Candidates,
    data: tuple[dict[str, np.ndarray], list[tuple[dict[str, np.ndarray], np.ndarray]]],
    cfg: GraphTuning,
    baseline: str,
) -> tuple[str, dict[str, Any]]:
    """Time every candidate whose outputs are as close to fp32 as the baseline's (interleaved); returns the
    one to keep and the report of each."""
    inputs, checks = data
    sessions = {
        name: session(path, threads=cfg.threads, settings=settings, idle_spinning=False)
        for name, (path, settings, _) in candidates.items()
    }
    feed = {
        name: {k: v for k, v in inputs.items() if k in {i.name for i in s.get_inputs()}} for name, s in sessions.items()
    }
    floor = _fidelity(sessions[baseline], checks) - FIDELITY_SLACK
    report: dict[str, Any] = {}
    timed: dict[str, Callable[[], object]] = {}
    for name, s in sessions.items():
        fidelity = _fidelity(s, checks)
        report[name] = {**candidates[name][2], "cosine_to_fp32": round(fidelity, 6)}
        if fidelity >= floor:
            timed[name] = partial(s.run, None, feed[name])
        else:
            report[name]["refused"] = (
                f"mean cosine to fp32 {fidelity:.6f} is below {baseline}'s less {FIDELITY_SLACK} ({floor:.6f})"
            )
    stats = interleaved(timed, warmup=3, runs=cfg.runs)
    for name, st in stats.items():
        report[name]["p50_ms"] = round(st["p50"], 3)
        report[name]["p90_ms"] = round(st["p90"], 3)
        report[name]["speedup_vs_baseline"] = round(stats[baseline]["p50"] / st["p50"], 3)
    return pick({name: st["p50"] for name, st in stats.items()}, baseline), report


def pick(medians: dict[str, float], baseline: str = FUSED) -> str:
    """The variant to keep: the fastest, when it beats the baseline by more than MARGIN; else the baseline."""
    best = min(medians, key=lambda n: medians[n])
    return best if medians[best] < medians[baseline] * (1 - MARGIN) else baseline
