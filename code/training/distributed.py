"""Single-process and torchrun (DistributedDataParallel) runs share one code path through ``DistContext``.

Under ``torchrun --nproc_per_node=N`` the environment holds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_distributed`` then joins the process group (nccl on CUDA, gloo on CPU) and pins each rank
to ``cuda:LOCAL_RANK``. Without those variables it returns a world of one and touches nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files, logs and TensorBoard events."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the torchrun process group if the environment describes one; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def any_rank_true(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop together)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_over_ranks(value: int, ctx: DistContext) -> int:
    """The largest of every rank's ``value`` (the same on every rank)."""
    if not ctx.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy the module's buffers (BatchNorm running statistics) from rank ``src`` to every rank."""
    if not ctx.enabled:
        return
    buffers = list(module.buffers())
    # one coalesced broadcast per dtype instead of one message per buffer; dtypes in a fixed (sorted) order
    # so every rank issues the same sequence of collectives
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in group:
            n = b.numel()
            b.copy_(flat[offset:offset + n].view_as(b))
            offset += n


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` as a list indexed by rank (a list of one without distribution)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
