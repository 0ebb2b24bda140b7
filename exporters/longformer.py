"""Hugging Face Longformer -> ONNX, its sliding-window attention as ai.edgecompress::WindowedAttention.

Longformer self-attention (transformers' modeling_longformer.py), for a layer with two-sided window
`attention_window` (one side w = attention_window // 2), in eval mode (dropout off):
- a non-global query i attends, with the `query`/`key`/`value` projections, the real non-global keys j
  with |i - j| <= w plus every global key, in one softmax; scores q·k / sqrt(D);
- a global query's row is replaced by attention over every real key with the separate
  `query_global`/`key_global`/`value_global` projections (O(G·S)).
The first part is exactly our op with the layer's w; the second is computed here with standard ops:
gather the G global positions, dense G x S attention, scatter back. Never an S x S matrix.

For the duration of an export (`exportable_longformer`) two things are replaced on the instances:
- LongformerModel.forward, by the same steps without the two that break a dynamic-length graph: the
  padding to a multiple of the window (a Python `if padding_len > 0:` that torch.export specialises on
  the example's length) and the (B, 1, S, S) mask HF materialises only to slice its first row (an
  S x S tensor in the graph). Our op takes any length, so no padding is needed: trailing pad tokens
  change no real token's output (they are masked keys everywhere, and a real token's position id
  counts only the tokens before it);
- each LongformerSelfAttention (chunked `as_strided` code and a data-dependent `if is_global_attn:`).

Anything this module cannot map exactly is a ValueError, never a silently dense graph;
`exporters.hf_attention.sparse_attention_kind` tells the export stage which configs are not dense.
"""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from compress.data.cache import write_atomic
from compress.models import hf
from exporters.dynamo_export import check_graph, export_program
from exporters.hf_attention import sparse_attention_kind
from exporters.ops import attach_functions
from exporters.ops.torch_ops import register_torch_ops

INPUTS = ("input_ids", "attention_mask", "global_attention_mask", "token_type_ids", "position_ids")
OUTPUTS = ("last_hidden_state", "pooler_output")
# LongformerModel.forward's parameters in transformers 5.23, which `_forward` reproduces; checked before
# it is replaced, so that a transformers version whose forward differs is refused, not mis-exported.
_FORWARD_ARGS = (
    "self",
    "input_ids",
    "attention_mask",
    "global_attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "kwargs",
)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, E) -> (B, H, S, D)."""
    b, s, e = x.shape
    return x.view(b, s, heads, e // heads).transpose(1, 2)


class ExportLongformerSelfAttention(nn.Module):
    """LongformerSelfAttention as one WindowedAttention op (local window + global key columns) plus the
    rows of global tokens (their *_global projections) in standard ops. Shares the source's weights."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    query_global: nn.Linear
    key_global: nn.Linear
    value_global: nn.Linear

    def __init__(self, source: Any) -> None:
        super().__init__()
        self.op = register_torch_ops().windowed_attention  # our torch op, registered explicitly
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(self, name, getattr(source, name))
        self.heads = int(source.num_heads)
        self.head_dim = int(source.head_dim)
        self.window = int(source.one_sided_attn_window_size)
        self.dropout = float(source.dropout)
        self.train(source.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        is_index_masked: torch.Tensor | None = None,
        is_index_global_attn: torch.Tensor | None = None,
        is_global_attn: bool | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor]:
        del attention_mask, is_global_attn  # the two boolean masks say the same, with no Python branch
        if output_attentions:
            raise ValueError("export: output_attentions is not supported by the Longformer export")
        if self.training and self.dropout > 0:
            raise ValueError("export: Longformer attention dropout is on (call model.eval() first)")
        if is_index_masked is None or is_index_global_attn is None:
            raise ValueError("export: LongformerSelfAttention needs is_index_masked and is_index_global_attn")
        b, s, e = hidden_states.shape
        real = ~is_index_masked  # (B, S)
        glob = is_index_global_attn & real  # (B, S)
        q = _heads(self.query(hidden_states), self.heads)  # (B, H, S, D), scaled inside the op
        k = _heads(self.key(hidden_states), self.heads)
        v = _heads(self.value(hidden_states), self.heads)
        out = self.op(q, k, v, real, glob, self.window, False)
        out = out.transpose(1, 2).reshape(b, s, e)  # (B, S, E)
        return (self._global_rows(hidden_states, out, real, glob),)

    def _global_rows(
        self, hidden: torch.Tensor, out: torch.Tensor, real: torch.Tensor, glob: torch.Tensor
    ) -> torch.Tensor:
        """Replace the rows of global tokens: their query_global against every real key, with
        key_global/value_global (HF's _compute_global_attn_output_from_hidden), G x S scores."""
        b, s, e = hidden.shape
        # G: the most global tokens of any row (>= 1, so shapes stay valid). Data-dependent: an unbacked
        # size for torch.export (int() would specialise it), TopK's k in ONNX. Rows with fewer global
        # tokens are filled up with non-global positions, whose outputs are kept below.
        g = cast(int, glob.sum(1).max().clamp(min=1).item())
        torch._check(g >= 1)
        torch._check(g <= s)
        gval, gidx = torch.topk(glob.to(hidden.dtype), g, dim=1)  # (B, G)
        gidx_e = gidx[:, :, None].expand(b, g, e)  # (B, G, E)
        qg = self.query_global(torch.gather(hidden, 1, gidx_e)) / math.sqrt(self.head_dim)  # (B, G, E)
        qg = _heads(qg, self.heads)  # (B, H, G, D)
        kg = _heads(self.key_global(hidden), self.heads)  # (B, H, S, D)
        vg = _heads(self.value_global(hidden), self.heads)
        scores = torch.matmul(qg, kg.transpose(-1, -2))  # (B, H, G, S)
        scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min)
        rows = torch.matmul(torch.softmax(scores, dim=-1), vg)  # (B, H, G, D)
        rows = rows.transpose(1, 2).reshape(b, g, e)  # (B, G, E)
        keep = gval[:, :, None] > 0.5  # (B, G, 1): the filler positions keep their windowed output
        rows = torch.where(keep, rows, torch.gather(out, 1, gidx_e))
        return out.scatter(1, gidx_e, rows)


