"""Keep the most sensitive nodes in float: as few as meet a target, found in O(log n) evaluations.

The candidates come ranked by the one-pass sensitivity (sensitivity.py); trial k quantizes every candidate
but the k top-ranked. Trial 0 is all int8: if it meets the target, that is the answer. Otherwise the
sensitivities predict k: quantization noise from different nodes adds up in power, so the drop with the k
top-ranked in float is about drop(0) · (Σ_{i≥k} s_i²) / (Σ_i s_i²). (On all-mpnet-base-v2 this predicted
the measured drops at k = 2, 4, 5, 6, 8 within 10%.) The predicted k is tried. A hit shrinks k by steps
of 1, 2, 4, ... until a miss; a miss grows it by steps of 1, 2, 4, ... until a hit; bisection between the
last miss and the first hit then finds the smallest k that meets the target. A good prediction costs 3
trials, a bad one O(log n). It relies on more float never being much worse, which holds up to the metric's noise; every
trial is recorded.

The target is the goal's (quantize.goal: a metric on data.evaluation, at most max_drop below fp32) or the
fidelity floor of keep_sensitive: auto (mean cosine to the fp32 outputs on the sensitivity texts). The time
budget is checked before each trial. When it runs out before any trial met the target, or when even every
ranked node in float does not, the search fails and names its best trial; when it runs out later, the
smallest k met so far is the answer.

Why not neural-compressor's autotune: 3.x tunes PyTorch models through its own torch quantizers
(pt2e / IPEX); it cannot drive onnxruntime.quantization on an ONNX graph with our custom attention ops,
and its ONNX tuning moved to a separate package (onnx-neural-compressor) pinned to older ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.data.cache import write_atomic
from compress.errors import StageFailed
from compress.stages.quantize.config import QuantizeGoal

Quantizer = Callable[[list[str], Path], None]  # (nodes kept in float, output path)
Evaluator = Callable[[Path], float]  # model path -> metric (higher is better)


@dataclass
class Trial:
    index: int
    phase: str  # full (k = 0) | predicted | grow | shrink | bisect
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
    ranking: list[str] = field(default_factory=list)
    chosen: int | None = None
    elapsed_s: float = 0.0
    stopped_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trials"] = [asdict(t) for t in self.trials]
        return out


def allowed_drop(goal: QuantizeGoal, fp32: float) -> float:
    if goal.min_agreement is not None:  # the metric is the agreement itself, 1.0 for the fp32 model
        return 1.0 - goal.min_agreement
    assert goal.max_drop is not None
    return goal.max_drop * abs(fp32) if goal.relative else goal.max_drop


@dataclass(frozen=True)
class Target:
    metric_name: str
    fp32: float
    allowed_drop: float
    what: str  # the setting that asked for it, for the failure message (e.g. "quantize.goal")


def search(
    *,
    ranking: Sequence[str],
    fixed_float: Sequence[str],
    quantize: Quantizer,
    evaluate: Evaluator,
    target: Target,
    budget_s: float,
    work_dir: Path,
    out: Path,
    log: Callable[[str], None],
    scores: Sequence[float | None] | None = None,
    started: float | None = None,
) -> SearchResult:
    """Run the search; the chosen trial's model ends up at `out`, the all-int8 one at work_dir/full.onnx.

    scores: the ranking's sensitivities (None: unmeasured), for the prediction. Trials are saved to
    work_dir/search.json as they finish. `started` is when the budget began (default: now).
    """
    run = _Run(
        SearchResult(target.metric_name, target.fp32, target.allowed_drop, budget_s, ranking=list(ranking)),
        started=started if started is not None else time.perf_counter(),
        work_dir=work_dir,
        quantize=quantize,
        evaluate=evaluate,
        fixed_float=list(fixed_float),
    )
    full = run.trial("full", 0)
    shutil.copyfile(run.trial_path, work_dir / "full.onnx")
    log(
        f"quantize: {target.metric_name} all int8 {full.metric:.4f} (fp32 {target.fp32:.4f}, allowed drop "
        f"{target.allowed_drop:g})"
    )
    n = len(ranking)
    if not full.met and n:
        k = predicted_k(scores or [None] * n, full.drop, target.allowed_drop)
        run.search_from(k, n)
    return run.finish(out, log, target.what)


def predicted_k(scores: Sequence[float | None], drop: float, allowed: float) -> int:
    """The fewest top-ranked nodes in float whose predicted drop is within `allowed` (at least 1), when the
    drops of the nodes add up in power: drop(k) = drop(0) · Σ_{i≥k} s_i² / Σ_i s_i²."""
    power = np.square(np.array([s or 0.0 for s in scores], dtype=np.float64))
    total = float(power.sum())
    if total <= 0 or drop <= 0:
        return 1
    tail = total - np.concatenate([[0.0], np.cumsum(power)])  # tail[k] = Σ_{i≥k} s_i²
    within = np.nonzero(drop * tail / total <= allowed)[0]
    return max(1, int(within[0]) if within.size else len(scores))


class _Run:
    """The state of one search: its trials, the smallest k met so far, the clock."""

    def __init__(
        self,
        result: SearchResult,
        *,
        started: float,
        work_dir: Path,
        quantize: Quantizer,
        evaluate: Evaluator,
        fixed_float: list[str],
    ) -> None:
        self.result, self.started, self.work_dir = result, started, work_dir
        self.quantize, self.evaluate, self.fixed_float = quantize, evaluate, fixed_float
        self.trial_path, self.met_path = work_dir / "trial.onnx", work_dir / "chosen.onnx"
        self.hit: Trial | None = None  # the met trial with the fewest nodes in float
        work_dir.mkdir(parents=True, exist_ok=True)

    def trial(self, phase: str, k: int) -> Trial:
        t0 = time.perf_counter()
        in_float = self.result.ranking[:k]
        self.quantize([*self.fixed_float, *in_float], self.trial_path)
        metric = self.evaluate(self.trial_path)
        drop = self.result.fp32 - metric
        met = drop <= self.result.allowed_drop
        trial = Trial(len(self.result.trials), phase, in_float, metric, drop, met, time.perf_counter() - t0)
        self.result.trials.append(trial)
        if met and (self.hit is None or len(in_float) < len(self.hit.in_float)):
            self.hit = trial
            shutil.copyfile(self.trial_path, self.met_path)
        _save(self.work_dir, self.result, self.started)
        return trial

    def time_for_one_more(self) -> bool:
        spent = time.perf_counter() - self.started
        per_trial = max(t.seconds for t in self.result.trials)
        return spent + per_trial <= self.result.budget_s

    def search_from(self, k: int, n: int) -> None:
        """Try the predicted k; then find the smallest k met: shrink from a hit, or grow from a miss, then bisect."""
        if not self.time_for_one_more():
            self.result.stopped_by = "time budget"
            return
        if self.trial("predicted", k).met:
            missed, hit = self.shrink(k)
        else:
            missed, grown = self.grow(k, n)
            if grown is None:
                return
            hit = grown
        self.bisect(missed, hit)

    def shrink(self, hit: int) -> tuple[int, int]:
        """k = hit - 1, - 2, - 4, ... until a trial misses: (last k missed, last k met). A tight prediction is
        confirmed by one trial."""
        missed, step = 0, 1
        while hit - missed > 1 and self.time_for_one_more():
            k = max(hit - step, missed + 1)
            if not self.trial("shrink", k).met:
                return k, hit
            hit, step = k, 2 * step
        return missed, hit

    def grow(self, missed: int, n: int) -> tuple[int, int | None]:
        """k = missed + 1, + 2, + 4, ... (at most n) until a trial meets the target: (last k missed, first k met)."""
        step = 1
        while missed < n:
            if not self.time_for_one_more():
                self.result.stopped_by = "time budget"
                return missed, None
            k = min(missed + step, n)
            if self.trial("grow", k).met:
                return missed, k
            missed, step = k, 2 * step
        return missed, None

    def bisect(self, missed: int, hit: int) -> None:
        """The smallest k in (missed, hit] that meets the target."""
        while hit - missed > 1:
            if not self.time_for_one_more():
                self.result.stopped_by = "time budget (the smallest k met so far)"
                return
            mid = (missed + hit) // 2
            if self.trial("bisect", mid).met:
                hit = mid
            else:
                missed = mid

    def finish(self, out: Path, log: Callable[[str], None], what: str) -> SearchResult:
        result, hit = self.result, self.hit
        self.trial_path.unlink(missing_ok=True)
        if hit is None:
            best = min(result.trials, key=lambda t: t.drop)
            result.chosen = best.index
            _save(self.work_dir, result, self.started)
            why = result.stopped_by or "every ranked node in float"
            raise StageFailed(
                f"quantize: {what} not met ({why}) after {len(result.trials)} trials in {result.elapsed_s:.0f} s: "
                f"best {result.metric_name} drop {best.drop:.4f} > allowed {result.allowed_drop:g} with "
                f"{len(best.in_float)} nodes in float (trials: {self.work_dir / 'search.json'})"
            )
        result.chosen = hit.index
        result.stopped_by = result.stopped_by or "target met"
        _save(self.work_dir, result, self.started)
        self.met_path.replace(out)
        log(
            f"quantize: {what} met with {len(hit.in_float)} nodes in float (trial {hit.index}): "
            f"{result.metric_name} {hit.metric:.4f}, drop {hit.drop:.4f}; {len(result.trials)} trials, "
            f"{result.elapsed_s:.0f} s"
        )
        return result


def _save(work_dir: Path, result: SearchResult, started: float) -> None:
    result.elapsed_s = time.perf_counter() - started
    write_atomic(work_dir / "search.json", (json.dumps(result.to_dict(), indent=2) + "\n").encode())


def cosine_metric(reference: Sequence[np.ndarray]) -> Callable[[Sequence[np.ndarray]], float]:
    """Mean cosine of a model's outputs to the fp32 model's, one output array per text (1.0 for fp32)."""
    ref = [r.reshape(-1).astype(np.float64) for r in reference]

    def metric(outputs: Sequence[np.ndarray]) -> float:
        cosines = []
        for got, want in zip(outputs, ref, strict=True):
            flat = got.reshape(-1).astype(np.float64)
            norms = float(np.linalg.norm(flat) * np.linalg.norm(want))
            cosines.append(float(flat @ want) / max(norms, 1e-12))
        return float(np.mean(cosines))

    return metric


def embedding_metric(reference: np.ndarray) -> Callable[[np.ndarray], float]:
    """Mean cosine of a model's embeddings to the fp32 model's (1.0 for the fp32 model itself)."""
    per_text = cosine_metric(list(reference))

    def metric(outputs: np.ndarray) -> float:
        return per_text(list(outputs))

    return metric
