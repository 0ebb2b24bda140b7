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


def label_counts(pred: Any, gold: Any, classes: int) -> np.ndarray:
    """Per unit (an example, or a sentence of words), [correct, total, tp_0.., fp_0.., fn_0..] as one row.

    `pred` and `gold` are (N,) labels of N units, or lists of per-unit label arrays (a tagger's words)."""
    units = [(np.atleast_1d(p), np.atleast_1d(g)) for p, g in zip(pred, gold, strict=True)]
    rows = np.zeros((len(units), 2 + 3 * classes), dtype=np.float64)
    for i, (p, g) in enumerate(units):
        rows[i, 0], rows[i, 1] = float((p == g).sum()), float(len(g))
        hit = np.bincount(g[p == g], minlength=classes)[:classes]
        rows[i, 2 : 2 + classes] = hit
        rows[i, 2 + classes : 2 + 2 * classes] = np.bincount(p, minlength=classes)[:classes] - hit
        rows[i, 2 + 2 * classes :] = np.bincount(g, minlength=classes)[:classes] - hit
    return rows


def accuracy_f1(rows: np.ndarray, classes: int, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Accuracy and macro-F1 of label counts (label_counts), each with a percentile-bootstrap 95% interval
    that resamples whole units (examples, or sentences for a tagger)."""
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows)), size=n_boot)  # (n_boot, N)
    totals = np.vstack([rows.sum(0, keepdims=True), weights @ rows])  # (1 + n_boot, 2 + 3C)
    acc = totals[:, 0] / np.maximum(totals[:, 1], 1)
    tp, fp, fn = (totals[:, 2 + k * classes : 2 + (k + 1) * classes] for k in range(3))
    # Macro-F1 over the classes present in the gold labels of the whole set (absent ones would add zeros).
    present = (rows[:, 2 + 2 * classes :].sum(0) + rows[:, 2 : 2 + classes].sum(0)) > 0
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), 0.0)[:, present].mean(1)
    return {
        "accuracy": float(acc[0]),
        "accuracy_ci95": [float(np.percentile(acc[1:], q)) for q in (2.5, 97.5)],
        "f1_macro": float(f1[0]),
        "f1_macro_ci95": [float(np.percentile(f1[1:], q)) for q in (2.5, 97.5)],
    }
