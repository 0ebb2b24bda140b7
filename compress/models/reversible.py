"""Reversible residual blocks (RevNet, Gomez et al. 2017; Reformer, Kitaev et al. 2020).

    y1 = x1 + F(x2)        x2 = y2 - G(y1)
    y2 = x2 + G(y1)        x1 = y1 - F(x2)

Only the stack's output is kept; backward rebuilds each block's input from its output and recomputes
F and G under autograd, so activation memory does not grow with depth. Dropout draws are replayed by
saving the RNG state before each F and G call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from compress.models.blocks import Block


def reversible_stack(blocks: nn.ModuleList, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Run `blocks` (each with .f(x, mask) and .g(x)) reversibly on two copies of x; returns their mean."""
    params = [p for block in blocks for p in block.parameters()]
    y1, y2 = _Reversible.apply(x, x, key_mask, blocks, *params)
    return (y1 + y2) / 2


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x1: torch.Tensor, x2: torch.Tensor, key_mask: torch.Tensor, blocks: nn.ModuleList, *params: Any
    ) -> Any:
        del params  # inputs only so that autograd routes the parameters' gradients through backward
        states = []
        with torch.no_grad():
            for block in _blocks(blocks):
                f_state = torch.get_rng_state()
                x1 = x1 + block.f(x2, key_mask)
                g_state = torch.get_rng_state()
                x2 = x2 + block.g(x1)
                states.append((f_state, g_state))
        ctx.blocks, ctx.states = blocks, states
        ctx.save_for_backward(x1.detach(), x2.detach(), key_mask)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, dy1: torch.Tensor, dy2: torch.Tensor) -> Any:
        y1, y2, key_mask = ctx.saved_tensors
        params = [p for block in ctx.blocks for p in block.parameters()]
        grads = [torch.zeros_like(p) for p in params]
        offset = len(params)
        for block, (f_state, g_state) in zip(reversed(_blocks(ctx.blocks)), reversed(ctx.states), strict=True):
            count = len(list(block.parameters()))
            offset -= count
            block_params = params[offset : offset + count]
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_()
                with torch.random.fork_rng():
                    torch.set_rng_state(g_state)
                    g = block.g(y1)
                g_grads = torch.autograd.grad(g, [y1, *block_params], dy2, allow_unused=True)
            with torch.no_grad():
                x2 = y2 - g
                dy1 = dy1 + g_grads[0]
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_()
                with torch.random.fork_rng():
                    torch.set_rng_state(f_state)
                    f = block.f(x2, key_mask)
                f_grads = torch.autograd.grad(f, [x2, *block_params], dy1, allow_unused=True)
            with torch.no_grad():
                x1 = y1 - f
                dy2 = dy2 + f_grads[0]
            for i, (gg, fg) in enumerate(zip(g_grads[1:], f_grads[1:], strict=True)):
                for part in (gg, fg):
                    if part is not None:
                        grads[offset + i] += part
            y1, y2 = x1.detach(), x2.detach()
        return (dy1, dy2, None, None, *grads)


def _blocks(blocks: nn.ModuleList) -> list[Block]:
    return [cast("Block", block) for block in blocks]
