"""The shape of a structurally pruned BERT-family encoder: heads and FFN neurons physically removed.

The pruning stage decides what to remove; this module does the surgery and records the per-layer sizes
in config.json as `edge_compress_structure`, so a pruned checkpoint reloads (`compress.models.hf`
rebuilds the sizes before loading the weights: transformers 5 no longer has prune_heads) and ONNX
Runtime's fusion is told the head count (`exporters.ort_fusion`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.models.architectures import STRUCTURE_KEY


def keep_rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[idx].clone()
    return new


def keep_cols(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def remove_heads(layer: Any, keep: torch.Tensor) -> None:
    """Keep only the heads in `keep` (sorted indices) of one BERT layer."""
    attn = layer.attention.self
    size = attn.attention_head_size
    idx = (keep[:, None] * size + torch.arange(size)).flatten()
    for name in ("query", "key", "value"):
        setattr(attn, name, keep_rows(getattr(attn, name), idx))
    layer.attention.output.dense = keep_cols(layer.attention.output.dense, idx)
    attn.num_attention_heads = len(keep)
    attn.all_head_size = len(keep) * size


def remove_neurons(layer: Any, keep: torch.Tensor) -> None:
    layer.intermediate.dense = keep_rows(layer.intermediate.dense, keep)
    layer.output.dense = keep_cols(layer.output.dense, keep)


def encoder_of(model: Any) -> Any:
    """The encoder of a Hugging Face model, with or without a task head (its `base_model`, e.g. `.bert`):
    the part with `.encoder.layer` that pruning and layer dropping work on. The head and the encoder share
    one config object."""
    return getattr(model, "base_model", model)


def record_structure(model: Any) -> dict[str, Any]:
    """Write the per-layer sizes into the config (for reloading); returns them. `model` may carry a head."""
    layers = encoder_of(model).encoder.layer
    structure: dict[str, list[int]] = {
        "heads": [layer.attention.self.num_attention_heads for layer in layers],
        "intermediate": [layer.intermediate.dense.out_features for layer in layers],
    }
    model.config.update({STRUCTURE_KEY: structure})
    return structure


def rebuild(model: Any, structure: dict[str, list[int]]) -> None:
    """Give a freshly built model (with or without a head) the per-layer sizes of a pruned checkpoint
    (weights loaded afterwards)."""
    layers = encoder_of(model).encoder.layer
    for layer, n_heads, n_ff in zip(layers, structure["heads"], structure["intermediate"], strict=True):
        if n_heads != layer.attention.self.num_attention_heads:
            remove_heads(layer, torch.arange(n_heads))
        if n_ff != layer.intermediate.dense.out_features:
            remove_neurons(layer, torch.arange(n_ff))
