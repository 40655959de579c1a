"""The engine's KV cache layout, shared by the native engine and the row-invariant forward of
:mod:`miles_ray.models.exact` (which must read the same layout).

Invariant: slot ``s`` holds ``lengths[s]`` valid positions; ``copy_slot`` and ``grown`` keep them.
"""
from __future__ import annotations

import torch


class SlotCache:
    """K/V of ``[layers, slots, kv_heads, capacity, head_dim]`` and a length per slot."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def grown(self, slots: int, capacity: int) -> "SlotCache":
        """A larger cache holding this one's contents."""
        L, S, H, C, D = self.k.shape
        new = SlotCache(L, max(S, slots), H, D, max(C, capacity), self.k.dtype, self.k.device)
        new.k[:, :S, :, :C] = self.k
        new.v[:, :S, :, :C] = self.v
        new.lengths[:S] = self.lengths
        return new

    def copy_slot(self, src: int, dst: int) -> None:
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
