"""The process group `torchrun` describes, as the KD engine uses it.

Outside torchrun (or before `init_distributed`) every helper here acts as a world of one process:
rank 0 of 1, gradients and values unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when no process group is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Joins the process group `torchrun` describes in the environment (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def average_gradients(module: nn.Module) -> None:
    """What DDP does for a module it does not wrap: every gradient becomes the mean over the ranks.
    Parameters without a gradient stay without one (every rank runs the same sub-networks)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast(value):
    """rank 0's value (any picklable object) on every rank; the value itself when not distributed."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(value: int, device) -> int:
    """The largest of every rank's integer `value` (on one rank: value)."""
    if world()[1] == 1:
        return value
    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def leave_process_group() -> None:
    """Under torchrun, waits for every rank to finish, then leaves the group. A rank that exits while
    its peers still use the gloo group (rank 0 of `pykd hpo` summarises after the others are done)
    aborted in gloo's destructors at interpreter exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
