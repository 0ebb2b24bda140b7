"""Classification: accuracy and F1 of predicted labels, with a bootstrap 95% interval on accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np


def score(logits: np.ndarray, labels: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """accuracy (with CI), macro F1, and F1 of class 1 (the positive class, e.g. spam)."""
    pred = logits.argmax(-1)
    labels = np.asarray(labels)
    correct = (pred == labels).astype(np.float64)
    boot = np.random.default_rng(seed).integers(0, len(correct), size=(n_boot, len(correct)))
    f1s = [_f1(pred, labels, c) for c in range(logits.shape[-1])]
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [float(np.percentile(correct[boot].mean(1), q)) for q in (2.5, 97.5)],
        "f1_macro": float(np.mean(f1s)),
        "f1_positive": f1s[1] if len(f1s) > 1 else f1s[0],
        "examples": len(labels),
    }


def _f1(pred: np.ndarray, labels: np.ndarray, cls: int) -> float:
    tp = float(((pred == cls) & (labels == cls)).sum())
    fp = float(((pred == cls) & (labels != cls)).sum())
    fn = float(((pred != cls) & (labels == cls)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
