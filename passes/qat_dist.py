"""Multi-process QAT: torch DistributedDataParallel over gloo (CPU).

Under `torchrun` (WORLD_SIZE > 1 in the environment) the first `qat` pass joins the process
group (gloo; MASTER_ADDR/PORT, RANK, WORLD_SIZE come from torchrun) and leaves it open for
the rest of the script. Each process trains the same IR on its own share of the batches
(process r of w takes batch step * w + r); DDP averages the gradients, so every process
holds the same tensors after every step. Process 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world(mode: str = "auto") -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes if not yet joined."""
    if mode == "off" or not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(module: torch.nn.Module, world_size: int, find_unused: bool) -> torch.nn.Module:
    if world_size <= 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, broadcast_buffers=False, find_unused_parameters=find_unused)


def mean(value: torch.Tensor, world_size: int) -> float:
    """The mean of a scalar over all processes (NaN anywhere gives NaN everywhere)."""
    v = value.detach().float().reshape(1).clone()
    if world_size > 1:
        dist.all_reduce(v)
        v /= world_size
    return float(v)


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()

