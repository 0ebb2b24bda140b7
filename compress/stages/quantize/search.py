"""Accuracy-aware quantization: keep the most sensitive nodes in float until a goal holds.

1. Trial 0 quantizes every candidate node. If the drop is within the goal, that is the result.
2. Sensitivity: one trial per candidate with only that node in float; its gain over trial 0 ranks it.
3. Search: the top-1, top-2, ... ranked nodes in float, until the goal holds.
Every trial is recorded. The time budget is checked before each trial; when it runs out first, or the
goal cannot be met with every ranked node in float, the stage fails and says what the best trial was.
Calibration happens once, before the search (a calibration cache), so a trial costs one quantizer pass
and one evaluation.

Why not neural-compressor's autotune: 3.x tunes PyTorch models through its own torch quantizers
(pt2e / IPEX); it cannot drive onnxruntime.quantization on an ONNX graph with our custom attention ops,
and its ONNX tuning moved to a separate package (onnx-neural-compressor) pinned to older ONNX Runtime.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.data.cache import write_atomic
from compress.errors import StageFailed, UserError
from compress.stages.quantize.config import QuantizeGoal

Quantizer = Callable[[list[str], Path], None]  # (nodes kept in float, output path)
Evaluator = Callable[[Path], float]  # model path -> goal metric (higher is better)


@dataclass
class Trial:
    index: int
    phase: str  # full | sensitivity | search
    in_float: list[str]
    metric: float
    drop: float
    met: bool
    seconds: float


@dataclass
class SearchResult:
    metric_name: str
    fp32: float
    allowed_drop: float
    budget_s: float
    trials: list[Trial] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    chosen: int | None = None
    elapsed_s: float = 0.0
    stopped_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trials"] = [asdict(t) for t in self.trials]
        return out


def allowed_drop(goal: QuantizeGoal, fp32: float) -> float:
    return goal.max_drop * abs(fp32) if goal.relative else goal.max_drop


def search(
    *,
    candidates: Sequence[str],
    fixed_float: Sequence[str],
    quantize: Quantizer,
    evaluate: Evaluator,
    fp32_model: Path,
    goal: QuantizeGoal,
    budget_s: float,
    metric_name: str,
    work_dir: Path,
    out: Path,
    log: Callable[[str], None],
) -> SearchResult:
    """Run the search; the chosen trial's model ends up at `out`. Trials are saved to work_dir/search.json."""
    started = time.perf_counter()
    fp32 = evaluate(fp32_model)
    one_eval = time.perf_counter() - started
    if one_eval >= budget_s:
        raise UserError(
            f"stages: quantize.time_budget {budget_s:g} s is too small to run one trial: evaluating the fp32 model "
            f"alone took {one_eval:.1f} s"
        )
    run = _Run(SearchResult(metric_name, fp32, allowed_drop(goal, fp32), budget_s), started, one_eval, work_dir)
    run.quantize, run.evaluate, run.fixed_float = quantize, evaluate, list(fixed_float)
    full = run.trial("full", [])
    log(
        f"quantize goal: {metric_name} fp32 {fp32:.4f}, all int8 {full.metric:.4f} "
        f"(allowed drop {run.result.allowed_drop:g})"
    )
    if not full.met:
        ranked = run.rank(candidates, full)
        if not run.met():
            run.greedy(ranked)
    return run.finish(out, log)


