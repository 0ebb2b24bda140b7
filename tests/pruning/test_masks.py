"""Pruning masks: exact sparsity, N:M validity group by group, blocks, global budgets, the cubic schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress.stages.prune import masks


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.97])
def test_unstructured_exact_sparsity_even_with_ties(sparsity: float) -> None:
    w = torch.randint(-3, 4, (64, 48)).float()  # many ties at the threshold
    mask = masks.unstructured(w, sparsity)
    assert int((~mask).sum()) == round(w.numel() * sparsity)
    kept, dropped = w[mask].abs(), w[~mask].abs()
    if dropped.numel():
        assert kept.min() >= dropped.max()  # the largest magnitudes are the ones kept


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_n_of_m_every_group(n: int, m: int) -> None:
    w = torch.randn(16, 32)
    mask = masks.n_of_m(w, n, m)
    groups = mask.reshape(16, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    values = w.abs().reshape(16, 32 // m, m)
    kept_min = values.masked_fill(~groups, float("inf")).min(-1).values
    dropped_max = values.masked_fill(groups, -1).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_n_of_m_needs_divisible_inputs() -> None:
    with pytest.raises(ValueError, match="divisible by M=4"):
        masks.n_of_m(torch.randn(4, 6), 2, 4)


@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (2, 2)])
def test_blocks_are_whole_and_exact(shape: tuple[int, int]) -> None:
    w = torch.randn(32, 64)
    mask = masks.blocks(w, shape, 0.5)
    r, c = shape
    tiles = mask.reshape(32 // r, r, 64 // c, c)
    per_block = tiles.sum((1, 3))
    assert ((per_block == 0) | (per_block == r * c)).all()  # a block is kept or pruned whole
    assert int((per_block == 0).sum()) == round(per_block.numel() * 0.5)


def test_global_scope_spends_one_budget_and_respects_clamps() -> None:
    torch.manual_seed(0)
    weights = {"small": torch.randn(100, 10) * 0.01, "large": torch.randn(100, 10)}
    free = masks.global_thresholds(weights, 0.5, 0.0, 0.99)
    assert free["small"] > 0.95 and free["large"] < 0.1  # one ranking: the small layer goes first
    clamped = masks.global_thresholds(weights, 0.5, 0.0, 0.8)
    assert clamped["small"] == pytest.approx(0.8)
    assert (clamped["small"] + clamped["large"]) / 2 == pytest.approx(0.5, abs=0.01)  # budget moved


def test_cubic_schedule_curve() -> None:
    curve = [masks.cubic_sparsity(t, 10, 110, 0.0, 0.8) for t in range(0, 130, 10)]
    assert curve[:2] == [0.0, 0.0] and curve[-2:] == [0.8, 0.8]
    steps = [b - a for a, b in itertools.pairwise(curve)][1:-2]
    assert all(s > 0 for s in steps) and steps == sorted(steps, reverse=True)  # fast first, then slower
    assert masks.cubic_sparsity(60, 10, 110, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
