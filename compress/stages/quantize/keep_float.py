"""Which nodes stay in float: ranked once by the one-pass sensitivity, then chosen by a policy.

keep_sensitive: auto   as few of the top-ranked as keep the fidelity floor (cosine to fp32 on the sensitivity
                       texts), predicted from the sensitivities and refined by trials (search.py)
keep_sensitive: N      the N top-ranked
keep_sensitive: none   none (every candidate in int8, no ranking)
goal                   as few of the top-ranked as bring the goal metric on data.evaluation within max_drop

The report names the nodes kept in float with their sensitivity, and what keeping them costs in speed: the
all-int8 model and the chosen one timed interleaved on one text of 128 tokens, batch 1, 2 threads.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import StageFailed, UserError
from compress.runtime import feeds
from compress.runtime.evaluation import pad_outputs, task_scoring
from compress.runtime.latency import interleaved
from compress.runtime.session import session
from compress.stages.quantize import search as quantize_search
from compress.stages.quantize import sensitivity
from compress.stages.quantize.config import QuantizeStage

SPEED_TOKENS, SPEED_ROUNDS = 128, 20
MEASURE = "root mean over output channels of the int8 output's noise-to-signal power, each channel capped at 1"


@dataclass(frozen=True)
class Plan:
    """What the stage hands in: how to quantize with some nodes in float, and how the result is run."""

    quantize: quantize_search.Quantizer
    candidates: list[str]
    excluded: list[str]
    spec: sensitivity.Int8Spec
    settings: dict[str, Any]  # the artifact's ONNX Runtime session settings
    out: Path

    def speed_feed(self, artifact: Artifact, ctx: Context, text: Any) -> dict[str, np.ndarray]:
        """One text padded to SPEED_TOKENS (or the model's usable length), batch 1."""
        tokens = min(SPEED_TOKENS, artifact.usable_length(ctx.data.max_length))
        return feeds.encoder(artifact)([text], tokens, tokens)


def apply(
    artifact: Artifact, cfg: QuantizeStage, ctx: Context, plan: Plan
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Write plan.out with cfg's nodes in float; returns (the kept_in_float report, the goal search report)."""
    if cfg.keep_sensitive == "none" and cfg.goal is None:
        plan.quantize(plan.excluded, plan.out)
        return None, None
    work = ctx.out_dir / "search"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    texts, source = sensitivity_texts(ctx, cfg.sensitivity_samples)
    batches = _one_text_batches(artifact, ctx, texts)
    ctx.log(f"sensitivity: {len(plan.candidates)} candidate nodes on {len(texts)} texts of {source}")
    measured = sensitivity.measure(artifact.file("model"), plan.candidates, batches, plan.spec, work)
    ranked = [s.node for s in measured.ranking]
    scores = {s.node: s for s in measured.ranking}
    ctx.log(f"sensitivity measured in {measured.seconds:.1f} s; most sensitive: {_top(measured.ranking)}")
    report: dict[str, Any] = {
        "sensitivity": {
            "texts": measured.texts,
            "from": source,
            "seconds": round(measured.seconds, 2),
            "measure": MEASURE,
            "ranking": [s.to_dict() for s in measured.ranking],
        }
    }
    goal_report = None
    if cfg.goal is not None:
        result = _goal(artifact, cfg, ctx, plan, ranking=measured.ranking, work=work, started=started)
        goal_report, kept, by = result.to_dict(), result.trials[result.chosen or 0].in_float, "goal"
        evaluations = len(result.trials) + 1  # and the fp32 model's
    elif cfg.keep_sensitive == "auto":
        result = _floor(cfg, ctx, plan, ranked=ranked, measured=measured, batches=batches, work=work, started=started)
        report["search"] = result.to_dict()
        kept, by, evaluations = result.trials[result.chosen or 0].in_float, "auto", len(result.trials)
    else:
        kept, by, evaluations = _fixed(cfg, plan, ranked, work), f"the {cfg.keep_sensitive} most sensitive", 0
    report["kept_in_float"] = {
        "by": by,
        "nodes": [{**scores[n].to_dict(), "rank": ranked.index(n) + 1} for n in kept],
        "of_candidates": len(ranked),
        "evaluations": evaluations,
        "seconds": round(time.perf_counter() - started, 2),
        "speed_cost": _speed_cost(work / "full.onnx", plan, plan.speed_feed(artifact, ctx, texts[0]), kept),
    }
    _warn_if_many(ctx, cfg, kept, ranked)
    if cfg.goal is None:
        shutil.rmtree(work)
    else:
        _keep_only_log(work)
    return report, goal_report


def _top(ranking: Sequence[sensitivity.NodeScore], n: int = 3) -> str:
    return ", ".join(f"{s.node} ({s.score:.3f})" for s in ranking[:n] if s.score is not None) or "none measured"


def sensitivity_texts(ctx: Context, samples: int) -> tuple[list[Any], str]:
    """The first `samples` calibration examples (texts, pairs or words), or evaluation ones without a
    calibration set."""
    if ctx.data.calibration is not None:
        return list(ctx.calibration_examples[:samples]), "data.calibration"
    return list(feeds.evaluation_texts(ctx)[:samples]), "data.evaluation"


def _one_text_batches(artifact: Artifact, ctx: Context, texts: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """One text per batch, unpadded (batch 1, as deployed: dynamic ranges are per run)."""
    if not texts:
        raise UserError("quantize: no text to measure node sensitivity on (data.calibration / data.evaluation)")
    encode = feeds.encoder(artifact)
    length = artifact.usable_length(ctx.data.max_length)
    return [encode([text], length, None) for text in texts]


def _floor(
    cfg: QuantizeStage,
    ctx: Context,
    plan: Plan,
    *,
    ranked: list[str],
    measured: sensitivity.Sensitivity,
    batches: list[dict[str, np.ndarray]],
    work: Path,
    started: float,
) -> quantize_search.SearchResult:
    """keep_sensitive: auto: the fewest top-ranked nodes in float that keep the cosine floor."""
    score = quantize_search.cosine_metric(measured.outputs)

    def evaluate(model: Path) -> float:
        sess = session(model, threads=2, settings=plan.settings)
        return score([sess.run(None, b)[0] for b in batches])

    target = quantize_search.Target(
        "cosine to fp32 (sensitivity texts)", 1.0, 1.0 - cfg.fidelity_floor, "quantize.fidelity_floor"
    )
    try:
        return quantize_search.search(
            ranking=ranked,
            scores=[s.score for s in measured.ranking],
            fixed_float=plan.excluded,
            quantize=plan.quantize,
            evaluate=evaluate,
            target=target,
            budget_s=cfg.time_budget,
            work_dir=work,
            out=plan.out,
            log=ctx.log,
            started=started,
        )
    except StageFailed as exc:
        raise StageFailed(f"{exc}; lower quantize.fidelity_floor or raise quantize.time_budget") from None


def _goal(
    artifact: Artifact,
    cfg: QuantizeStage,
    ctx: Context,
    plan: Plan,
    *,
    ranking: Sequence[sensitivity.NodeScore],
    work: Path,
    started: float,
) -> quantize_search.SearchResult:
    """quantize.goal: the fewest top-ranked nodes in float that bring the goal metric within max_drop."""
    assert cfg.goal is not None
    texts = feeds.evaluation_texts(ctx)[: cfg.goal.samples]
    encode = feeds.encoder(artifact)
    length, size = artifact.usable_length(ctx.data.max_length), ctx.data.batch_size
    batches = [encode(texts[i : i + size], length, None) for i in range(0, len(texts), size)]
    source = artifact.file("model")

    def outputs(model: Path) -> np.ndarray:
        sess = session(model, threads=2, settings=plan.settings if model != source else {})
        return pad_outputs([sess.run(None, b)[0] for b in batches])

    t0 = time.perf_counter()
    reference = outputs(source)
    metric, name, fp32 = _goal_metric(cfg, ctx, artifact, length, reference)
    one_eval, spent = time.perf_counter() - t0, time.perf_counter() - started
    if spent + one_eval >= cfg.time_budget:
        raise UserError(
            f"stages: quantize.time_budget {cfg.time_budget:g} s is too small to run one trial: the sensitivity "
            f"pass and one evaluation of the fp32 model took {spent:.1f} s"
        )
    ctx.log(f"quantize goal: {name} on {len(texts)} evaluation texts, {len(ranking)} ranked candidates")
    target = quantize_search.Target(name, fp32, quantize_search.allowed_drop(cfg.goal, fp32), "quantize.goal")
    try:
        return quantize_search.search(
            ranking=[s.node for s in ranking],
            scores=[s.score for s in ranking],
            fixed_float=plan.excluded,
            quantize=plan.quantize,
            evaluate=lambda model: metric(outputs(model)),
            target=target,
            budget_s=cfg.time_budget,
            work_dir=work,
            out=plan.out,
            log=ctx.log,
            started=started,
        )
    except StageFailed as exc:
        raise StageFailed(f"{exc}; raise quantize.time_budget, or goal.max_drop / lower goal.min_agreement") from None


def _goal_metric(
    cfg: QuantizeStage, ctx: Context, artifact: Artifact, length: int, reference: np.ndarray
) -> tuple[Callable[[np.ndarray], float], str, float]:
    """The goal's metric of a model's outputs (higher is better), its name, and its fp32 value."""
    assert cfg.goal is not None
    if cfg.goal.min_agreement is not None:  # agreement with fp32, as the validate gate measures it
        agree = task_scoring(ctx, artifact, length).agree
        return (lambda out: float(agree(out, reference)["value"])), "agreement with fp32", 1.0
    if ctx.task == "embedding":
        return quantize_search.embedding_metric(reference), "cosine to fp32", 1.0
    scoring = task_scoring(ctx, artifact, length)  # the task metric (accuracy; per word for a tagger)

    def metric(out: np.ndarray) -> float:
        return float(scoring.score(out, len(out))[scoring.metric])

    return metric, scoring.metric, metric(reference)


def _fixed(cfg: QuantizeStage, plan: Plan, ranked: list[str], work: Path) -> list[str]:
    """keep_sensitive: N: the N top-ranked in float (and the all-int8 model, to time what they cost)."""
    assert isinstance(cfg.keep_sensitive, int)
    kept = ranked[: cfg.keep_sensitive]
    plan.quantize([*plan.excluded, *kept], plan.out)
    if kept:
        plan.quantize(plan.excluded, work / "full.onnx")
    return kept


def _speed_cost(full: Path, plan: Plan, feed: dict[str, np.ndarray], kept: list[str]) -> dict[str, Any] | None:
    """Median latency of the chosen model against all int8 (interleaved, batch 1, 2 threads), when they differ."""
    if not kept or not full.is_file():
        return None
    runners: dict[str, Callable[[], object]] = {}
    for name, model in (("all_int8", full), ("chosen", plan.out)):
        runners[name] = partial(session(model, threads=2, settings=plan.settings, idle_spinning=False).run, None, feed)
    timed = interleaved(runners, warmup=3, runs=SPEED_ROUNDS)
    all_int8, kept_ms = timed["all_int8"]["p50"], timed["chosen"]["p50"]
    return {
        "all_int8_ms": round(all_int8, 3),
        "chosen_ms": round(kept_ms, 3),
        "slowdown": round(kept_ms / all_int8, 3),
        "batch": 1,
        "tokens": int(feed["input_ids"].shape[1]),
        "threads": 2,
        "rounds": SPEED_ROUNDS,
    }


def _warn_if_many(ctx: Context, cfg: QuantizeStage, kept: list[str], ranked: list[str]) -> None:
    if len(kept) * 4 > len(ranked):
        other = "mode: dynamic, a qat stage" if cfg.mode == "static" else "a qat stage"
        ctx.warn(
            f"quantize: {len(kept)} of {len(ranked)} candidate nodes stay in float to keep the target: int8 holds "
            f"poorly on this model (try {other}, or keep_sensitive: none to quantize them all)"
        )


def _keep_only_log(work: Path) -> None:
    """The goal's search.json stays (README: the trials while it runs); the trial models go."""
    for path in work.iterdir():
        if path.name != "search.json":
            path.unlink()
