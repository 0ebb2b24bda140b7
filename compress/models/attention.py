"""Attention kinds of the efficient-transformer zoo, behind one interface.

    forward(q, k, v, key_mask, global_mask=None) -> out
    q, k, v: (B, H, S, D); key_mask: (B, S) bool, True for real tokens; global_mask: (B, S) bool or None.

Each kind is a PyTorch reference implementation whose memory follows the method, never a dense S x S
matrix (except `dense`): windowed O(S·w) (Beltagy et al. 2020), block-sparse O(S·b·blocks) (Zaheer et
al. 2020), Linformer O(S·k) (Wang et al. 2020), Performer FAVOR+ O(S·m) (Choromanski et al. 2021), and (in
compress/models/lsh.py) Reformer's LSH attention O(n_hashes·S·chunk) (Kitaev et al. 2020).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.config import AttentionConfig

_GROUP_ELEMENTS = 1 << 20  # scores per chunk group in banded attention (4 MB of float32)
NEG = -1e9  # masked score: finite, so a row with nothing to attend to gives zeros-weights, not NaN


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention where allowed (broadcastable to (B, H, S, S)) says which key each query sees.

    PyTorch's fused scaled_dot_product_attention (4-5x faster than matmul + softmax + matmul for
    training at 2048 tokens here). The mask is additive (NEG where not allowed), not boolean: a row
    with no allowed key then averages uniformly, as the explicit form did, instead of becoming NaN.
    """
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, NEG)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, S, D)


def dense_attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The same as dense_attention, spelled out (matmul, softmax, matmul): the scaling benchmark's second
    dense baseline, and the form an exported graph has without a fused attention kernel."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)  # (B, H, S, S); scale the smaller operand
    scores = scores.masked_fill(~allowed, NEG)
    return torch.softmax(scores, dim=-1) @ v  # (B, H, S, D)


class Attention(nn.Module):
    """Base of the kinds: holds the config; forward(q, k, v, key_mask, global_mask=None) -> (B, H, S, D)."""

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg


class DenseAttention(Attention):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        del global_mask  # every token already sees every other
        allowed = key_mask[:, None, None, :]  # (B, 1, 1, S)
        if self.cfg.causal:
            s = q.shape[2]
            allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        return dense_attention(q, k, v, allowed)


def _no_globals(kind: str, global_mask: torch.Tensor | None) -> None:
    if global_mask is not None and bool(global_mask.any()):
        raise ValueError(f"{kind} attention has no global tokens; a global mask would be silently ignored")


def leading_globals(key_mask: torch.Tensor, count: int) -> torch.Tensor | None:
    """Global mask marking the first `count` positions (e.g. CLS); None when there are none."""
    if count == 0:
        return None
    mask = torch.zeros_like(key_mask)
    mask[:, :count] = True
    return mask & key_mask


