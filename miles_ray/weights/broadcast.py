"""torch.distributed broadcast channel between trainer rank 0 (rank 0 here) and the engines.

A stand-alone process group (its own TCPStore), so it coexists with the trainers' data-parallel
group: gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from miles_ray.weights.buckets import Bucket


class BroadcastChannel:
    def __init__(self, rank: int, world_size: int, addr: str, port: int, backend: str = "gloo", timeout_s: float = 300):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        self.store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        else:  # pragma: no cover - GPU only
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size)
        self.device = "cpu" if backend == "gloo" else "cuda"

    def broadcast(self, tensor: torch.Tensor) -> None:
        """One broadcast from rank 0 (sender: ``tensor`` is sent; receiver: filled in place)."""
        self._broadcast(tensor)

    def send_tensors(self, buckets: list[Bucket]) -> None:
        """SGLang's update_weights_from_distributed order: one broadcast per tensor, in bucket order
        (views of the bucket buffers: nothing is copied on the sender)."""
        from miles_ray.weights.buckets import iter_tensors

        for b in buckets:
            flat = b.flat if b.flat.device.type == self.device or self.device == "cpu" else b.flat.to(self.device)
            for _, t in iter_tensors(Bucket(b.version, b.index, b.count, b.dtype, flat, b.entries)):
                self._broadcast(t)

    def close(self) -> None:
        self.group = None
        self.store = None

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()

    def send(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            self._broadcast(b.flat.to(self.device))

    def receive(self, metas: list[dict]) -> list[Bucket]:
        out = []
        for m in metas:
            flat = torch.empty(m["numel"], dtype=m["dtype"], device=self.device)
            self._broadcast(flat)
            out.append(Bucket(m["version"], m["index"], m["count"], m["dtype"], flat.cpu() if self.device != "cpu"
                              else flat, m["entries"]))
        return out