def _forward(  # noqa: PLR0917 (LongformerModel.forward's signature, positional arguments included)
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    global_attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    **kwargs: Any,
) -> Any:
    """LongformerModel.forward (transformers 5.23) without its two length-dependent parts: no padding
    to a multiple of the window (our op takes any length, see the module docstring), and the (B, S)
    extended mask built directly, where HF materialises a (B, 1, S, S) mask and slices its first row."""
    from transformers.models.longformer.modeling_longformer import LongformerBaseModelOutputWithPooling

    if output_attentions or output_hidden_states or kwargs:
        extra = ", ".join(
            ["output_attentions"] * bool(output_attentions)
            + ["output_hidden_states"] * bool(output_hidden_states)
            + list(kwargs)
        )
        raise ValueError(f"export: the Longformer export does not take {extra}")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("export: give exactly one of input_ids and inputs_embeds")
    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]  # type: ignore[union-attr]
    device = input_ids.device if input_ids is not None else inputs_embeds.device  # type: ignore[union-attr]
    if attention_mask is None:
        attention_mask = torch.ones(shape, device=device)
    if token_type_ids is None:
        token_type_ids = torch.zeros(shape, dtype=torch.long, device=device)
    if global_attention_mask is not None:  # 0: padding, 1: local, 2: global (HF's _merge_to_attention_mask)
        attention_mask = attention_mask * (global_attention_mask + 1)
    hidden = self.embeddings(
        input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds
    )  # (B, S, E)
    # HF: padding where clamp(mask, 0, 1) is 0 (mask <= 0) -> dtype min; global where mask == 2 -> dtype max.
    info = torch.finfo(hidden.dtype)
    extended = torch.zeros(shape, dtype=hidden.dtype, device=device)  # (B, S)
    extended = extended.masked_fill(attention_mask <= 0, info.min).masked_fill(attention_mask == 2, info.max)
    encoded = self.encoder(
        hidden, attention_mask=extended, padding_len=0, output_attentions=False, output_hidden_states=False
    )
    sequence = encoded.last_hidden_state  # (B, S, E)
    pooled = self.pooler(sequence) if self.pooler is not None else None
    if return_dict is False or (return_dict is None and not self.config.return_dict):
        return (sequence, pooled)
    return LongformerBaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)


def _check_attention(module: nn.Module, index: int) -> None:
    """Refuse a self-attention module this export does not reproduce exactly."""
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    if type(module) is not LongformerSelfAttention:
        raise ValueError(
            f"export: layer {index} uses {type(module).__name__}, a subclass of LongformerSelfAttention "
            "whose semantics the Longformer export cannot vouch for; refusing it"
        )
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"export: Longformer layer {index} is {sorted(map(str, dtypes))}; the op takes float32")
    window = module.one_sided_attn_window_size
    if not isinstance(window, int) or window <= 0:
        raise ValueError(f"export: Longformer layer {index} has attention window {window}; a positive int is needed")


