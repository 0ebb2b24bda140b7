"""Hugging Face ModernBERT -> ONNX, its local (sliding-window) layers as ai.edgecompress::WindowedAttention.

ModernBERT (transformers' modeling_modernbert.py, 5.23) alternates attention kinds by
`config.layer_types`: a "sliding_attention" layer lets query i attend key j iff key j is real and
|i - j| <= config.sliding_window (= local_attention // 2: 64 in the released checkpoints), a
"full_attention" layer (every `global_attn_every_n_layers`-th, layer 0 included) attends every real key.
Both apply rotary position embeddings (each kind its own theta) to the queries and keys, then softmax of
q·k / sqrt(D). Every exporter ships the local layers as dense scores with a band mask: quadratic in the
length. Here, for the duration of an export (`exportable_modernbert`):
- each local layer's ModernBertAttention is replaced by a module doing the same projections and rotary
  embedding, then our WindowedAttention op with window = sliding_window (no global tokens): linear in S;
- ModernBertModel.forward is handed its attention masks ready-made, a mapping transformers' forward
  accepts: the (B, S) real-token mask for the local layers (our op reads it), and a (B, 1, 1, S) additive
  key mask for the global layers, where transformers would build an S x S band mask and an S x S full mask.
Global layers keep transformers' own (eager) attention: dense, O(S^2), by the model's design.

transformers 5.23 has no unpadded (varlen) path for ModernBERT outside flash-attention, which CPU export
never loads (compress.models.hf loads eager attention); a model holding another attention
implementation is refused. Anything this module cannot map exactly is a ValueError, never a silently
dense graph.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.data.cache import write_atomic
from exporters.dynamo_export import check_graph, export_program
from exporters.hf_attention import GLOBAL, LOCAL
from exporters.ops import attach_functions
from exporters.ops.torch_ops import register_torch_ops

ATTENTION = ("eager", "sdpa")  # the implementations whose global layers take our additive key mask


class ExportModernBertLocalAttention(nn.Module):
    """A ModernBERT sliding-window layer's attention as one WindowedAttention op (projections and rotary
    embedding in standard ops). Shares the source's weights; returns (output, None) like the source."""

    Wqkv: nn.Linear
    Wo: nn.Linear

    def __init__(self, source: Any, window: int) -> None:
        super().__init__()
        self.op = register_torch_ops().windowed_attention
        self.Wqkv, self.Wo, self.out_drop = source.Wqkv, source.Wo, source.out_drop
        self.head_dim = int(source.head_dim)
        self.window = window
        self.dropout = float(source.attention_dropout)
        self.train(source.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

        if kwargs.get("output_attentions"):
            raise ValueError("export: output_attentions is not supported by the ModernBERT export")
        if self.training and self.dropout > 0:
            raise ValueError("export: ModernBERT attention dropout is on (call model.eval() first)")
        if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 2:
            raise ValueError("export: a ModernBERT local layer needs the (B, S) real-token mask")
        if position_embeddings is None:
            raise ValueError("export: a ModernBERT local layer needs its rotary position embeddings")
        b, s, e = hidden_states.shape
        qkv = self.Wqkv(hidden_states).view(b, s, 3, e // self.head_dim, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (B, H, S, D)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        out = self.op(q, k, v, attention_mask, torch.zeros_like(attention_mask), self.window, False)
        return self.out_drop(self.Wo(out.transpose(1, 2).reshape(b, s, e))), None


def _forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """ModernBertModel.forward with its masks made here: (B, S) bool for the local layers, a (B, 1, 1, S)
    additive key mask for the global ones (transformers would build two S x S masks)."""
    if isinstance(attention_mask, dict):
        raise ValueError("export: the ModernBERT export builds the attention masks itself; pass a (B, S) mask")
    source = input_ids if input_ids is not None else inputs_embeds
    if source is None:
        raise ValueError("export: give input_ids or inputs_embeds")
    shape = source.shape[:2]
    real = torch.ones(shape, dtype=torch.bool, device=source.device) if attention_mask is None else attention_mask > 0
    dtype = self.embeddings.tok_embeddings.weight.dtype
    additive = torch.zeros(shape, dtype=dtype, device=source.device).masked_fill(~real, torch.finfo(dtype).min)
    masks = {LOCAL: real, GLOBAL: additive[:, None, None, :]}
    cls = type(self)
    return cls.forward(
        self,
        input_ids=input_ids,
        attention_mask=masks,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        **kwargs,
    )


def _plan(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, nn.Module, int]]]:
    """The ModernBertModels inside `model` and each (layer, attention, window) of a local layer, checked
    before anything is changed: ValueError for what this export cannot reproduce exactly."""
    from transformers.models.modernbert.modeling_modernbert import ModernBertAttention, ModernBertModel

    roots = [m for m in model.modules() if isinstance(m, ModernBertModel)]
    if not roots:
        raise ValueError(f"export: {type(model).__name__} holds no transformers ModernBertModel")
    local: list[tuple[nn.Module, nn.Module, int]] = []
    for root in roots:
        if type(root) is not ModernBertModel:
            raise ValueError(f"export: {type(root).__name__} subclasses ModernBertModel; refusing to guess its forward")
        if "forward" in vars(root):
            raise ValueError("export: this ModernBertModel's forward is already replaced (nested export?)")
        config = root.config
        if config._attn_implementation not in ATTENTION:
            raise ValueError(
                f"export: ModernBERT with {config._attn_implementation} attention (an unpadded path); "
                f"load it with attn_implementation in {ATTENTION}"
            )
        window = config.sliding_window
        for index, layer in enumerate(root.layers):  # type: ignore[arg-type]
            _check_layer(layer, index, window)
            if layer.attention_type == LOCAL:
                local.append((layer, layer.attn, int(window)))
        if not any(type(m) is ModernBertAttention for m in root.modules()):  # pragma: no cover - defensive
            raise ValueError("export: the ModernBertModel has no attention layers")
    return roots, local


