"""Every attention kind equals dense attention under the equivalent mask (or its exact quadratic form)."""

from __future__ import annotations

import pytest
import torch

from compress.models.attention import (
    AttentionConfig,
    BlockSparseAttention,
    causal_linear_attention,
    dense_attention,
)
from compress.models.blocks import build_attention

B, H, D = 2, 3, 8


def qkv(s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, s, D, generator=gen) for _ in range(3))  # type: ignore[return-value]


def key_mask(s: int, lengths: tuple[int, int]) -> torch.Tensor:
    return torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)


def windowed_mask(s: int, w: int, causal: bool, glob: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = ((i - j).abs() <= w)[None].expand(B, s, s).clone()  # (B, S, S)
    if glob is not None:
        allowed |= glob[:, None, :] | glob[:, :, None]
    if causal:
        allowed &= (j <= i)[None]
    return (allowed & keys[:, None, :])[:, None]  # (B, 1, S, S)


def close_on_real_rows(out: torch.Tensor, ref: torch.Tensor, keys: torch.Tensor, atol: float = 1e-5) -> None:
    rows = keys[:, None, :, None].expand_as(out)
    assert torch.allclose(out[rows], ref[rows], atol=atol), (out - ref)[rows].abs().max()


@pytest.mark.parametrize("s", [5, 16, 17, 40])
@pytest.mark.parametrize("w", [1, 4, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("globals_", [0, 1, 2])
def test_windowed_equals_masked_dense(s: int, w: int, causal: bool, globals_: int) -> None:
    q, k, v = qkv(s)
    keys = key_mask(s, (s, max(s - 3, 1)))
    attn = build_attention(AttentionConfig("windowed", causal=causal, window=w, global_tokens=globals_), D)
    glob = None
    if globals_:
        glob = torch.zeros(B, s, dtype=torch.bool)
        glob[:, :globals_] = True
        glob &= keys
    out = attn(q, k, v, keys)
    close_on_real_rows(out, dense_attention(q, k, v, windowed_mask(s, w, causal, glob, keys)), keys)


def test_windowed_with_window_beyond_length_is_dense() -> None:
    q, k, v = qkv(12)
    keys = key_mask(12, (12, 7))
    out = build_attention(AttentionConfig("windowed", window=12), D)(q, k, v, keys)
    dense = build_attention(AttentionConfig("dense"), D)(q, k, v, keys)
    close_on_real_rows(out, dense, keys)


def test_windowed_explicit_global_mask_anywhere() -> None:
    s = 20
    q, k, v = qkv(s, seed=3)
    keys = key_mask(s, (s, 15))
    glob = torch.zeros(B, s, dtype=torch.bool)
    glob[0, [0, 9]] = True
    glob[1, 4] = True
    out = build_attention(AttentionConfig("windowed", window=2), D)(q, k, v, keys, glob)
    close_on_real_rows(out, dense_attention(q, k, v, windowed_mask(s, 2, False, glob, keys)), keys)


def test_windowed_never_builds_an_s_by_s_matrix() -> None:
    """Peak autograd-saved memory at S=2048, w=16 stays far below one S x S score matrix."""
    s, w = 2048, 16
    q, k, v = (t.requires_grad_() for t in qkv(s))
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        build_attention(AttentionConfig("windowed", window=w), D)(q, k, v, torch.ones(B, s, dtype=torch.bool))
    assert max(sizes) < B * H * s * s / 20


@pytest.mark.parametrize("glob", [0, 4, 5])
@pytest.mark.parametrize("random_blocks", [0, 2])
def test_block_sparse_equals_masked_dense(glob: int, random_blocks: int) -> None:
    s, bs = 32, 4
    q, k, v = qkv(s, seed=1)
    keys = key_mask(s, (s, 26))
    cfg = AttentionConfig("block_sparse", block=bs, local_blocks=1, random_blocks=random_blocks, global_tokens=glob)
    attn = build_attention(cfg, D)
    assert isinstance(attn, BlockSparseAttention)
    lay = attn.layout(s // bs).repeat_interleave(bs, 0).repeat_interleave(bs, 1)  # (S, S)
    g = -(-glob // bs) * bs
    lay[:g, :] = True
    allowed = (lay[None] & keys[:, None, :])[:, None]
    close_on_real_rows(attn(q, k, v, keys), dense_attention(q, k, v, allowed), keys)


def test_block_sparse_layout_is_seeded_and_sparse() -> None:
    make = lambda seed: BlockSparseAttention(AttentionConfig("block_sparse", block=8, random_blocks=2, seed=seed))  # noqa: E731
    a, b = make(0).layout(32), make(0).layout(32)
    assert torch.equal(a, b)
    assert not torch.equal(a, make(1).layout(32))
    per_row = a.sum(1)
    assert (per_row[1:-1] == 3 + 2).all()  # 3 local blocks + 2 random per query block, no global
    assert (per_row[[0, -1]] == 2 + 2).all()  # the edge blocks have one neighbour
    assert a.float().mean() < 0.2


def test_block_size_must_divide_length() -> None:
    attn = build_attention(AttentionConfig("block_sparse", block=8), D)
    q, k, v = qkv(20)
    with pytest.raises(ValueError, match=r"attention\.block 8 does not divide the padded sequence length 20"):
        attn(q, k, v, torch.ones(B, 20, dtype=torch.bool))


def test_linformer_with_identity_projection_is_dense() -> None:
    s = 10
    attn = build_attention(AttentionConfig("linformer", proj_len=s, max_len=s), D)
    with torch.no_grad():
        attn.proj_k.copy_(torch.eye(s))  # type: ignore[operator]
        attn.proj_v.copy_(torch.eye(s))  # type: ignore[operator]
    q, k, v = qkv(s)
    keys = torch.ones(B, s, dtype=torch.bool)
    close_on_real_rows(attn(q, k, v, keys), dense_attention(q, k, v, keys[:, None, None, :]), keys)


def test_linformer_padding_and_length_limit() -> None:
    attn = build_attention(AttentionConfig("linformer", proj_len=4, max_len=16), D)
    q, k, v = qkv(12)
    keys = key_mask(12, (12, 8))
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 8:] = 99.0  # padded keys must not matter
    v2[1, :, 8:] = -99.0
    assert torch.allclose(attn(q, k, v, keys), attn(q, k2, v2, keys))
    with pytest.raises(ValueError, match=r"exceeds linformer attention\.max_len 16"):
        attn(*qkv(17), torch.ones(B, 17, dtype=torch.bool))


@pytest.mark.parametrize("causal", [False, True])
def test_kernelized_equals_its_quadratic_form(causal: bool) -> None:
    s = 150  # more than two causal chunks
    attn = build_attention(AttentionConfig("kernelized", features=32, causal=causal), D)
    q, k, v = qkv(s)
    keys = key_mask(s, (s, 120))
    qf = attn.feature_map(q, is_query=True)  # type: ignore[operator]
    kf = attn.feature_map(k, is_query=False) * keys[:, None, :, None]  # type: ignore[operator]
    weights = qf @ kf.transpose(-1, -2)  # (B, H, S, S)
    if causal:
        weights = weights.tril()
    ref = (weights @ v) / weights.sum(-1, keepdim=True)
    close_on_real_rows(attn(q, k, v, keys), ref, keys, atol=1e-4)


def test_kernelized_approximates_softmax_with_many_features() -> None:
    q, k, v = (t * 0.5 for t in qkv(24))
    keys = torch.ones(B, 24, dtype=torch.bool)
    ref = dense_attention(q, k, v, keys[:, None, None, :])
    out = build_attention(AttentionConfig("kernelized", features=4096, seed=0), D)(q, k, v, keys)
    assert (out - ref).abs().mean() < 0.03


def test_causal_prefix_sums_match_any_chunk() -> None:
    qf, kf = torch.rand(1, 1, 70, 5), torch.rand(1, 1, 70, 5)
    v = torch.randn(1, 1, 70, 3)
    assert torch.allclose(causal_linear_attention(qf, kf, v, 7), causal_linear_attention(qf, kf, v, 64), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sparse"}, "unknown kind 'sparse'"),
        ({"kind": "windowed", "window": 0}, "attention.window must be > 0"),
        ({"kind": "windowed", "window": -2}, "attention.window must be > 0"),
        ({"kind": "block_sparse", "block": 0}, "attention.block must be > 0"),
        ({"kind": "linformer", "proj_len": 8}, "proj_len and attention.max_len must be > 0"),
        ({"kind": "linformer", "proj_len": 8, "max_len": 64, "causal": True}, "cannot be causal"),
        ({"kind": "kernelized"}, "attention.features must be > 0"),
    ],
)
def test_bad_configs_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**kwargs)


def test_fused_dense_matches_the_explicit_form_even_for_rows_with_no_key() -> None:
    from compress.models.attention import dense_attention, dense_attention_explicit

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    allowed = torch.rand(2, 1, 7, 7) > 0.5
    allowed[0, 0, 2] = False  # a query that sees nothing: uniform average, not NaN
    fused, explicit = dense_attention(q, k, v, allowed), dense_attention_explicit(q, k, v, allowed)
    assert not fused.isnan().any()
    assert torch.allclose(fused, explicit, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_windowed_chunk_groups_match_dense(monkeypatch: pytest.MonkeyPatch, causal: bool, padded: bool) -> None:
    """One chunk per group: inner chunks of an unpadded batch take the band-only path, edges the full mask."""
    from compress.models import attention

    monkeypatch.setattr(attention, "_GROUP_ELEMENTS", 1)
    s, w = 40, 4
    q, k, v = qkv(s)
    keys = key_mask(s, (s, s - 7) if padded else (s, s))
    attn = build_attention(AttentionConfig("windowed", causal=causal, window=w), D)
    close_on_real_rows(attn(q, k, v, keys), dense_attention(q, k, v, windowed_mask(s, w, causal, None, keys)), keys)
