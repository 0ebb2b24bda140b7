"""Hourglass (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models").

    x -> pre layers -> [shift right by k-1 if causal] -> shorten by k -> inner layers (S/k tokens)
      -> upsample by k -> + residual from before shortening -> post layers

The shift makes shortening causal-safe: after it, shortened token t mixes only tokens <= t·k, so the
upsampled token i (which reads shortened token i // k) never sees the future. Lengths that are not a
multiple of k are padded on the right and trimmed after upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.blocks import Stack
from compress.models.config import HourglassConfig, ZooConfig


class Hourglass(nn.Module):
    def __init__(self, cfg: ZooConfig, hg: HourglassConfig) -> None:
        super().__init__()
        self.k, self.causal, self.mode = hg.factor, cfg.attention.causal, hg.downsample
        self.pre = Stack(cfg, hg.pre)
        self.inner = Stack(cfg, hg.inner)
        self.post = Stack(cfg, hg.post)
        d = cfg.d_model
        self.down = nn.Linear(d * hg.factor, d) if hg.downsample == "linear" else None
        self.up = nn.Linear(d, d * hg.factor)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        k = self.k
        x = self.pre(x, key_mask)  # (B, S, d)
        residual = x
        if self.causal:
            x = F.pad(x, (0, 0, k - 1, 0))[:, :s]  # shift right by k-1: (B, S, d)
        pad = -s % k
        xs = F.pad(x, (0, 0, 0, pad)).view(b, (s + pad) // k, k, d)  # (B, S/k, k, d)
        short = self.down(xs.reshape(b, -1, k * d)) if self.down is not None else xs.mean(2)  # (B, S/k, d)
        shifted_mask = F.pad(key_mask, (k - 1, 0))[:, :s] if self.causal else key_mask
        short_mask = F.pad(shifted_mask, (0, pad)).view(b, -1, k).any(-1)  # (B, S/k)
        if self.causal:
            short_mask[:, 0] = True  # the first group holds only the shift's zeros: keep it attendable
        short = self.inner(short, short_mask)
        up = self.up(short).view(b, -1, k, d).reshape(b, -1, d)[:, :s]  # (B, S, d)
        return self.post(residual + up, key_mask)