class _Run:
    """The state of one search: its trials, the best model so far, the clock."""

    def __init__(self, result: SearchResult, started: float, one_eval: float, work_dir: Path) -> None:
        self.result, self.started, self.one_eval, self.work_dir = result, started, one_eval, work_dir
        self.trial_path, self.best_path = work_dir / "trial.onnx", work_dir / "best.onnx"
        self.best: Trial | None = None
        self.quantize: Quantizer
        self.evaluate: Evaluator
        self.fixed_float: list[str] = []

    def met(self) -> bool:
        return self.best is not None and self.best.met

    def trial(self, phase: str, in_float: list[str]) -> Trial:
        t0 = time.perf_counter()
        self.quantize([*self.fixed_float, *in_float], self.trial_path)
        metric = self.evaluate(self.trial_path)
        drop = self.result.fp32 - metric
        trial = Trial(
            len(self.result.trials),
            phase,
            in_float,
            metric,
            drop,
            drop <= self.result.allowed_drop,
            time.perf_counter() - t0,
        )
        self.result.trials.append(trial)
        best = self.best
        if best is None or (trial.met and not best.met) or (trial.met == best.met and trial.drop < best.drop):
            self.best = trial
            self.trial_path.replace(self.best_path)
        _save(self.work_dir, self.result, self.started)
        return trial

    def time_for_one_more(self) -> bool:
        spent = time.perf_counter() - self.started
        per_trial = max((t.seconds for t in self.result.trials), default=self.one_eval)
        return spent + per_trial <= self.result.budget_s

    def rank(self, candidates: Sequence[str], full: Trial) -> list[str]:
        """Sensitivity: each candidate alone in float; ranked by how much that recovers."""
        gains: dict[str, float] = {}
        for node in candidates:
            if not self.time_for_one_more():
                self.result.stopped_by = "time budget (sensitivity)"
                break
            trial = self.trial("sensitivity", [node])
            gains[node] = trial.metric - full.metric
            if trial.met:  # one node in float is enough: no cheaper answer exists
                break
        order = list(candidates)
        ranked = sorted(gains, key=lambda n: (-gains[n], order.index(n)))
        self.result.ranking = [{"node": n, "gain": gains[n]} for n in ranked]
        return ranked

    def greedy(self, ranked: list[str]) -> None:
        for k in range(2, len(ranked) + 1):
            if not self.time_for_one_more():
                self.result.stopped_by = "time budget (search)"
                return
            if self.trial("search", ranked[:k]).met:
                return

    def finish(self, out: Path, log: Callable[[str], None]) -> SearchResult:
        result, best = self.result, self.best
        assert best is not None
        result.chosen = best.index
        _save(self.work_dir, result, self.started)
        if not best.met:
            why = result.stopped_by or "every ranked node already in float"
            raise StageFailed(
                f"quantize: goal not met ({why}) after {len(result.trials)} trials in {result.elapsed_s:.0f} s: best "
                f"{result.metric_name} drop {best.drop:.4f} > allowed {result.allowed_drop:g} with "
                f"{len(best.in_float)} nodes in float (trials: {self.work_dir / 'search.json'}); raise "
                "quantize.time_budget or goal.max_drop"
            )
        result.stopped_by = result.stopped_by or "goal met"
        self.best_path.replace(out)
        log(
            f"quantize goal met by trial {best.index} ({best.phase}): {result.metric_name} {best.metric:.4f}, drop "
            f"{best.drop:.4f}, {len(best.in_float)} nodes in float, {len(result.trials)} trials, "
            f"{result.elapsed_s:.0f} s"
        )
        return result


def _save(work_dir: Path, result: SearchResult, started: float) -> None:
    result.elapsed_s = time.perf_counter() - started
    write_atomic(work_dir / "search.json", (json.dumps(result.to_dict(), indent=2) + "\n").encode())


def embedding_metric(reference: np.ndarray) -> Callable[[np.ndarray], float]:
    """Mean cosine of a model's embeddings to the fp32 model's (1.0 for the fp32 model itself)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)

    def metric(outputs: np.ndarray) -> float:
        got = outputs.reshape(len(outputs), -1).astype(np.float64)
        cos = (got * ref).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        return float(cos.mean())

    return metric


def accuracy_metric(labels: np.ndarray) -> Callable[[np.ndarray], float]:
    def metric(logits: np.ndarray) -> float:
        return float((logits.argmax(-1) == labels).mean())

    return metric