class WindowedAttention(Attention):
    """Sliding window of half-width w, computed in query chunks of w: scores are (S/w) x w x 3w, O(S·w)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if global_mask is None:
            global_mask = leading_globals(key_mask, self.cfg.global_tokens)
        return banded_attention(
            q, k, v, key_mask, window=self.cfg.window, causal=self.cfg.causal, global_mask=global_mask
        )


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    window: int,
    causal: bool,
    global_mask: torch.Tensor | None,
) -> torch.Tensor:
    b, h, s, d = q.shape
    c = window  # query chunk: its keys span c + 2w positions
    n = -(-s // c)  # chunks
    pad_q = n * c - s
    span = c + 2 * window
    qc = F.pad(q / math.sqrt(d), (0, 0, 0, pad_q)).view(b, h, n, c, d)  # (B, H, n, c, D), pre-scaled
    kw = F.pad(k, (0, 0, window, window + pad_q)).unfold(2, span, c)  # (B, H, n, D, span): a view
    vw = F.pad(v, (0, 0, window, window + pad_q)).unfold(2, span, c).transpose(-1, -2)  # (B, H, n, span, D)
    km = F.pad(key_mask, (window, window + pad_q)).unfold(1, span, c)  # (B, n, span)
    if global_mask is not None:
        # Global keys are scored once, in the global columns, not again inside a window.
        km = km & ~F.pad(global_mask, (window, window + pad_q)).unfold(1, span, c)
        gidx, gvalid = _positions(global_mask)  # (B, G)
        kg, vg = _gather(k, gidx), _gather(v, gidx)  # (B, H, G, D)

    # Chunks are processed in groups whose scores fit in cache (~4 MB): the work stays O(S·w) and the
    # time linear in S, where one (n, c, span) score tensor for all chunks spills to memory at long S.
    group = max(1, _GROUP_ELEMENTS // (b * h * c * span))
    # The band is the same for every chunk: query i of a chunk sees span positions j with |j - w - i| <= w.
    # Positions before the start or past the end are padding, already False in km.
    rel = torch.arange(span, device=q.device)[None, :] - window - torch.arange(c, device=q.device)[:, None]
    outside = (rel.abs() > window) | (rel > 0) if causal else rel.abs() > window  # (c, span)
    hidden = ~km  # (B, n, span): padding and (with globals) the global keys, scored in their own columns
    # Without padding or global keys, the chunks away from both ends see only real keys: the band alone.
    every_key_real = pad_q == 0 and global_mask is None and bool(key_mask.all())
    band = _additive(outside)  # (c, span)
    # One split per tensor, not a slice per group: the backward of a split is one concatenation, where each
    # slice's backward would fill a zero tensor of the whole input (quadratic in S: 70% of a training step).
    parts = zip(qc.split(group, 2), kw.split(group, 2), vw.split(group, 2), hidden.split(group, 1), strict=True)
    outs = []
    for i, (q_part, k_part, v_part, hidden_part) in enumerate(parts):
        t0 = i * group
        g = q_part.shape[2]
        t1 = t0 + g
        qi = torch.arange(t0 * c, t1 * c, device=q.device).view(g, c, 1)  # absolute query position
        keys, values = k_part.transpose(-1, -2), v_part  # (B, H, g, span, D)
        # inner chunks of an unpadded batch need the band alone; others also hide padding: (B, 1, g, c, span)
        inner = every_key_real and t0 > 0 and t1 < n
        bias = band if inner else _additive(outside | hidden_part[:, :, None, :])[:, None]
        if global_mask is not None:  # the global keys join every chunk's keys in the same softmax
            count = kg.shape[2]
            keys = torch.cat([keys, kg[:, :, None].expand(b, h, g, count, d)], dim=-2)
            values = torch.cat([values, vg[:, :, None].expand(b, h, g, count, d)], dim=-2)
            gok = gvalid[:, None, None, :].expand(b, g, c, -1)  # (B, g, c, G)
            if causal:
                gok = gok & (gidx[:, None, None, :] <= qi[None])
            bias = torch.cat([bias.expand(b, 1, g, c, span), _additive(~gok)[:, None]], dim=-1)
        outs.append(_fused(q_part, keys, values, bias))
    result = torch.cat(outs, dim=2).reshape(b, h, n * c, d)[:, :, :s]
    if global_mask is None:
        return result
    # Global queries see every key: G full rows, O(G·S).
    return _global_rows(q, k, v, key_mask, causal=causal, out=result, gidx=gidx, gvalid=gvalid)


def _additive(hidden: torch.Tensor) -> torch.Tensor:
    """A boolean "may not attend" mask as an additive bias (0 or NEG): rows with no key stay finite."""
    return torch.zeros(hidden.shape).masked_fill(hidden, NEG)


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of chunk groups, (B, H, g, c, D) queries against (B, H, g, L, D) keys and values, with
    PyTorch's fused kernel: batch and heads are merged and the chunks play the heads, since the fused
    CPU kernel takes 4-d inputs (5-d ones fell back to a slower path). Queries are pre-scaled."""
    b, h, g, c, d = q.shape
    length = k.shape[-2]
    if bias.dim() == 5:  # (B or 1, 1, g, c, L)
        bias = bias[:, 0] if bias.shape[0] == 1 else bias.expand(b, h, g, c, length).reshape(b * h, g, c, length)
    out = F.scaled_dot_product_attention(
        q.reshape(b * h, g, c, d),
        k.reshape(b * h, g, length, d),
        v.reshape(b * h, g, length, d),
        attn_mask=bias.to(q.dtype),
        scale=1.0,
    )
    return out.view(b, h, g, c, d)


