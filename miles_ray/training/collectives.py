"""Every collective a trainer rank issues, in one module: the process group's set-up, the rank's
place in it, and the small reductions of counts and metrics (sums, maxima) that the trainers,
critic, SFT and megatron steps share.

Rules this module owns (torch.distributed): a collective's tensor must live on a device the
group's backend covers; tensors are made here on :func:`device`, never by the callers.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str = "gloo") -> None:
    if dist.is_initialized():
        return
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float]) -> list[float]:
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: int | float) -> int | float:
    """The maximum over ranks (ints stay ints)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long if isinstance(value, int) else torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
