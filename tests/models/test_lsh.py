"""LSH attention (the zoo's `lsh` kind) against a brute-force reading of its definition."""

from __future__ import annotations

import math

import pytest
import torch

from compress.models.attention import AttentionConfig
from compress.models.blocks import build_attention
from compress.models.config import ZooConfig
from compress.models.encoder import build_model
from compress.models.lsh import SELF, hash_buckets, lsh_attention, rotations, sort_order

B, H, D = 2, 2, 8


def brute_force(
    qk: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, rot: torch.Tensor, *, chunk: int, causal: bool
) -> torch.Tensor:
    """Position by position: the keys each query sees in each round, then the log-sum-exp combination."""
    b, h, s, d = qk.shape
    order = sort_order(hash_buckets(qk, rot, mask))
    keys = qk / qk.norm(dim=-1, keepdim=True)
    out = torch.zeros_like(qk)
    for bi in range(b):
        for hi in range(h):
            for i in range(s):
                parts, lses = [], []
                for r in range(rot.shape[0]):
                    slot = int((order[bi, hi, r] == i).nonzero())
                    c = slot // chunk
                    seen = [*range((c - 1) * chunk, c * chunk), *range(c * chunk, (c + 1) * chunk)]
                    seen = seen if c else seen[chunk:]
                    js = order[bi, hi, r, seen]
                    sc = keys[bi, hi, js] @ qk[bi, hi, i] / math.sqrt(d)
                    sc = torch.where(js == i, torch.tensor(SELF), sc)
                    ok = mask[bi, js] & ((js <= i) if causal else torch.ones_like(js, dtype=torch.bool))
                    sc = torch.where(ok, sc, torch.tensor(-1e9))
                    lse = torch.logsumexp(sc, 0)
                    parts.append(torch.softmax(sc, 0) @ v[bi, hi, js])
                    lses.append(lse)
                w = torch.softmax(torch.stack(lses), 0)
                out[bi, hi, i] = (w[:, None] * torch.stack(parts)).sum(0)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("s", "chunk", "hashes", "buckets"), [(16, 4, 2, 4), (24, 8, 3, 6), (8, 8, 1, 2)])
def test_matches_brute_force(causal: bool, s: int, chunk: int, hashes: int, buckets: int) -> None:
    gen = torch.Generator().manual_seed(s + hashes)
    qk, v = torch.randn(B, H, s, D, generator=gen), torch.randn(B, H, s, D, generator=gen)
    mask = torch.ones(B, s, dtype=torch.bool)
    mask[1, s - 3 :] = False
    rot = rotations(AttentionConfig("lsh", chunk=chunk, n_hashes=hashes, buckets=buckets, seed=1), D)
    got = lsh_attention(qk, v, mask, rot, chunk=chunk, causal=causal)
    want = brute_force(qk, v, mask, rot, chunk=chunk, causal=causal)
    real = mask[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_one_chunk_is_full_attention_without_self() -> None:
    """With one chunk every query sees every key: dense
    attention over the normalised shared keys, minus the query itself; causal: position 0 sees only itself."""
    s = 12
    gen = torch.Generator().manual_seed(3)
    qk, v = torch.randn(1, 1, s, D, generator=gen), torch.randn(1, 1, s, D, generator=gen)
    rot = rotations(AttentionConfig("lsh", chunk=s, n_hashes=2, buckets=4), D)
    for causal in (False, True):
        scores = qk[0, 0] @ (qk[0, 0] / qk[0, 0].norm(dim=-1, keepdim=True)).T / math.sqrt(D)
        allowed = ~torch.eye(s, dtype=torch.bool)
        if causal:
            allowed &= torch.ones(s, s, dtype=torch.bool).tril()
            allowed[0, 0] = True
        want = torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1) @ v[0, 0]
        got = lsh_attention(qk, v, torch.ones(1, s, dtype=torch.bool), rot, chunk=s, causal=causal)[0, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_sorts_last_and_changes_nothing_real() -> None:
    s, chunk = 16, 4
    gen = torch.Generator().manual_seed(5)
    qk, v = torch.randn(1, H, s, D, generator=gen), torch.randn(1, H, s, D, generator=gen)
    rot = rotations(AttentionConfig("lsh", chunk=chunk, n_hashes=2, buckets=4), D)
    mask = torch.ones(1, s, dtype=torch.bool)
    mask[0, 12:] = False
    order = sort_order(hash_buckets(qk, rot, mask))
    assert set(order[..., 12:].flatten().tolist()) == {12, 13, 14, 15}
    full = lsh_attention(qk, v, mask, rot, chunk=chunk, causal=True)
    short = lsh_attention(qk[:, :, :12], v[:, :, :12], mask[:, :12], rot, chunk=chunk, causal=True)
    torch.testing.assert_close(full[:, :, :12], short)


def test_model_pads_to_whole_chunks_and_shares_qk() -> None:
    cfg = ZooConfig(
        max_len=32, d_model=16, n_heads=2, d_ff=32, attention=AttentionConfig("lsh", chunk=8, n_hashes=2, buckets=4)
    )
    model = build_model(cfg)
    attn = model.backbone.body.blocks[0].f.attn
    assert attn.projections == ("q", "v") and not hasattr(attn, "k")
    ids = torch.randint(3, 200, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    out = model(ids, mask)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    torch.testing.assert_close(model(ids[1:, :9], mask[1:, :9]), out[1:], atol=1e-5, rtol=1e-5)
    assert "backbone.body.blocks.0.f.attn.attn.rotations" in model.state_dict()


def test_training_draws_fresh_rotations_eval_keeps_the_saved_ones() -> None:
    attn = build_attention(AttentionConfig("lsh", chunk=4, n_hashes=1, buckets=8), D)
    gen = torch.Generator().manual_seed(0)
    qk, v = torch.randn(1, 1, 32, D, generator=gen), torch.randn(1, 1, 32, D, generator=gen)
    mask = torch.ones(1, 32, dtype=torch.bool)
    attn.eval()
    torch.testing.assert_close(attn(qk, qk, v, mask), attn(qk, qk, v, mask))
    attn.train()
    torch.manual_seed(0)
    a = attn(qk, qk, v, mask)
    assert not torch.allclose(a, attn(qk, qk, v, mask))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"chunk": 8, "n_hashes": 2, "buckets": 5}, "buckets must be even"),
        ({"chunk": 0, "n_hashes": 2, "buckets": 4}, "chunk and attention.n_hashes must be > 0"),
        ({"chunk": 8, "n_hashes": 2, "buckets": 4, "global_tokens": 1}, "no global tokens"),
    ],
)
def test_bad_config_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttentionConfig("lsh", **fields)


def test_length_not_a_multiple_of_the_chunk_is_refused_by_the_attention() -> None:
    with pytest.raises(ValueError, match=r"not a multiple of attention\.chunk 8"):
        lsh_attention(
            torch.randn(1, 1, 12, D),
            torch.randn(1, 1, 12, D),
            torch.ones(1, 12, dtype=torch.bool),
            torch.randn(1, D, 2),
            chunk=8,
            causal=False,
        )
    with pytest.raises(ValueError, match="does not divide max_len"):
        ZooConfig(max_len=30, attention=AttentionConfig("lsh", chunk=8, n_hashes=1, buckets=2))
