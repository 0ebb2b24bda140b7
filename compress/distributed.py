"""Data-parallel training under torchrun: PyTorch DDP over gloo (CPU), one or many machines.

`torchrun --nproc_per_node N [--nnodes M ...] $(which edge-compress) run RECIPE` starts N processes
per machine, each running the whole recipe. The training stages (train, distill, prune recovery)
split every global batch across the processes and DDP averages their gradients, so a run takes the
same optimizer steps on the same data as a single process (results agree within float tolerance,
dropout aside). Rank 0 alone writes: run directory, checkpoints, reports. The other ranks write
their stage outputs to a private scratch folder that is deleted at exit, read rank 0's checkpoints
to resume, and stay in step with it through barriers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def barrier() -> None:
    if active():
        dist.barrier()


def agree(flag: bool) -> bool:
    """True on every rank only if `flag` is true on every rank (e.g. "this stage is finished")."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


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
