"""Transformer blocks over any attention kind, and the two zoo models: an encoder classifier and a causal LM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.blocks import Stack
from compress.models.config import ZooConfig
from compress.models.hourglass import Hourglass


class Backbone(nn.Module):
    """Embeddings, then a flat stack or an hourglass, then a final LayerNorm: (B, S) ids -> (B, S, d)."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.body: nn.Module
        if cfg.hourglass is not None:
            self.body = Hourglass(cfg, cfg.hourglass)
        else:
            self.body = Stack(cfg, cfg.n_layers)
        self.norm = nn.LayerNorm(cfg.d_model)
        # Small embeddings (GPT-2's 0.02): the LM head is tied to them, and N(0, 1) logits start far
        # above the uniform cross-entropy.
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        if s > self.cfg.max_len:
            raise ValueError(f"sequence length {s} exceeds the model's max_len {self.cfg.max_len}")
        key_mask = attention_mask.bool()  # (B, S)
        whole = {"block_sparse": self.cfg.attention.block, "lsh": self.cfg.attention.chunk}.get(self.cfg.attention.kind)
        if whole:  # needs whole blocks / chunks: pad, then drop the padding again
            pad = -s % whole  # unconditional: an exported graph must pad every length
            input_ids = F.pad(input_ids, (0, pad), value=self.cfg.pad_id)
            key_mask = F.pad(key_mask, (0, pad), value=False)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.tokens(input_ids) + self.positions(pos)[None])  # (B, S, d)
        x = self.body(x, key_mask)
        return self.norm(x)[:, :s]


class ZooClassifier(nn.Module):
    """Encoder + pooling + linear head: (B, S) ids -> (B, num_labels) logits."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask)  # (B, S, d)
        if self.cfg.pooling == "cls":
            pooled = h[:, 0]
        else:
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.head(pooled)  # (B, num_labels)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])


class ZooCausalLM(nn.Module):
    """Decoder-only LM with tied embeddings: (B, S) ids -> (B, S, vocab) next-token logits."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask)
        return h @ self.backbone.tokens.weight.T  # (B, S, V)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy in nats over real target tokens."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self(ids, mask)[:, :-1]  # (B, S-1, V)
        target = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def bits_per_token(loss_nats: float) -> float:
    """Cross-entropy in nats -> bits; for the byte tokenizer a token is a byte: bits per byte."""
    return loss_nats / math.log(2)


def build_model(cfg: ZooConfig) -> ZooClassifier | ZooCausalLM:
    """The zoo model for `cfg`, in eval mode."""
    model = ZooClassifier(cfg) if cfg.task == "classification" else ZooCausalLM(cfg)
    return model.eval()
