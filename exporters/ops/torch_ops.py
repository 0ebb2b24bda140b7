"""The ops as torch custom ops, so torch.export keeps each attention call as one node, and the
dynamo exporter's translations that turn those nodes into ai.edgecompress ops.

Eager calls run the zoo's PyTorch reference; the exporter only traces shapes (register_fake).
`exportable(model)` swaps the zoo's windowed and block-sparse attention modules for modules calling
these ops for the duration of an export. Any attention module it does not know is an error: a
sparse or windowed attention must never reach the graph as something else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from compress.models import attention as zoo
from compress.models import lsh
from exporters.ops.schema import EC, MSFT

# Attention modules whose PyTorch code exports as standard ops with the same meaning.
STANDARD = (zoo.DenseAttention, zoo.LinformerAttention, zoo.KernelizedAttention)


def windowed_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    global_mask: torch.Tensor,
    window: int,
    causal: bool,
) -> torch.Tensor:
    glob = global_mask & key_mask
    return zoo.banded_attention(
        q, k, v, key_mask, window=window, causal=causal, global_mask=glob if bool(glob.any()) else None
    )


def _fake(q: torch.Tensor, *_: Any) -> torch.Tensor:
    return torch.empty_like(q)


def multihead_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Full (global) attention without a mask, ONNX Runtime's com.microsoft::MultiHeadAttention: q, k, v
    and the output (B, S, heads * D). A caller masks keys through the inputs (see exporters.modernbert)."""
    b, s, e = q.shape
    qh, kh, vh = (t.view(b, t.shape[1], heads, e // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(weights, vh).transpose(1, 2).reshape(b, s, e)


def _fake_multihead(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:  # noqa: ARG001
    return torch.empty_like(q)


def _multihead_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:  # noqa: ARG001 (the API)
    q, k, v, heads, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.attrs = (heads, scale)


def _multihead_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    with torch.enable_grad():
        qkv = tuple(t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        dq, dk, dv = torch.autograd.grad(multihead_reference(*qkv, *ctx.attrs), qkv, grad)
    return dq, dk, dv, None, None


def lsh_reference(
    qk: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, rotations: torch.Tensor, chunk: int, causal: bool
) -> torch.Tensor:
    return lsh.lsh_attention(qk, v, key_mask, rotations, chunk=chunk, causal=causal)


def _lsh_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:  # noqa: ARG001 (the API)
    qk, v, mask, rotations, *attrs = inputs
    ctx.save_for_backward(qk, v, mask, rotations)
    ctx.attrs = attrs


def _lsh_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    qk, v, mask, rotations = ctx.saved_tensors
    with torch.enable_grad():
        leaf_qk, leaf_v = (t.detach().requires_grad_(True) for t in (qk, v))
        chunk, causal = ctx.attrs
        out = lsh_reference(leaf_qk, leaf_v, mask, rotations, chunk, causal)
        dqk, dv = torch.autograd.grad(out, (leaf_qk, leaf_v), grad)
    return dqk, dv, None, None, None, None


def block_sparse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    layout: torch.Tensor,
    block: int,
    global_blocks: int,
) -> torch.Tensor:
    nb = q.shape[2] // block
    lay = layout[nb - 1, :nb, :nb]
    return zoo.block_sparse_attention(q, k, v, key_mask, lay, block=block, global_blocks=min(global_blocks, nb))


# Autograd: training through the ops (quantization-aware training trains the exported graph, where each
# attention is one op node). The backward recomputes the PyTorch reference and differentiates it: the
# ops' memory stays O(S·w) in the forward, and the gradient is the reference's exactly.
def _save_inputs(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:  # noqa: ARG001 (the API)
    q, k, v, mask, extra, *attrs = inputs
    ctx.save_for_backward(q, k, v, mask, extra)
    ctx.attrs = attrs


def _grad_of(reference: Any, ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    q, k, v, mask, extra = ctx.saved_tensors
    with torch.enable_grad():
        qkv = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        out = reference(*qkv, mask, extra, *ctx.attrs)
        dq, dk, dv = torch.autograd.grad(out, qkv, grad)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.attrs))


def _windowed_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return _grad_of(windowed_reference, ctx, grad)


def _block_sparse_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return _grad_of(block_sparse_reference, ctx, grad)


@dataclass(frozen=True)
class TorchOps:
    """The torch custom ops (callable; also torch.ops.edgecompress.<name> once registered)."""

    windowed_attention: Any
    block_sparse_attention: Any
    multihead_attention: Any  # exported as ONNX Runtime's com.microsoft::MultiHeadAttention (no mask)
    lsh_attention: Any


_REGISTERED: list[TorchOps] = []


def register_torch_ops() -> TorchOps:
    """Define torch.ops.edgecompress.windowed_attention and .block_sparse_attention: once per process, by
    an explicit call (never as a side effect of an import). exportable() and translation_table() call it."""
    if _REGISTERED:
        return _REGISTERED[0]
    windowed = torch.library.custom_op("edgecompress::windowed_attention", windowed_reference, mutates_args=())
    block_sparse = torch.library.custom_op(
        "edgecompress::block_sparse_attention", block_sparse_reference, mutates_args=()
    )
    for op, backward in ((windowed, _windowed_backward), (block_sparse, _block_sparse_backward)):
        op.register_fake(_fake)
        op.register_autograd(backward, setup_context=_save_inputs)
    multihead = torch.library.custom_op("edgecompress::multihead_attention", multihead_reference, mutates_args=())
    multihead.register_fake(_fake_multihead)
    multihead.register_autograd(_multihead_backward, setup_context=_multihead_context)
    lsh_op = torch.library.custom_op("edgecompress::lsh_attention", lsh_reference, mutates_args=())
    lsh_op.register_fake(_fake)
    lsh_op.register_autograd(_lsh_backward, setup_context=_lsh_context)
    _REGISTERED.append(TorchOps(windowed, block_sparse, multihead, lsh_op))
    return _REGISTERED[0]


def _windowed_onnx(q: Any, k: Any, v: Any, key_mask: Any, global_mask: Any, window: int, causal: bool) -> Any:
    return EC.WindowedAttention(q, k, v, key_mask, global_mask, window=window, causal=int(causal))


def _block_sparse_onnx(q: Any, k: Any, v: Any, key_mask: Any, layout: Any, block: int, global_blocks: int) -> Any:
    return EC.BlockSparseAttention(q, k, v, key_mask, layout, block_size=block, global_blocks=global_blocks)


def _multihead_onnx(q: Any, k: Any, v: Any, heads: int, scale: float) -> Any:
    return MSFT.MultiHeadAttention(q, k, v, num_heads=heads, scale=scale)


def _lsh_onnx(qk: Any, v: Any, key_mask: Any, rotations: Any, chunk: int, causal: bool) -> Any:
    return EC.LSHAttention(qk, v, key_mask, rotations, chunk=chunk, causal=int(causal))


def translation_table() -> dict[Any, Any]:
    """custom_translation_table for torch.onnx.export(dynamo=True)."""
    register_torch_ops()
    return {
        torch.ops.edgecompress.windowed_attention.default: _windowed_onnx,
        torch.ops.edgecompress.block_sparse_attention.default: _block_sparse_onnx,
        torch.ops.edgecompress.multihead_attention.default: _multihead_onnx,
        torch.ops.edgecompress.lsh_attention.default: _lsh_onnx,
    }


class ExportWindowed(nn.Module):
    """Windowed attention as one ai.edgecompress::WindowedAttention node."""

    def __init__(self, cfg: zoo.AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if global_mask is None:
            global_mask = zoo.leading_globals(key_mask, self.cfg.global_tokens)
        if global_mask is None:
            global_mask = torch.zeros_like(key_mask)
        return torch.ops.edgecompress.windowed_attention(
            q, k, v, key_mask, global_mask, self.cfg.window, self.cfg.causal
        )


class ExportBlockSparse(nn.Module):
    """Block-sparse attention as one ai.edgecompress::BlockSparseAttention node; the layout of every
    block count up to the model's longest sequence is a constant (T, T, T) table."""

    layouts: torch.Tensor

    def __init__(self, source: zoo.BlockSparseAttention, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg = source.cfg
        t = -(-max_len // cfg.block)
        table = torch.zeros(t, t, t, dtype=torch.bool)
        for nb in range(1, t + 1):
            table[nb - 1, :nb, :nb] = source.layout(nb)
        self.register_buffer("layouts", table, persistent=False)
        self.global_blocks = -(-cfg.global_tokens // cfg.block)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if global_mask is not None:
            raise ValueError("block_sparse attention takes its global tokens from attention.global_tokens")
        return torch.ops.edgecompress.block_sparse_attention(
            q, k, v, key_mask, self.layouts, self.cfg.block, self.global_blocks
        )


class ExportLSH(nn.Module):
    """LSH attention as one ai.edgecompress::LSHAttention node; its saved rotations become a constant."""

    rotations: torch.Tensor

    def __init__(self, source: lsh.LSHAttention) -> None:
        super().__init__()
        self.cfg = source.cfg
        self.register_buffer("rotations", source.rotations.detach().clone(), persistent=False)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,  # noqa: ARG002 (the same tensor as q: queries and keys are shared)
        v: torch.Tensor,
        key_mask: torch.Tensor,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if global_mask is not None:
            raise ValueError("LSH attention has no global tokens")
        return torch.ops.edgecompress.lsh_attention(q, v, key_mask, self.rotations, self.cfg.chunk, self.cfg.causal)


def _replacement(module: nn.Module, max_len: int) -> nn.Module | None:
    """The export form of an attention module; None to keep it (standard ops); an error if unknown."""
    kind = type(module)  # exact types: a subclass may compute something else
    if kind is zoo.WindowedAttention:
        return ExportWindowed(cast(zoo.WindowedAttention, module).cfg)
    if kind is zoo.BlockSparseAttention:
        return ExportBlockSparse(module, max_len)  # type: ignore[arg-type]
    if kind is lsh.LSHAttention:
        return ExportLSH(cast(lsh.LSHAttention, module))
    if kind in STANDARD:
        return None
    raise ValueError(
        f"export: attention module {type(module).__name__} is not one the exporter knows; "
        "refusing to export it (it could come out as dense attention)"
    )


@contextmanager
def exportable(model: nn.Module, max_len: int) -> Iterator[list[str]]:
    """Within the block, the model's windowed/block-sparse attention calls our custom ops. Yields the
    kinds found per layer (e.g. ["windowed", "windowed"]); restores the modules on exit."""
    register_torch_ops()
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    kinds: list[str] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, zoo.Attention):
                continue
            kinds.append(child.cfg.kind)
            new = _replacement(child, max_len)
            if new is not None:
                swaps.append((parent, name, child))
                setattr(parent, name, new)
    try:
        yield kinds
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