def _plan(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str, nn.Module]]]:
    """The LongformerModels inside `model` and each (parent, name, LongformerSelfAttention), checked
    before anything is changed: ValueError for what this export cannot reproduce exactly."""
    from transformers.models.longformer.modeling_longformer import LongformerModel, LongformerSelfAttention

    roots: list[nn.Module] = [m for m in model.modules() if isinstance(m, LongformerModel)]
    if not roots:
        raise ValueError(f"export: {type(model).__name__} holds no transformers LongformerModel")
    for root in roots:
        if type(root) is not LongformerModel:
            raise ValueError(f"export: {type(root).__name__} subclasses LongformerModel; refusing to guess its forward")
        if "forward" in vars(root):
            raise ValueError("export: this LongformerModel's forward is already replaced (nested export?)")
    if tuple(inspect.signature(LongformerModel.forward).parameters) != _FORWARD_ARGS:
        raise ValueError(
            "export: this transformers version's LongformerModel.forward is not the one the Longformer "
            "export reproduces (transformers 5.23)"
        )
    layers: list[tuple[nn.Module, str, nn.Module]] = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LongformerSelfAttention)
    ]
    if not layers:
        raise ValueError("export: the LongformerModel has no LongformerSelfAttention layers")
    for index, (_, _, layer) in enumerate(layers):
        _check_attention(layer, index)
    return roots, layers


@contextmanager
def exportable_longformer(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, every LongformerModel inside `model` runs without window padding and every
    LongformerSelfAttention calls our WindowedAttention op (plus the global rows in standard ops).
    Yields the one-sided window of each layer, in order. Restores the model on exit.

    ValueError, before anything is changed, if the model holds no LongformerModel or a layer this
    export cannot reproduce exactly."""
    roots, layers = _plan(model)
    swaps = [(parent, name, old, ExportLongformerSelfAttention(old)) for parent, name, old in layers]
    for parent, name, _, new in swaps:
        setattr(parent, name, new)
    for root in roots:
        root.forward = types.MethodType(_forward, root)  # an instance attribute, removed on exit
    try:
        yield [new.window for _, _, _, new in swaps]
    finally:
        for parent, name, old, _ in swaps:
            setattr(parent, name, old)
        for root in roots:
            del root.forward


def _wrap(model: nn.Module, names: tuple[str, ...], outputs: tuple[str, ...]) -> nn.Module:
    """A LongformerModel as a module of positional (B, S) int64 inputs `names` returning `outputs`."""
    unknown = [n for n in names if n not in INPUTS]
    if unknown or "input_ids" not in names:
        raise ValueError(f"export: example inputs must include input_ids and be among {', '.join(INPUTS)}")
    bad = [n for n in outputs if n not in OUTPUTS]
    if bad or not outputs:
        raise ValueError(f"export: Longformer outputs must be among {', '.join(OUTPUTS)}, got {bad or 'none'}")
    if "pooler_output" in outputs and getattr(model, "pooler", None) is None:
        raise ValueError("export: pooler_output asked for, but the LongformerModel has no pooler")

    class LongformerOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            result = self.model(**dict(zip(names, inputs, strict=True)))
            return tuple(getattr(result, n) for n in outputs)

    return LongformerOutputs().eval()


def load_longformer(folder: Path) -> nn.Module:
    """A Hugging Face Longformer checkpoint folder (safetensors) as a LongformerModel in eval mode."""
    kind = sparse_attention_kind(hf.read_config(folder))
    if kind != "longformer":
        raise ValueError(f"export: {folder} is not a Longformer checkpoint ({kind or 'dense attention'})")
    return hf.load_model(folder)


def export_longformer(
    source: nn.Module | Path | str,
    path: Path,
    *,
    example: dict[str, np.ndarray],
    output_names: tuple[str, ...] = ("last_hidden_state",),
) -> list[int]:
    """Export a Longformer with the dynamo exporter: each layer's sliding-window attention becomes one
    ai.edgecompress::WindowedAttention node (function body attached), global rows standard ops; dynamic
    batch and sequence axes; checked with onnx.checker. Returns each layer's one-sided window.

    source: a checkpoint folder or a LongformerModel (called with the `example` inputs by name, any of
    INPUTS, returning `output_names` from OUTPUTS), or any module holding a LongformerModel (called
    with the example arrays positionally, as `onnx_export.export_zoo` does, e.g. a task wrapper).
    `example`: (B, S) int64 arrays; global tokens are attention_mask 2 or global_attention_mask 1.
    Compare with PyTorch afterwards (`onnx_export.check_against_torch`) at several lengths."""
    import onnx
    from transformers.models.longformer.modeling_longformer import LongformerModel

    model = load_longformer(Path(source)) if isinstance(source, str | Path) else source
    names = tuple(example)
    module = _wrap(model, names, output_names) if isinstance(model, LongformerModel) else model
    training = module.training
    module.eval()
    try:
        proto, windows = export_program(
            module,
            wrapped=module is not model,
            example=example,
            output_names=output_names,
            exportable=exportable_longformer,
        )
    finally:
        module.train(training)
    check_graph(proto, windows)
    attach_functions(proto)
    onnx.checker.check_model(proto, full_check=True)
    write_atomic(path, proto.SerializeToString())
    return windows
