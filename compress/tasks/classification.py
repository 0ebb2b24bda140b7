"""Classification of a text or a text pair: logits out of the graph; accuracy and macro-F1 with bootstrap
95% intervals; for scored pairs (a reranker), how well the scores rank them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import UserError
from compress.tasks.metrics import accuracy_f1, correlations, label_counts

if TYPE_CHECKING:
    import torch

OUTPUT_NAMES = ("logits",)
HEAD = "sequence"


def build_module(model: torch.nn.Module, spec: Any, names: tuple[str, ...]) -> torch.nn.Module:  # noqa: ARG001 (one signature for every task)
    """Wrap a Hugging Face model with a head so that it maps the graph's inputs, by name, to its logits:
    (B, labels) for a sequence classifier, (B, S, labels) for a token classifier."""
    import torch

    with_types = "token_type_ids" in names

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            extra = {"token_type_ids": token_type_ids} if with_types else {}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    return Logits().eval()


def score(logits: np.ndarray, labels: np.ndarray, seed: int = 0, scores: np.ndarray | None = None) -> dict[str, Any]:
    """accuracy and macro-F1 (each with a bootstrap 95% interval), F1 of class 1 (the positive class, e.g.
    spam); with graded scores per example, the Spearman correlation of the positive class's probability."""
    pred = logits.argmax(-1)
    labels = np.asarray(labels)
    classes = logits.shape[-1]
    out: dict[str, Any] = {**accuracy_f1(label_counts(pred, labels, classes), classes, seed), "examples": len(labels)}
    out["f1_positive"] = _f1(pred, labels, 1 if classes > 1 else 0)
    if scores is not None and len(scores) >= 3:
        prob = _softmax(logits)[:, -1]  # the last label: "relevant" / "positive" for a binary reranker
        ranked = correlations(prob, np.asarray(scores, dtype=np.float64), seed=seed)
        out["ranking_spearman"] = ranked["spearman"]
        out["ranking_spearman_ci95"] = ranked["spearman_ci95"]
    return out


def agreement(outputs: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    same = outputs.argmax(-1) == reference.argmax(-1)
    return {"metric": "prediction agreement", "value": float(same.mean()), "differing": int((~same).sum())}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(-1, keepdims=True))


def _f1(pred: np.ndarray, labels: np.ndarray, cls: int) -> float:
    tp = float(((pred == cls) & (labels == cls)).sum())
    fp = float(((pred == cls) & (labels != cls)).sum())
    fn = float(((pred != cls) & (labels == cls)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def label_map(data_names: tuple[str, ...], model_names: tuple[str, ...] | None, where: str) -> np.ndarray:
    """For each of the data's label names, the index of the model's output that predicts it (id2label),
    matched by name. A checkpoint saved with transformers' default names (LABEL_0, LABEL_1, ...) matches
    data labels written as the numbers 0, 1, .... A label the model does not know is a one-line error."""
    if model_names is None:  # no names recorded (a zoo model): the data's own order is the model's
        return np.arange(len(data_names))
    index = {name: i for i, name in enumerate(model_names)}
    if all(n == f"LABEL_{i}" for i, n in enumerate(model_names)):
        index.update({str(i): i for i in range(len(model_names))})
    unknown = [n for n in data_names if n not in index]
    if unknown:
        raise UserError(
            f"{where}: label {', '.join(map(repr, unknown[:3]))} is not a label of the model "
            f"(its id2label: {', '.join(model_names[:8])}); a train stage fine-tunes a head for new labels"
        )
    return np.asarray([index[n] for n in data_names], dtype=np.int64)
