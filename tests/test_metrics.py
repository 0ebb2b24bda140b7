"""Metrics against independent computations (scipy) and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from compress.data.sets import ScoredPairs
from compress.tasks.embedding import pair_similarities, score
from compress.tasks.metrics import correlations, cosine_fidelity


def test_correlations_match_scipy_and_ci_brackets_estimate() -> None:
    rng = np.random.default_rng(1)
    gold = rng.normal(size=300)
    pred = gold + rng.normal(scale=1.0, size=300)
    out = correlations(pred, gold, seed=0)
    assert out["spearman"] == pytest.approx(stats.spearmanr(pred, gold).statistic, abs=1e-12)
    assert out["pearson"] == pytest.approx(stats.pearsonr(pred, gold).statistic, abs=1e-12)
    for name in ("spearman", "pearson"):
        lo, hi = out[f"{name}_ci95"]
        assert lo < out[name] < hi
        assert hi - lo < 0.3  # 300 pairs: a tight interval, not a degenerate one
    assert out["pairs"] == 300


def test_correlations_with_ties_use_average_ranks() -> None:
    gold = np.array([1, 1, 2, 2, 3, 3, 4, 4.0])
    pred = np.array([0.1, 0.2, 0.2, 0.3, 0.5, 0.4, 0.9, 0.8])
    assert correlations(pred, gold)["spearman"] == pytest.approx(stats.spearmanr(pred, gold).statistic)


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert correlations(a, b, seed=3) == correlations(a, b, seed=3)


def test_cosine_fidelity() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    cand = np.array([[1.0, 1.0], [0.0, 5.0]])
    out = cosine_fidelity(cand, ref)
    assert out["cosine_min"] == pytest.approx(1 / np.sqrt(2))
    assert out["cosine_mean"] == pytest.approx((1 / np.sqrt(2) + 1) / 2)


def test_pair_similarities_and_score() -> None:
    emb = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    data = ScoredPairs("toy", ("a", "b", "c", "d"), ((0, 1), (0, 2), (0, 3), (1, 2)), (0.7, 0.5, 0.0, 0.8))
    sims = pair_similarities(emb, data)
    assert sims == pytest.approx([1 / np.sqrt(2), 0.0, -1.0, 1 / np.sqrt(2)])
    assert score(emb, data)["spearman"] == pytest.approx(stats.spearmanr(sims, data.scores).statistic)
