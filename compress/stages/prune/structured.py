"""Structured pruning of BERT-family encoders: whole heads and FFN neurons, physically removed.

A head is ranked by the norm of all its weights (its query, key and value rows and its columns of the
attention output); an FFN neuron by its row of the up projection and its column of the down projection.
Removal builds smaller Linear layers, so the exported graph is a smaller dense model. The per-layer
sizes go into config.json as `edge_compress_structure`; `compress.models.hf.load_model` rebuilds them
before loading the weights (transformers 5 no longer has prune_heads).
"""

from __future__ import annotations

from typing import Any

import torch

from compress.models.blocks import Block
from compress.models.encoder import build_model
from compress.models.structure import (
    encoder_of,
    keep_cols,
    keep_rows,
    record_structure,
    remove_heads,
    remove_neurons,
)


def _norm(parts: list[torch.Tensor], p: int) -> torch.Tensor:
    stacked = torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1)
    return stacked.abs().sum(1) if p == 1 else stacked.pow(2).sum(1).sqrt()


def head_scores(layer: Any, p: int) -> torch.Tensor:
    """(heads,) norm of each head's weights in one BERT layer."""
    attn = layer.attention.self
    heads, size = attn.num_attention_heads, attn.attention_head_size
    rows = [getattr(attn, n).weight.detach().reshape(heads, size, -1) for n in ("query", "key", "value")]
    out = layer.attention.output.dense.weight.detach().reshape(-1, heads, size).transpose(0, 1)  # (heads, D, size)
    return _norm([*rows, out], p)


def neuron_scores(layer: Any, p: int) -> torch.Tensor:
    """(intermediate,) norm of each FFN neuron's weights."""
    up = layer.intermediate.dense.weight.detach()  # (I, D)
    down = layer.output.dense.weight.detach().T  # (I, D)
    return _norm([up, down], p)


def kept_counts(model: Any, heads: float, ffn: float) -> list[tuple[int, int]]:
    """(heads, FFN neurons) each layer keeps when the fractions `heads` and `ffn` are removed."""
    counts = []
    for layer in encoder_of(model).encoder.layer:
        n_heads = layer.attention.self.num_attention_heads
        keep_h = n_heads - round(n_heads * heads)
        if keep_h < 1:
            raise ValueError(f"prune.heads {heads} would remove every head of a {n_heads}-head layer")
        n_ff = layer.intermediate.dense.out_features
        counts.append((keep_h, max(n_ff - round(n_ff * ffn), 1)))
    return counts


def prune_bert(model: Any, heads: float, ffn: float, p: int) -> dict[str, Any]:
    """Remove the fraction `heads` of heads and `ffn` of FFN neurons in every layer, ranked by weight norm;
    returns the structure. A task head (classifier, pooler) is left as it is."""
    layers = encoder_of(model).encoder.layer
    for layer, (keep_h, keep_f) in zip(layers, kept_counts(model, heads, ffn), strict=True):
        if keep_h < layer.attention.self.num_attention_heads:
            remove_heads(layer, torch.topk(head_scores(layer, p), keep_h).indices.sort().values)
        if keep_f < layer.intermediate.dense.out_features:
            remove_neurons(layer, torch.topk(neuron_scores(layer, p), keep_f).indices.sort().values)
    return record_structure(model)


def prune_zoo(model: Any, heads: float, ffn: float, p: int) -> tuple[Any, dict[str, Any]]:
    """Structured pruning of a zoo model (any attention kind, flat, reversible or Hourglass).

    Every block of a zoo model shares one config, so every block keeps the same number of heads and
    neurons (its own best ones by norm): the result is the zoo model of a smaller config
    (n_heads, attention_head_dim, d_ff), built fresh and loaded strictly with the kept weights.
    Returns (pruned model in eval mode, structure summary).
    """
    import dataclasses

    cfg = model.cfg
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    keep_h = cfg.n_heads - round(cfg.n_heads * heads)
    keep_f = max(cfg.d_ff - round(cfg.d_ff * ffn), 1)
    if keep_h < 1:
        raise ValueError(f"prune.heads {heads} would remove every head of a {cfg.n_heads}-head model")
    size = cfg.head_dim
    for block in blocks:
        attn = block.f.attn
        rows = [getattr(attn, n).weight.detach().reshape(cfg.n_heads, size, -1) for n in attn.projections]
        out = attn.out.weight.detach().reshape(-1, cfg.n_heads, size).transpose(0, 1)
        top = torch.topk(_norm([*rows, out], p), keep_h).indices.sort().values
        idx = (top[:, None] * size + torch.arange(size)).flatten()
        for name in attn.projections:
            setattr(attn, name, keep_rows(getattr(attn, name), idx))
        attn.out = keep_cols(attn.out, idx)
        ff = block.g
        scores = _norm([ff.up.weight.detach(), ff.down.weight.detach().T], p)
        top_f = torch.topk(scores, keep_f).indices.sort().values
        ff.up, ff.down = keep_rows(ff.up, top_f), keep_cols(ff.down, top_f)
    small = dataclasses.replace(cfg, n_heads=keep_h, attention_head_dim=size, d_ff=keep_f)
    pruned = build_model(small)
    pruned.load_state_dict(model.state_dict(), strict=True)
    return pruned.eval(), {"heads": [keep_h] * len(blocks), "intermediate": [keep_f] * len(blocks)}
