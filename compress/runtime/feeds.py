"""Model inputs for ONNX artifacts: token arrays from texts, whichever tokenizer the artifact carries.

An exported Hugging Face model carries its own tokenizer folder (inputs may include token_type_ids);
a zoo model carries an edge-compress tokenizer marker (bytes or WordPiece; input_ids, attention_mask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from compress.artifact import Artifact
from compress.context import Context
from compress.data.marker import MARKER
from compress.data.tokenizers import load_saved
from compress.models import hf

Encoder = Callable[[Sequence[str], int, int | None], dict[str, np.ndarray]]


def encoder(artifact: Artifact) -> Encoder:
    """encode(texts, max_length, pad_to) -> the artifact's input arrays."""
    folder = artifact.file("tokenizer")
    if (folder / MARKER).is_file():
        saved = load_saved(folder)

        def encode_saved(texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
            return saved.encode(list(texts), max_length, pad_to)

        return encode_saved
    tokenizer: Any = hf.load_tokenizer(folder)
    names = tuple(artifact.meta["inputs"])

    def encode_hf(texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
        return hf.encode(tokenizer, tuple(texts), max_length, names, pad_to)

    return encode_hf


def evaluation_texts(ctx: Context) -> tuple[str, ...]:
    """The evaluation texts of the recipe's task (sentence pairs' sentences, labelled texts, or plain text)."""
    task = ctx.task
    if task == "embedding":
        return tuple(ctx.evaluation.texts)
    if task == "classification":
        return tuple(ctx.labeled("evaluation").texts)
    return tuple(ctx.texts("evaluation").texts)
