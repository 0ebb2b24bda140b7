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

Encoder = Callable[[Sequence[Any], int, int | None], dict[str, np.ndarray]]


def encoder(artifact: Artifact) -> Encoder:
    """encode(examples, max_length, pad_to) -> the artifact's input arrays. An example is what the model
    takes (artifact.meta["input_kind"]): a text, a (text, text) pair, or a tuple of words."""
    folder = artifact.file("tokenizer")
    if (folder / MARKER).is_file():
        saved = load_saved(folder)

        def encode_saved(texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
            return saved.encode(list(texts), max_length, pad_to)

        return encode_saved
    tokenizer: Any = hf.load_tokenizer(folder)
    names = tuple(artifact.meta["inputs"])
    kind = input_kind(artifact)

    def encode_hf(examples: Sequence[Any], max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
        return hf.encode(tokenizer, list(examples), max_length, names, pad_to, kind=kind)

    return encode_hf


def input_kind(artifact: Artifact) -> str:
    """text, pair or words: what one example of this artifact is (artifacts before it was recorded: text)."""
    return str(artifact.meta.get("input_kind", "text"))


def word_starts(artifact: Artifact, examples: Sequence[tuple[str, ...]], max_length: int) -> list[list[int]]:
    """A tagger's first sub-token position of each word (-1: cut by truncation), by the artifact's tokenizer."""
    return hf.word_starts(hf.load_tokenizer(artifact.file("tokenizer")), examples, max_length)


def evaluation_texts(ctx: Context) -> tuple[Any, ...]:
    """The evaluation set's model inputs (the embedding task: the scored pairs' texts; classification: texts
    or text pairs; token classification: sentences of words; lm: texts)."""
    return tuple(ctx.examples("evaluation"))