def _positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True positions per row, padded to the row with most: (B, G) indices and validity."""
    count = int(mask.sum(1).max().item()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, : max(count, 1)]  # (B, G)
    valid = torch.gather(mask, 1, order)
    return order, valid


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) at positions idx (B, G) -> (B, H, G, D)."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, h, -1, d))


def _global_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    causal: bool,
    out: torch.Tensor,
    gidx: torch.Tensor,
    gvalid: torch.Tensor,
) -> torch.Tensor:
    b, h, s, d = q.shape
    qg = _gather(q, gidx)  # (B, H, G, D)
    allowed = key_mask[:, None, None, :].expand(b, 1, gidx.shape[1], s)  # (B, 1, G, S)
    if causal:
        allowed = allowed & (torch.arange(s, device=q.device)[None, None, None, :] <= gidx[:, None, :, None])
    rows = dense_attention(qg, k, v, allowed)  # (B, H, G, D)
    keep = gvalid[:, None, :, None].expand(b, h, -1, d)
    current = _gather(out, gidx)
    return out.scatter(2, gidx[:, None, :, None].expand(b, h, -1, d), torch.where(keep, rows, current))


class BlockSparseAttention(Attention):
    """BigBird-style: each query block sees its neighbour blocks, the global blocks and seeded random blocks.

    Global blocks (the first `global_tokens` rounded up to blocks) see everything. Memory is
    O(S·b·(2·local + 1 + global + random)), never S x S.
    """

    def layout(self, blocks: int) -> torch.Tensor:
        """(blocks, blocks) bool: which key block each query block sees. Fixed for a given length and seed."""
        cfg = self.cfg
        i = torch.arange(blocks)
        lay = (i[:, None] - i[None, :]).abs() <= cfg.local_blocks
        g = -(-cfg.global_tokens // cfg.block)
        lay[:g, :] = True
        lay[:, :g] = True
        if cfg.random_blocks:
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + blocks)
            for row in range(g, blocks):
                free = (~lay[row]).nonzero().flatten()
                pick = free[torch.randperm(len(free), generator=gen)[: cfg.random_blocks]]
                lay[row, pick] = True
        return lay

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        s = q.shape[2]
        bs = self.cfg.block
        if s % bs:
            raise ValueError(f"attention.block {bs} does not divide the padded sequence length {s}")
        if global_mask is not None:
            raise ValueError("block_sparse attention takes its global tokens from attention.global_tokens")
        nb = s // bs
        g = min(-(-self.cfg.global_tokens // bs), nb)
        return block_sparse_attention(q, k, v, key_mask, self.layout(nb).to(q.device), block=bs, global_blocks=g)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    lay: torch.Tensor,
    *,
    block: int,
    global_blocks: int,
) -> torch.Tensor:
    """Query block i attends the key blocks j with lay[i, j] (and real keys); the first `global_blocks`
    query blocks have full rows and are computed as dense rows. lay: (nb, nb) bool, nb = S / block."""
    b, h, s, d = q.shape
    bs, nb, g = block, s // block, global_blocks
    width = int(lay[g:].sum(1).max().item()) if g < nb else 1
    order = torch.argsort((~lay).to(torch.int8), dim=1, stable=True)[:, :width]  # (nb, K) key blocks
    valid = torch.gather(lay, 1, order)  # (nb, K)

    qb = (q / math.sqrt(d)).view(b, h, nb, bs, d)
    kb = k.view(b, h, nb, bs, d)[:, :, order].reshape(b, h, nb, width * bs, d)  # (B, H, nb, K·b, D)
    vb = v.view(b, h, nb, bs, d)[:, :, order].reshape(b, h, nb, width * bs, d)
    mb = key_mask.view(b, nb, bs)[:, order].reshape(b, nb, width * bs)  # (B, nb, K·b)
    ok = mb & valid.repeat_interleave(bs, dim=1)[None]  # (B, nb, K·b)
    scores = qb @ kb.transpose(-1, -2)  # (B, H, nb, b, K·b)
    scores = scores.masked_fill(~ok[:, None, :, None, :], NEG)
    out = (torch.softmax(scores, dim=-1) @ vb).reshape(b, h, s, d)
    if g:
        rows = dense_attention(q[:, :, : g * bs], k, v, key_mask[:, None, None, :])  # (B, H, g·b, D)
        out = torch.cat([rows, out[:, :, g * bs :]], dim=2)
    return out


class LinformerAttention(Attention):
    """Keys and values projected along the sequence to k rows by learned E, F (k x max_len): O(S·k)."""

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__(cfg)
        self.proj_k = nn.Parameter(torch.randn(cfg.proj_len, cfg.max_len) / math.sqrt(cfg.proj_len))
        self.proj_v = nn.Parameter(torch.randn(cfg.proj_len, cfg.max_len) / math.sqrt(cfg.proj_len))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _no_globals("linformer", global_mask)
        s = q.shape[2]
        if s > self.cfg.max_len:
            raise ValueError(f"sequence length {s} exceeds linformer attention.max_len {self.cfg.max_len}")
        keep = key_mask[:, None, :, None].to(k.dtype)  # (B, 1, S, 1): padded keys contribute nothing
        kp = self.proj_k[:, :s] @ (k * keep)  # (B, H, k, D)
        vp = self.proj_v[:, :s] @ (v * keep)
        return torch.softmax((q / math.sqrt(q.shape[-1])) @ kp.transpose(-1, -2), dim=-1) @ vp


class KernelizedAttention(Attention):
    """Performer FAVOR+: softmax kernel estimated with m positive orthogonal random features, O(S·m·D).

    Causal attention uses running prefix sums over chunks, never an S x S matrix.
    """

    chunk = 64
    features: torch.Tensor

    def __init__(self, cfg: AttentionConfig, head_dim: int) -> None:
        super().__init__(cfg)
        self.register_buffer("features", orthogonal_features(cfg.features, head_dim, cfg.seed), persistent=True)

    def feature_map(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """phi(x) = exp(W x' - |x'|^2 / 2 - c) / sqrt(m), x' = x / D^(1/4); c stabilises exp."""
        x = x / x.shape[-1] ** 0.25
        proj = x @ self.features.T  # (B, H, S, m)
        sq = (x * x).sum(-1, keepdim=True) / 2
        # Per-row shifts cancel in the normaliser for queries; keys need one shift shared by all rows.
        shift = proj.amax(-1, keepdim=True) if is_query else proj.amax(dim=(-1, -2), keepdim=True)
        return torch.exp(proj - sq - shift.detach()) / math.sqrt(self.features.shape[0]) + 1e-6

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _no_globals("kernelized", global_mask)
        qf = self.feature_map(q, is_query=True)  # (B, H, S, m)
        kf = self.feature_map(k, is_query=False) * key_mask[:, None, :, None].to(q.dtype)  # (B, H, S, m)
        if not self.cfg.causal:
            kv = kf.transpose(-1, -2) @ v  # (B, H, m, D)
            norm = qf @ kf.sum(2).unsqueeze(-1)  # (B, H, S, 1)
            return (qf @ kv) / norm
        return causal_linear_attention(qf, kf, v, self.chunk)


