"""DDP for the training loop: the model and its loss wrapped as one module, a global batch split across
the ranks, and a loss averaged over them (compress.distributed has the process group)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from compress.distributed import active


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-rank tensor over the ranks."""
    if not active():
        return value
    out = value.clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


class LossModule(nn.Module):
    """model + loss function as one module, so DDP's forward wraps the whole loss computation."""

    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
        return self.loss_fn(self.model, batch) * weight


def wrap(model: nn.Module, loss_fn: Any) -> nn.Module:
    """A DDP module computing `loss_fn(model, batch) * weight` with gradients averaged across ranks."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(LossModule(model, loss_fn), find_unused_parameters=False)


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's rows of a global batch and the weight that makes DDP's gradient average equal the
    gradient of the global batch's mean loss: (rows here / rows in all) x world size."""
    n = next(iter(batch.values())).shape[0]
    world, me = dist.get_world_size(), dist.get_rank()
    if n < world:  # a tail batch smaller than the world: every rank takes all of it (same gradient)
        return batch, 1.0
    part = {k: v[me::world] for k, v in batch.items()}
    return part, len(range(me, n, world)) * world / n
