"""BigBird is refused with its reason, and the reason is checked against transformers itself: in eval,
its block_sparse attention weights block 0's keys 1 + num_random_blocks times (the random blocks all
become block 0), which our BlockSparseAttention layout cannot express. If transformers changes this,
the first test fails and the refusal must be revisited."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import BigBirdConfig, BigBirdModel

import compress
from compress.models.architectures import BIGBIRD_FULL, BIGBIRD_SPARSE, check_supported

R, BLOCK, HIDDEN = 2, 4, 16


def _model() -> BigBirdModel:
    torch.manual_seed(0)
    config = BigBirdConfig(
        vocab_size=50,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=32,
        max_position_embeddings=128,
        attention_type="block_sparse",
        block_size=BLOCK,
        num_random_blocks=R,
        attn_implementation="eager",
        sep_token_id=2,
    )
    return BigBirdModel(config).eval()


def _attend(scores: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    p = torch.exp(scores - scores.max()) * weights
    return (p / p.sum()) @ values


def test_eval_block_sparse_weights_block_zero_by_the_random_block_count() -> None:
    model = _model()
    length = 13 * BLOCK  # above transformers' minimum of (5 + 2 * R) blocks for block_sparse to run
    ids = torch.randint(3, 50, (1, length), generator=torch.Generator().manual_seed(1))
    att = model.encoder.layer[0].attention.self
    seen: dict[str, Any] = {}

    def keep(_module: Any, _inputs: Any, outputs: Any) -> None:
        seen["context"] = outputs[0][0]

    hook = att.register_forward_hook(keep)
    with torch.no_grad():
        model(ids)
        hidden = model.embeddings(input_ids=ids)[0]
        q, k, v = att.query(hidden), att.key(hidden), att.value(hidden)
    hook.remove()
    scores = q @ k.T / math.sqrt(HIDDEN)
    positions = torch.arange(length)
    for row in (BLOCK + 1, 6 * BLOCK + 1, length - BLOCK - 1):  # the second, a middle and the next-to-last block
        b = row // BLOCK
        band = (positions // BLOCK - b).abs() <= 1
        allowed = band | (positions < BLOCK) | (positions >= length - BLOCK)
        once = torch.ones(length)
        counted = torch.where(positions < BLOCK, 1.0 + R, 1.0)
        got = seen["context"][row]
        with torch.no_grad():
            plain = _attend(scores[row][allowed], v[allowed], once[allowed])
            weighted = _attend(scores[row][allowed], v[allowed], counted[allowed])
        assert float((got - weighted).abs().max()) < 1e-5  # what transformers computes
        assert float((got - plain).abs().max()) > 1e-3  # and not what the layout would mean


@pytest.mark.parametrize(("attention", "reason"), [("block_sparse", BIGBIRD_SPARSE), ("original_full", BIGBIRD_FULL)])
def test_bigbird_is_refused_with_the_reason(attention: str, reason: str) -> None:
    config = {"model_type": "big_bird", "attention_type": attention}
    with pytest.raises(compress.UserError) as info:
        check_supported(config, where="model.hf")
    assert str(info.value) == f"model.hf: model_type 'big_bird': {reason}"
