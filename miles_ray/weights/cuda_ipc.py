"""CUDA IPC handles for colocated trainer and engine on the same GPU (GPU only).

The trainer keeps the flat bucket alive and sends a handle; the engine opens it and copies. The
CPU twin of this path is the object-store transport (same buckets, same ``load_bucket``).
"""
from __future__ import annotations

import torch

from miles_ray.weights.buckets import Bucket


def available() -> bool:
    return torch.cuda.is_available()


def export_handles(buckets: list[Bucket]) -> tuple[list, list]:
    """Serializable (meta, handle) per bucket, plus the CUDA tensors the caller must keep alive
    until every engine has loaded them."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not available():
        raise RuntimeError("CUDA IPC weight sync needs CUDA; use weight_sync.transport=object_store on CPU")
    keep = [b.flat.cuda() for b in buckets]
    return [(b.meta(), reduce_tensor(t)) for b, t in zip(buckets, keep)], keep


def import_handles(items: list[tuple]) -> list[Bucket]:
    out = []
    for meta, (rebuild, args) in items:
        flat = rebuild(*args)
        out.append(Bucket(meta["version"], meta["index"], meta["count"], meta["dtype"], flat, meta["entries"]))
    return out
