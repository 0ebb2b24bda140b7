"""LSH attention (Reformer, Kitaev, Kaiser & Levskaya 2020): the zoo's `lsh` kind.

    forward(qk, v, key_mask) -> out; qk, v: (B, H, S, D); key_mask: (B, S) bool

Queries and keys share one projection (`qk`); a key is its vector divided by its norm. Each of
`n_hashes` rounds hashes every position with a random rotation R (D, buckets/2): bucket =
argmax([x R, -x R]) (angular LSH), so vectors pointing the same way tend to share a bucket. Padding
goes to an extra last bucket. Positions are sorted by (bucket, position) and cut into chunks of `chunk`;
each chunk attends to itself and the chunk before it (the first chunk to itself only, so the padding,
sorted last, never changes what a real token sees). A position does
not attend to itself unless it has no other key (score -1e5 instead of its own); causal: only keys at
or before it. The rounds are combined by their log-sum-exp: out = sum_r softmax_r(lse_r) out_r.

Memory is O(n_hashes · S · 2·chunk), never S x S. The rotations are a saved buffer (seeded), so an
exported model hashes exactly as PyTorch does; in training every step draws fresh rotations, as
Reformer does, so the model does not depend on one draw. The same semantics run as the ONNX op
ai.edgecompress::LSHAttention (exporters/ops/lsh_attention.py) and its native kernel.
"""

from __future__ import annotations

import math

import torch

from compress.models.attention import NEG, Attention, AttentionConfig

SELF = -1e5  # a position's score for itself: below every other key, far above a masked one


def rotations(cfg: AttentionConfig, head_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_hashes, D, buckets / 2) Gaussian rotations; seeded by cfg.seed unless a generator is given."""
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    return torch.randn(cfg.n_hashes, head_dim, cfg.buckets // 2, generator=gen)


def hash_buckets(x: torch.Tensor, rot: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Bucket of every position in every round: (B, H, n_hashes, S) int64; padding is bucket `buckets`."""
    rotated = torch.einsum("bhsd,rdk->bhrsk", x, rot)  # (B, H, R, S, buckets/2)
    buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # (B, H, R, S)
    return buckets.masked_fill(~key_mask[:, None, None, :], 2 * rot.shape[-1])


def sort_order(buckets: torch.Tensor) -> torch.Tensor:
    """Positions sorted by (bucket, position) in each round: (B, H, R, S) int64."""
    s = buckets.shape[-1]
    key = buckets * s + torch.arange(s, device=buckets.device)
    return key.argsort(dim=-1)  # keys are unique: the order is total


def _look_back(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Each chunk's keys: the chunk before it then its own, concatenated on the next axis. The first
    chunk's "before" is the last chunk; callers mask it (see `real` in lsh_attention)."""
    return torch.cat([x.roll(1, dims=axis), x], dim=axis + 1)


def lsh_attention(
    qk: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, rot: torch.Tensor, *, chunk: int, causal: bool
) -> torch.Tensor:
    """LSH attention with the given rotations (see the module doc). S must be a multiple of `chunk`."""
    b, h, s, d = qk.shape
    if s % chunk:
        raise ValueError(f"LSH attention: sequence length {s} is not a multiple of attention.chunk {chunk}")
    rounds, n = rot.shape[0], s // chunk
    order = sort_order(hash_buckets(qk, rot, key_mask))  # (B, H, R, S)
    # Rows moved by flat index_select / index_copy: their backwards are index_add / index_select, several
    # times cheaper in training than gather's scatter_add over expanded 5-d tensors.
    heads = torch.arange(b * h, device=qk.device).view(b, h, 1, 1)
    rows = (order + heads * s).reshape(-1)  # row of (B·H·S, D) behind each sorted slot
    q_sorted = qk.reshape(b * h * s, d).index_select(0, rows).view(b, h, rounds, s, d)
    v_sorted = v.reshape(b * h * s, d).index_select(0, rows).view(b, h, rounds, s, d)
    keys = q_sorted / q_sorted.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    pos = order.view(b, h, rounds, n, chunk)  # original position of each sorted slot
    real = torch.gather(key_mask[:, None, None, :].expand(b, h, rounds, s), 3, order).view(b, h, rounds, n, chunk)

    qc = (q_sorted / math.sqrt(d)).view(b, h, rounds, n, chunk, d)
    kc = _look_back(keys.view(b, h, rounds, n, chunk, d), 3)  # (B, H, R, n, 2c, D)
    vc = _look_back(v_sorted.view(b, h, rounds, n, chunk, d), 3)
    kpos = _look_back(pos, 3)  # (B, H, R, n, 2c)
    # The first chunk has none before it: not the last one cyclically (as in Reformer), where padding,
    # sorted last, would change what real tokens see and a text's result would depend on its batch.
    before = real.roll(1, dims=3)
    before[:, :, :, 0] = False
    kreal = torch.cat([before, real], dim=4)

    scores = qc @ kc.transpose(-1, -2)  # (B, H, R, n, c, 2c)
    qpos = pos[..., None]  # (B, H, R, n, c, 1)
    allowed = kreal[..., None, :].expand_as(scores)
    if causal:
        allowed = allowed & (kpos[..., None, :] <= qpos)
    # One replacement: a hidden key scores NEG, the query's own position SELF (when it may see itself).
    replace = (kpos[..., None, :] == qpos) | ~allowed
    scores = torch.where(replace, torch.where(allowed, SELF, NEG), scores)
    # Max-subtracted, one exp for both the weights and the log-sum-exp: near the self score (-1e5) float32
    # steps are 0.008 apart, and subtracting the maximum keeps a query alone with itself at weight 1.
    top = scores.amax(dim=-1, keepdim=True).detach()
    weights_in = torch.exp(scores - top)
    total = weights_in.sum(dim=-1, keepdim=True)  # (B, H, R, n, c, 1)
    out = (weights_in @ vc) / total  # (B, H, R, n, c, D)
    lse = top + total.log()

    # Back to the original order, then the rounds weighed by how much each one's keys scored.
    slots = (order + (heads * rounds + torch.arange(rounds, device=qk.device).view(1, 1, rounds, 1)) * s).reshape(-1)
    out = out.new_zeros(b * h * rounds * s, d).index_copy(0, slots, out.reshape(-1, d)).view(b, h, rounds, s, d)
    lse = lse.new_zeros(b * h * rounds * s).index_copy(0, slots, lse.reshape(-1)).view(b, h, rounds, s)
    weights = torch.softmax(lse, dim=2)[..., None]  # (B, H, R, S, 1)
    return (weights * out).sum(dim=2)  # (B, H, S, D)


class LSHAttention(Attention):
    """Reformer's LSH attention; the caller passes the shared query-key vectors as both q and k."""

    rotations: torch.Tensor

    def __init__(self, cfg: AttentionConfig, head_dim: int) -> None:
        super().__init__(cfg)
        self.register_buffer("rotations", rotations(cfg, head_dim), persistent=True)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if k is not q:
            raise ValueError("LSH attention shares queries and keys: pass the same tensor as q and k")
        if global_mask is not None and bool(global_mask.any()):
            raise ValueError("LSH attention has no global tokens; a global mask would be silently ignored")
        rot = self.rotations
        if self.training:  # fresh rotations every step (Reformer); eval uses the saved ones
            rot = torch.randn(rot.shape, device=rot.device, dtype=rot.dtype)
        return lsh_attention(q, v, key_mask, rot, chunk=self.cfg.chunk, causal=self.cfg.causal)
