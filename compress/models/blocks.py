"""The zoo's transformer blocks: attention and feed-forward halves, a block, and a stack of blocks
(plain residual or reversible). The encoder and the hourglass build on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.models import attention as kinds
from compress.models.config import ZooConfig
from compress.models.lsh import LSHAttention
from compress.models.reversible import reversible_stack


def build_attention(cfg: kinds.AttentionConfig, head_dim: int) -> kinds.Attention:
    """The attention module for `cfg`. This dict is the only registry of kinds."""
    makers = {
        "dense": lambda: kinds.DenseAttention(cfg),
        "windowed": lambda: kinds.WindowedAttention(cfg),
        "block_sparse": lambda: kinds.BlockSparseAttention(cfg),
        "linformer": lambda: kinds.LinformerAttention(cfg),
        "kernelized": lambda: kinds.KernelizedAttention(cfg, head_dim),
        "lsh": lambda: LSHAttention(cfg, head_dim),
    }
    module: kinds.Attention = makers[cfg.kind]()
    return module


class SelfAttention(nn.Module):
    """Projections around an attention kind: (B, S, d) -> (B, S, d). LSH attention shares one projection
    for queries and keys (Reformer): it has no `k`, and `projections` names the ones it has."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        width = cfg.attention_width
        self.projections: tuple[str, ...] = ("q", "v") if cfg.attention.kind == "lsh" else ("q", "k", "v")
        for name in self.projections:
            setattr(self, name, nn.Linear(cfg.d_model, width))
        self.out = nn.Linear(width, cfg.d_model)
        self.attn = build_attention(cfg.attention, cfg.head_dim)

    def _heads(self, name: str, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        proj: nn.Linear = getattr(self, name)
        return proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, v = self._heads("q", x), self._heads("v", x)
        k = self._heads("k", x) if "k" in self.projections else q
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
