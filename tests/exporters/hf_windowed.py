"""What the Hugging Face windowed-attention export tests share: padded token batches and the comparison
of ONNX Runtime's last_hidden_state with transformers' at real tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def token_batch(rng: np.random.Generator, b: int, s: int, *, vocab: int, pad_id: int, pad: int = 0) -> dict[str, Any]:
    """input_ids and attention_mask (B, S), int64; with `pad`, the last row's last `pad` tokens are padding."""
    ids = rng.integers(3, vocab, (b, s)).astype(np.int64)
    mask = np.ones((b, s), np.int64)
    if pad:
        keep = max(1, s - pad)
        mask[-1, keep:] = 0
        ids[-1, keep:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def max_real_diff(session: Any, model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> float:
    """max |ONNX Runtime - transformers| of last_hidden_state over real tokens (padding carries no meaning)."""
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    got = session.run(None, feeds)[0]
    assert got.shape == want.shape
    real = feeds["attention_mask"] > 0
    return float(np.abs(got - want)[real].max())