def _check_layer(layer: nn.Module, index: int, window: Any) -> None:
    from transformers.models.modernbert.modeling_modernbert import ModernBertAttention

    kind = getattr(layer, "attention_type", None)
    if kind not in {LOCAL, GLOBAL}:
        raise ValueError(f"export: ModernBERT layer {index} has attention type {kind!r}; known: {LOCAL}, {GLOBAL}")
    if type(layer.attn) is not ModernBertAttention:
        raise ValueError(
            f"export: layer {index} uses {type(layer.attn).__name__}, not ModernBertAttention; refusing to guess it"
        )
    dtypes = {p.dtype for p in layer.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"export: ModernBERT layer {index} is {sorted(map(str, dtypes))}; the op takes float32")
    if kind == LOCAL and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"export: ModernBERT sliding_window {window!r}; the local layers need a positive int")


@contextmanager
def exportable_modernbert(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, every ModernBertModel inside `model` builds its own masks (see `_forward`) and
    each local layer calls our WindowedAttention op. Yields the window of each local layer, in order.
    Restores the model on exit. ValueError, before anything is changed, for what it cannot map."""
    roots, local = _plan(model)
    swaps = [(layer, old, ExportModernBertLocalAttention(old, window)) for layer, old, window in local]
    for layer, _, new in swaps:
        layer.attn = new
    for root in roots:
        root.forward = types.MethodType(_forward, root)  # an instance attribute, removed on exit
    try:
        yield [new.window for _, _, new in swaps]
    finally:
        for layer, old, _ in swaps:
            layer.attn = old
        for root in roots:
            del root.forward


def global_layers(model: nn.Module) -> int:
    """How many full-attention (dense by design) layers the ModernBertModels inside `model` hold."""
    from transformers.models.modernbert.modeling_modernbert import ModernBertEncoderLayer

    return sum(
        isinstance(m, ModernBertEncoderLayer) and getattr(m, "attention_type", None) == GLOBAL for m in model.modules()
    )


def export_modernbert(
    module: nn.Module,
    path: Path,
    *,
    example: dict[str, np.ndarray],
    output_names: tuple[str, ...] = ("last_hidden_state",),
) -> list[int]:
    """Export a module holding a ModernBertModel (a task wrapper called with the `example` arrays
    positionally, as `onnx_export.export_zoo` does) with the dynamo exporter: each local layer's attention
    becomes one ai.edgecompress::WindowedAttention node (function body attached), global layers stay
    standard ops; dynamic batch and sequence axes; checked with onnx.checker and `check_graph` (no S x S
    value but the global layers' scores). Returns each local layer's window. Compare with PyTorch
    afterwards (`onnx_export.check_against_torch`) at several lengths."""
    import onnx

    training = module.training
    module.eval()
    try:
        proto, windows = export_program(
            module, wrapped=False, example=example, output_names=output_names, exportable=exportable_modernbert
        )
    finally:
        module.train(training)
    check_graph(proto, windows, dense_layers=global_layers(module))
    attach_functions(proto)
    onnx.checker.check_model(proto, full_check=True)
    write_atomic(path, proto.SerializeToString())
    return windows
