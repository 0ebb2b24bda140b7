"""Masks kept (and, on the gradual schedule, tightened) while a pruned model trains.

After every optimizer step the keeper multiplies each pruned weight by its mask, so AdamW cannot
grow a pruned weight back. On the gradual schedule (Zhu & Gupta 2017) the sparsity of every layer
is `target x ramp(t)`, with ramp(t) rising from 0 to 1 along the cubic curve over the first
`ramp_steps` steps; masks are recomputed by magnitude every `frequency` steps and at the end of
the ramp. Recomputing from the current weights is deterministic, so a resumed run rebuilds the
same masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.stages.prune import masks

MaskFn = Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]]


class MaskKeeper:
    def __init__(
        self,
        names: list[str],
        make_masks: MaskFn,
        *,
        ramp_steps: int,
        frequency: int,
        root: Callable[[Any], nn.Module],
    ) -> None:
        """make_masks(weights by name, ramp fraction in [0, 1]) -> masks by name."""
        self.names, self.make_masks = names, make_masks
        self.ramp_steps, self.frequency, self.root = ramp_steps, frequency, root
        self.masks: dict[str, torch.Tensor] | None = None
        self.fraction = -1.0

    def ramp(self, step: int) -> float:
        return masks.cubic_sparsity(step, 0, self.ramp_steps, 0.0, 1.0) if self.ramp_steps else 1.0

    @torch.no_grad()
    def __call__(self, model: Any, step: int) -> None:
        modules = dict(self.root(model).named_modules())
        weights = {name: modules[name].weight for name in self.names}
        due = step % self.frequency == 0 or step >= self.ramp_steps
        # A resumed run (no masks yet, between updates) rebuilds the masks of the last update: the weights
        # they zeroed are still zero (hence the smallest), so the magnitude masks come out the same.
        resumed = self.masks is None and not due
        fraction = self.ramp(step - step % self.frequency if resumed else step)
        if self.masks is None or (due and fraction != self.fraction):
            self.masks = self.make_masks({n: w.detach() for n, w in weights.items()}, fraction)
            self.fraction = fraction
        for name, w in weights.items():
            w.mul_(self.masks[name])

    def eligible(self, step: int) -> bool:
        """An epoch ending at `step` may be the best one only at full sparsity."""
        return step >= self.ramp_steps
