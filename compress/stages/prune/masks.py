"""Magnitude pruning masks: unstructured (layer-wise or global), N:M, and blocks.

A mask is a bool tensor the shape of a weight, True where the weight is kept. Ties at the threshold are
broken by position so that the kept count is exact.
"""

from __future__ import annotations

import math

import torch


def keep_count(numel: int, sparsity: float) -> int:
    """Weights kept for a target sparsity: round(numel · (1 - sparsity)), never below 1."""
    return max(1, numel - round(numel * sparsity))


def unstructured(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-|w| weights; exactly round(numel · sparsity) are pruned."""
    flat = weight.detach().abs().flatten()
    keep = keep_count(flat.numel(), sparsity)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(weight)


def global_thresholds(
    weights: dict[str, torch.Tensor], sparsity: float, min_sparsity: float, max_sparsity: float
) -> dict[str, float]:
    """Per-layer sparsities from one global magnitude ranking, clamped to [min, max] per layer.

    The clamp moves the budget: a layer held at max_sparsity keeps weights another layer then gives up,
    by re-ranking the remaining layers for the remaining budget (a few passes converge).
    """
    sizes = {name: w.numel() for name, w in weights.items()}
    total = sum(sizes.values())
    target = round(total * sparsity)
    fixed: dict[str, float] = {}
    for _ in range(len(weights) + 1):
        free = [n for n in weights if n not in fixed]
        if not free:
            break
        budget = target - sum(round(sizes[n] * s) for n, s in fixed.items())
        scores = torch.cat([weights[n].detach().abs().flatten() for n in free])
        count = min(max(budget, 0), scores.numel())
        threshold = torch.kthvalue(scores, count).values.item() if count else -math.inf
        proposal = {n: float((weights[n].detach().abs() <= threshold).float().mean()) for n in free}
        clamped = {n: min(max(s, min_sparsity), max_sparsity) for n, s in proposal.items()}
        moved = {n: s for n, s in clamped.items() if s != proposal[n]}
        if not moved:
            fixed.update(proposal)
            break
        fixed.update(moved)
    return fixed


def n_of_m(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest-|w| of every m consecutive weights along the input dimension (2:4 = n=2, m=4)."""
    out_features, in_features = weight.shape
    if in_features % m:
        raise ValueError(f"N:M pruning needs in_features divisible by M={m}; this layer has {in_features}")
    groups = weight.detach().abs().reshape(out_features, in_features // m, m)
    top = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(out_features, in_features)


def blocks(weight: torch.Tensor, shape: tuple[int, int], sparsity: float) -> torch.Tensor:
    """Keep the (rows x cols) blocks with the largest L1 norm; exactly round(#blocks · sparsity) pruned."""
    rows, cols = shape
    out_features, in_features = weight.shape
    if out_features % rows or in_features % cols:
        raise ValueError(f"block {rows}x{cols} does not tile a {out_features}x{in_features} weight")
    norms = weight.detach().abs().reshape(out_features // rows, rows, in_features // cols, cols).sum((1, 3))
    keep = unstructured(norms, sparsity)  # (out/rows, in/cols)
    return keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta 2017: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3, flat outside [t0, t1]."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1 - progress) ** 3
