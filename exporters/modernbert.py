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
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from compress.data.cache import write_atomic
from exporters.dynamo_export import check_graph, export_program
from exporters.hf_attention import GLOBAL, LOCAL
from exporters.ops import attach_functions
from exporters.ops.torch_ops import register_torch_ops

ATTENTION = ("eager", "sdpa")  # the padded implementations (flash-attention-2 would unpad)
MASKED = -1e30  # a padded key's extra coordinate: its scores become about -1e29, exp() exactly 0


class ExportModernBertAttention(nn.Module):
    """A ModernBERT layer's attention (projections and rotary embedding in standard ops) as one op: a
    local layer (`window` set) as our WindowedAttention, a global layer (`window` None) as ONNX Runtime's
    MultiHeadAttention, which runs tiled (flash) on CPU, O(S) memory, but only when given no mask. The
    padding mask goes in through the inputs instead: one more head dimension, 1 for every query and
    0 / -1e30 for a real / padded key, adds exactly 0 or -1e30 to each score (value 0 there, sliced off).
    Shares the source's weights; returns (output, None) like the source."""

    Wqkv: nn.Linear
    Wo: nn.Linear

    def __init__(self, source: Any, window: int | None) -> None:
        super().__init__()
        ops = register_torch_ops()
        self.windowed, self.multihead = ops.windowed_attention, ops.multihead_attention
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
            raise ValueError("export: a ModernBERT layer needs the (B, S) real-token mask")
        if position_embeddings is None:
            raise ValueError("export: a ModernBERT layer needs its rotary position embeddings")
        b, s, e = hidden_states.shape
        qkv = self.Wqkv(hidden_states).view(b, s, 3, e // self.head_dim, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (B, H, S, D)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        if self.window is not None:
            out = self.windowed(q, k, v, attention_mask, torch.zeros_like(attention_mask), self.window, False)
            out = out.transpose(1, 2).reshape(b, s, e)
        else:
            out = self._global(q, k, v, attention_mask)
        return self.out_drop(self.Wo(out)), None

    def _global(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Full attention over the real keys, no mask input: (B, H, S, D) each -> (B, S, H * D)."""
        b, h, s, d = q.shape
        one = torch.ones_like(q[..., :1])
        bias = torch.zeros_like(one).masked_fill(~real[:, None, :, None], MASKED)  # (B, H or 1, S, 1)
        q1, k1, v1 = torch.cat([q, one], -1), torch.cat([k, bias.expand_as(one)], -1), torch.cat([v, 0 * one], -1)
        flat = [t.transpose(1, 2).reshape(b, s, h * (d + 1)) for t in (q1, k1, v1)]
        out = self.multihead(*flat, h, float(d) ** -0.5)  # (B, S, H * (D + 1))
        return out.view(b, s, h, d + 1)[..., :d].reshape(b, s, h * d)


def _forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """ModernBertModel.forward with its masks made here: the (B, S) real-token mask, which every swapped
    layer reads (transformers would build an S x S band mask and an S x S full mask)."""
    if isinstance(attention_mask, dict):
        raise ValueError("export: the ModernBERT export builds the attention masks itself; pass a (B, S) mask")
    source = input_ids if input_ids is not None else inputs_embeds
    if source is None:
        raise ValueError("export: give input_ids or inputs_embeds")
    shape = source.shape[:2]
    real = torch.ones(shape, dtype=torch.bool, device=source.device) if attention_mask is None else attention_mask > 0
    masks = {LOCAL: real, GLOBAL: real}
    cls = type(self)
    return cls.forward(
        self,
        input_ids=input_ids,
        attention_mask=masks,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        **kwargs,
    )


def _plan(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, nn.Module, int | None]]]:
    """The ModernBertModels inside `model` and each layer's (layer, attention, window; None: global), checked
    before anything is changed: ValueError for what this export cannot reproduce exactly."""
    from transformers.models.modernbert.modeling_modernbert import ModernBertModel

    roots: list[nn.Module] = [m for m in model.modules() if isinstance(m, ModernBertModel)]
    if not roots:
        raise ValueError(f"export: {type(model).__name__} holds no transformers ModernBertModel")
    layers: list[tuple[nn.Module, nn.Module, int | None]] = []
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
        for index, layer in enumerate(cast(nn.ModuleList, root.layers)):
            _check_layer(layer, index, window)
            attn = cast(nn.Module, layer.attn)
            layers.append((layer, attn, int(window) if layer.attention_type == LOCAL else None))
    if not layers:  # every layer was checked above; a model with none has nothing to export
        raise ValueError("export: the ModernBertModel has no attention layers")
    return roots, layers


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
    """Within the block, every ModernBertModel inside `model` builds its own mask (see `_forward`), each
    local layer calls our WindowedAttention op and each global layer ONNX Runtime's MultiHeadAttention.
    Yields the window of each local layer, in order. Restores the model on exit. ValueError, before
    anything is changed, for what it cannot map."""
    roots, layers = _plan(model)
    swaps = [(layer, old, ExportModernBertAttention(old, window)) for layer, old, window in layers]
    for layer, _, new in swaps:
        layer.attn = new
    for root in roots:
        root.forward = types.MethodType(_forward, root)  # an instance attribute, removed on exit
    try:
        yield [new.window for _, _, new in swaps if new.window is not None]
    finally:
        for layer, old, _ in swaps:
            layer.attn = old
        for root in roots:
            del root.forward


def global_layers(model: nn.Module) -> int:
    """How many full-attention layers the ModernBertModels inside `model` hold."""
    from transformers.models.modernbert.modeling_modernbert import ModernBertEncoderLayer

    return sum(
        isinstance(m, ModernBertEncoderLayer) and getattr(m, "attention_type", None) == GLOBAL for m in model.modules()
    )


def check_global_layers(model: Any, expected: int) -> None:
    """One unmasked com.microsoft::MultiHeadAttention per global layer (a mask input would switch ONNX
    Runtime to its O(S^2) path). ValueError otherwise."""
    nodes = [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "MultiHeadAttention"]
    masked = [n.name for n in nodes if len([i for i in n.input if i]) != 3]
    if len(nodes) != expected or masked:
        raise ValueError(
            f"export: {len(nodes)} MultiHeadAttention nodes ({len(masked)} with a mask), expected {expected} unmasked, "
            "one per global layer"
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
    becomes one ai.edgecompress::WindowedAttention node (function body attached), each global layer's one
    com.microsoft::MultiHeadAttention node; dynamic batch and sequence axes; checked with onnx.checker and
    `check_graph` (no S x S value anywhere). Returns each local layer's window. Compare with PyTorch
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
    check_graph(proto, windows)
    check_global_layers(proto, global_layers(module))
    attach_functions(proto)
    onnx.checker.check_model(proto, full_check=True)
    write_atomic(path, proto.SerializeToString())
    return windows
