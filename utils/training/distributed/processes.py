"""torchrun support: process group set-up, DDP wrapping and the all-reduces of sums and counts."""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """torchrun's variables are set (any number of processes, one included)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def launched_by_torchrun() -> bool:
    return under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1


def setup_distributed(device: torch.device | None, *, join_single: bool = False,
                      timeout_s: float | None = None) -> tuple[DistContext, torch.device]:
    """Join (or start) the process group torchrun prepared; pick this rank's device.

    ``join_single``: join also when torchrun started one process (FSDP shards over a group, even of one).
    ``timeout_s``: how long a collective waits for the other processes, when this call starts the group (a group
    started before keeps its own).
    """
    joins = launched_by_torchrun() or (join_single and under_torchrun())
    if not joins and not (dist.is_available() and dist.is_initialized()):
        return DistContext(), device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s is not None else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank), device


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    if not ctx.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum across ranks (in place); a no-op in one process."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any one (a MAX all-reduce). It reads the result on the host:
    call it only where the ranks synchronise anyway. Rank 0 alone passing its decision makes it a broadcast."""
    if not ctx.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_objects(value, ctx: DistContext) -> list:
    """``value`` of every process, in rank order (pickled; every process takes part)."""
    if not ctx.enabled:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank (pickled; for what is read once, like the metric rows on resume)."""
    if not ctx.enabled:
        return obj
    holder = [obj if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
