"""How a task scores a model's outputs on the evaluation set, and how close they are to the fp32 reference's.

One place for validate, the quantize goal and the fidelity checks: the task metric on the outputs for the
first n evaluation examples, and agreement (equal predictions for classifiers, per word for taggers;
mean cosine for embeddings)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.runtime import feeds
from compress.tasks import MAIN_METRIC, TASKS, classification, token_classification
from compress.tasks.metrics import cosine_fidelity


@dataclass(frozen=True)
class TaskScoring:
    """score(outputs, n): the task's metrics on the first n evaluation examples; agree(outputs, reference)."""

    data_name: str
    metric: str
    score: Callable[[np.ndarray, int], dict[str, Any]]
    agree: Callable[[np.ndarray, np.ndarray], dict[str, Any]]


def task_scoring(ctx: Context, artifact: Artifact, max_length: int) -> TaskScoring:
    """The recipe's task scoring for this artifact's outputs (max_length: the tokens the outputs saw)."""
    metric = MAIN_METRIC.get(ctx.task, "accuracy")
    names = tuple(artifact.meta.get("labels") or ()) or None  # the model's id2label, recorded at export
    if ctx.task == "token-classification":
        tagged = ctx.tagged("evaluation")
        starts = feeds.word_starts(artifact, tagged.sentences, max_length)
        to_model = classification.label_map(tagged.tag_names, names, "data.evaluation")
        tags = [tuple(int(to_model[t]) for t in row) for row in tagged.tags]
        return TaskScoring(
            tagged.name,
            metric,
            lambda out, n: token_classification.score(out, starts[:n], tags[:n]),
            lambda out, ref: token_classification.agreement(out, ref, starts[: len(out)]),
        )
    if ctx.task == "classification":
        labeled = ctx.labeled("evaluation")
        labels = classification.label_map(labeled.label_names, names, "data.evaluation")[np.asarray(labeled.labels)]
        scores = None if labeled.scores is None else np.asarray(labeled.scores)
        return TaskScoring(
            labeled.name,
            metric,
            lambda out, n: classification.score(out, labels[:n], scores=None if scores is None else scores[:n]),
            classification.agreement,
        )
    return TaskScoring(ctx.evaluation.name, metric, _embedding_score(ctx), _cosine_agreement)


def _embedding_score(ctx: Context) -> Callable[[np.ndarray, int], dict[str, Any]]:
    pairs = ctx.evaluation

    def embedding(embeddings: np.ndarray, n: int) -> dict[str, Any]:
        if n == len(pairs.texts):
            return dict(TASKS["embedding"].score(embeddings, pairs))
        keep = [k for k, (i, j) in enumerate(pairs.pairs) if i < n and j < n]
        if len(keep) < 3:
            return {"pairs": len(keep)}  # too few rated pairs among the first n texts for a correlation
        sub = replace(pairs, pairs=tuple(pairs.pairs[k] for k in keep), scores=tuple(pairs.scores[k] for k in keep))
        return dict(TASKS["embedding"].score(embeddings, sub))

    return embedding


def _cosine_agreement(outputs: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    return {"metric": "mean cosine", "value": cosine_fidelity(outputs, reference)["cosine_mean"]}


def pad_outputs(chunks: list[np.ndarray]) -> np.ndarray:
    """Batches' outputs as one array; per-token outputs (B, S, L) padded with zeros to the longest S."""
    if not chunks:
        return np.zeros((0,), np.float32)
    if chunks[0].ndim < 3:
        return np.concatenate(chunks)
    longest = max(c.shape[1] for c in chunks)
    return np.concatenate([np.pad(c, ((0, 0), (0, longest - c.shape[1]), (0, 0))) for c in chunks])
