"""Task metrics with their uncertainty, and fidelity of a compressed model to its fp32 reference."""

from __future__ import annotations

from typing import Any

import numpy as np


def correlations(pred: np.ndarray, gold: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Spearman and Pearson correlation with percentile-bootstrap 95% intervals over the pairs."""
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pred), size=(n_boot, len(pred)))  # (n_boot, N)
    out: dict[str, Any] = {"pairs": len(pred)}
    for name, fn in (("spearman", _spearman), ("pearson", _pearson)):
        boot = np.array([fn(pred[i], gold[i]) for i in idx])
        out[name] = float(fn(pred, gold))
        out[f"{name}_ci95"] = [float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))]
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import rankdata

    return _pearson(rankdata(a), rankdata(b))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def cosine_fidelity(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Row-wise cosine similarity of a compressed model's outputs to the fp32 reference's: mean and min."""
    a = candidate.reshape(len(candidate), -1).astype(np.float64)  # (N, D)
    b = reference.reshape(len(reference), -1).astype(np.float64)  # (N, D)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
