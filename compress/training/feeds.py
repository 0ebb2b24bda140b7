"""Tokenised training data for zoo models: encoded once, batched by similar length, scored per epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compress.context import Context
from compress.data.tokenizers import Tokenizer, data_tokenizer
from compress.models.encoder import bits_per_token
from compress.models.zoo import ZooModel
from compress.tasks import classification
from compress.training.loop import Batch, Evaluation


def bucketed(order: np.ndarray, lengths: np.ndarray, size: int, seed: int) -> list[np.ndarray]:
    """Batches of similar length: sort each window of 32 batches' worth of rows by length, cut, shuffle.

    Emails range from a few bytes to the full window; random batches would pad most rows to the
    longest one. Windows keep the epoch's shuffle; the batch order is shuffled again (seeded).
    """
    window = size * 32
    out: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng = np.random.default_rng([seed, int(order[0]) if len(order) else 0, len(order)])
    return [out[i] for i in rng.permutation(len(out))]


def tokenizer(ctx: Context) -> Tokenizer:
    return data_tokenizer(ctx.data.tokenizer)


def encode(
    ctx: Context, role: str, tok: Tokenizer, max_length: int, *, lm: bool, limit: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if lm:
        texts, labels = ctx.texts(role).texts, None
    else:
        data = ctx.labeled(role)
        texts, labels = data.texts, np.asarray(data.labels, dtype=np.int64)
    if limit is not None and limit < len(texts):
        # A seeded sample, not the first rows: splits keep corpus order, which groups labels.
        keep = np.sort(np.random.default_rng(ctx.data.split_seed).permutation(len(texts))[:limit])
        texts = tuple(texts[i] for i in keep)
        labels = labels[keep] if labels is not None else None
    return tok.encode(texts, max_length), labels


def batch(ids: dict[str, np.ndarray], labels: np.ndarray | None, rows: np.ndarray) -> Batch:
    mask = ids["attention_mask"][rows]
    width = max(int(mask.sum(1).max()), 2)  # trim the batch to its longest real text
    batch = {
        "input_ids": torch.from_numpy(ids["input_ids"][rows, :width]),
        "attention_mask": torch.from_numpy(mask[:, :width]),
    }
    if labels is not None:
        batch["labels"] = torch.from_numpy(labels[rows])
    return batch


def evaluation(lm: bool, ids: dict[str, np.ndarray], labels: np.ndarray | None, size: int) -> Evaluation:
    rows = np.arange(len(ids["input_ids"]))
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]

    def run_lm(model: ZooModel) -> dict[str, Any]:
        total, tokens = 0.0, 0
        for chunk in chunks:
            rows = batch(ids, None, chunk)
            n = int(rows["attention_mask"][:, 1:].sum())
            total += float(model.loss(rows)) * n
            tokens += n
        return {"bits_per_token": bits_per_token(total / max(tokens, 1)), "tokens": float(tokens)}

    def run_cls(model: ZooModel) -> dict[str, Any]:
        logits = [model(**batch(ids, None, c)).numpy() for c in chunks]
        return classification.score(np.concatenate(logits), labels if labels is not None else np.zeros(0))

    if lm:
        return Evaluation("bits_per_token", higher_is_better=False, run=run_lm)
    return Evaluation("accuracy", higher_is_better=True, run=run_cls)
