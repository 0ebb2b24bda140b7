"""Token classification (NER, POS): one label per word, read at the word's first sub-token.

Scored per word: token accuracy and macro-F1, each with a bootstrap 95% interval that resamples whole
sentences (the words of a sentence are not independent); words cut off by truncation are counted apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.tasks.classification import build_module
from compress.tasks.metrics import accuracy_f1, label_counts

OUTPUT_NAMES = ("logits",)
HEAD = "token"

__all__ = ["HEAD", "OUTPUT_NAMES", "agreement", "build_module", "score", "word_predictions"]


def word_predictions(logits: np.ndarray, starts: list[list[int]]) -> list[np.ndarray]:
    """Per sentence, the predicted label of each word kept by truncation ((N, S, L) logits, padded)."""
    preds = []
    for i, first in enumerate(starts):
        pos = np.asarray([p for p in first if p >= 0], dtype=np.int64)
        preds.append(logits[i, pos].argmax(-1) if len(pos) else np.zeros(0, dtype=np.int64))
    return preds


def score(logits: np.ndarray, starts: list[list[int]], tags: list[tuple[int, ...]], seed: int = 0) -> dict[str, Any]:
    """Token accuracy and macro-F1 over the words the model saw; `words_cut`: words lost to truncation."""
    preds = word_predictions(logits, starts)
    gold = [
        np.asarray([t for t, p in zip(row, first, strict=True) if p >= 0], dtype=np.int64)
        for row, first in zip(tags, starts, strict=True)
    ]
    classes = logits.shape[-1]
    out = accuracy_f1(label_counts(preds, gold, classes), classes, seed)
    out["words"] = int(sum(len(g) for g in gold))
    out["words_cut"] = int(sum(len(row) for row in tags) - out["words"])
    out["sentences"] = len(tags)
    return out


def agreement(outputs: np.ndarray, reference: np.ndarray, starts: list[list[int]]) -> dict[str, Any]:
    """The share of words whose predicted label equals the fp32 reference's."""
    a = np.concatenate(word_predictions(outputs, starts) or [np.zeros(0)])
    b = np.concatenate(word_predictions(reference, starts) or [np.zeros(0)])
    same = a == b
    return {
        "metric": "word prediction agreement",
        "value": float(same.mean()) if len(same) else float("nan"),
        "differing": int((~same).sum()),
    }
