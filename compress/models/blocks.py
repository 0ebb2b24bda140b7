"""The zoo's transformer blocks: attention and feed-forward halves, a block, and a stack of blocks
(plain residual or reversible). The encoder and the hourglass build on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.attention import build_attention
from compress.models.config import ZooConfig
from compress.models.reversible import reversible_stack


class SelfAttention(nn.Module):
    """Projections around an attention kind: (B, S, d) -> (B, S, d)."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        width = cfg.attention_width
        self.q = nn.Linear(cfg.d_model, width)
        self.k = nn.Linear(cfg.d_model, width)
        self.v = nn.Linear(cfg.d_model, width)
        self.out = nn.Linear(width, cfg.d_model)
        self.attn = build_attention(cfg.attention, cfg.head_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (
            proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v)
        )  # (B, H, S, Dh)
        y = self.attn(q, k, v, key_mask)  # (B, H, S, Dh)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))  # (B, S, d)


class AttentionHalf(nn.Module):
    """F of a block: LN -> attention (-> dropout). Pre-LN residual branches."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.drop(self.attn(self.norm(x), key_mask))


class FeedForwardHalf(nn.Module):
    """G of a block: LN -> Linear -> GELU -> Linear (-> dropout)."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.f = AttentionHalf(cfg)
        self.g = FeedForwardHalf(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.f(x, key_mask)
        return x + self.g(x)


class Stack(nn.Module):
    """n blocks, plain residual or reversible (activations recomputed in backward)."""

    def __init__(self, cfg: ZooConfig, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n))
        self.reversible = cfg.reversible

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        if self.reversible and len(self.blocks):
            return reversible_stack(self.blocks, x, key_mask)
        for block in self.blocks:
            x = block(x, key_mask)
        return x
