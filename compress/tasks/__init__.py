"""Tasks decide what a model outputs when exported and how it is scored. One registry, a dict literal."""

from __future__ import annotations

from compress.tasks import classification, embedding, token_classification

# Tasks of Hugging Face models (zoo models build their own outputs: compress/models/encoder.py).
TASKS = {"embedding": embedding, "classification": classification, "token-classification": token_classification}
# The metric a task is judged by: the gate's max_drop, the quantize goal and the report read it.
MAIN_METRIC = {"embedding": "spearman", "classification": "accuracy", "token-classification": "accuracy"}
# The transformers head a task's model carries (None: the bare encoder).
HEADS = {"embedding": None, "classification": "sequence", "token-classification": "token"}

__all__ = ["HEADS", "MAIN_METRIC", "TASKS"]
