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

# torch.distributed is imported only under torchrun (WORLD_SIZE > 1): `edge-compress --help`, check and
# a single-process run's bookkeeping never load torch for it. The DDP wrapping of models is
# compress.training.ddp.


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def rank() -> int:
    if world_size() > 1 and active():
        return int(_dist().get_rank())
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    if world_size() <= 1:
        return False
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def init() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if world_size() > 1 and not _dist().is_initialized():
        _dist().init_process_group(backend="gloo")


def barrier() -> None:
    if active():
        _dist().barrier()


def agree(flag: bool) -> bool:
    """True on every rank only if `flag` is true on every rank (e.g. "this stage is finished")."""
    if not active():
        return flag
    import torch

    dist = _dist()
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
