"""A byte-level tokenizer: no vocabulary file, no unknown tokens, any language or encoding.

Ids: pad 0, cls 1, sep 2, then byte b as b + 3 (vocab_size 259). A text is its UTF-8 bytes between
[CLS] and [SEP], the same frame a WordPiece tokenizer gives, so models can pool on position 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from compress.data.marker import mark
from compress.errors import UserError

MAX_LENGTH = 8192  # the longest sequence any model here attends over; longer is a config mistake


def check_lengths(max_length: int, pad_to: int | None) -> None:
    """One rule for every tokenizer: room for [CLS] and [SEP], at most MAX_LENGTH, pad_to within it."""
    if not 2 <= max_length <= MAX_LENGTH:
        raise UserError(f"max_length must be between 2 and {MAX_LENGTH} tokens, got {max_length}")
    if pad_to is not None and not 2 <= pad_to <= max_length:
        raise UserError(f"pad_to must be between 2 and max_length ({max_length}), got {pad_to}")


class ByteTokenizer:
    """UTF-8 bytes as tokens, framed by [CLS] ... [SEP]; the same encode() as the WordPiece wrapper."""

    pad_id = 0
    cls_id = 1
    sep_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """int64 input_ids and attention_mask (B, S): truncated to max_length (or pad_to), padded right.

        S is pad_to when given, else the longest encoded text. Truncation may cut a multi-byte
        character; decode() replaces such a fragment rather than failing.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single str")
        check_lengths(max_length, pad_to)
        limit = pad_to or max_length
        rows = [self._ids(text, limit) for text in texts]
        width = pad_to or max((len(row) for row in rows), default=0)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save(self, folder: Path) -> None:
        """A marker file: byte tokenization needs no vocabulary."""
        mark(folder, "bytes")

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text behind one row of ids; special tokens and padding are skipped."""
        values = np.asarray(ids, dtype=np.int64).reshape(-1)
        if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
            raise UserError(f"byte token ids must lie in 0..{self.vocab_size - 1}")
        data = (values[values >= self.offset] - self.offset).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def _ids(self, text: str, limit: int) -> np.ndarray:
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[: limit - 2].astype(np.int64) + self.offset
        return np.concatenate(([self.cls_id], body, [self.sep_id])).astype(np.int64)