def causal_linear_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """out_i = sum_{j<=i} (qf_i·kf_j) v_j / sum_{j<=i} qf_i·kf_j, by chunks with a running (m, D) state."""
    b, h, _, m = qf.shape
    state = qf.new_zeros(b, h, m, v.shape[-1])  # sum of kf_j v_j^T over earlier chunks
    total = qf.new_zeros(b, h, m)  # sum of kf_j over earlier chunks
    outs = []
    # split, not a slice per chunk: a slice's backward fills a zero tensor of the whole input each time
    for qc, kc, vc in zip(qf.split(chunk, 2), kf.split(chunk, 2), v.split(chunk, 2), strict=True):
        inner = (qc @ kc.transpose(-1, -2)).tril()  # (B, H, c, c): within the chunk, j <= i
        num = qc @ state + inner @ vc  # (B, H, c, D)
        den = qc @ total.unsqueeze(-1) + inner.sum(-1, keepdim=True)  # (B, H, c, 1)
        outs.append(num / den)
        state = state + kc.transpose(-1, -2) @ vc
        total = total + kc.sum(2)
    return torch.cat(outs, dim=2)


def orthogonal_features(m: int, d: int, seed: int) -> torch.Tensor:
    """(m, d) Gaussian features, orthogonalised in blocks of d and rescaled to chi-distributed norms."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-m // d)):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:m]  # (m, d), rows orthonormal within each block
    norms = torch.randn(m, d, generator=gen).norm(dim=1, keepdim=True)
    return w * norms
