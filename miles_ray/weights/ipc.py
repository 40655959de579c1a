"""Same-node weight handoff by handle: CUDA IPC on a GPU (``cuda_ipc``, colocated trainer and
engine) and POSIX shared memory on CPU (``shm``, its CPU twin, also the fastest CPU transport).

The trainer's bucket buffers are persistent (reused across versions), so a handle is made once
and the engine maps it once; each sync is then one copy in (trainer) and one copy out (engine).
Handles are torch's multiprocessing pickles (a CUDA IPC handle or an shm file name), shipped as
bytes, so any RPC (Ray) can carry them.
"""
from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

from miles_ray.weights.buckets import Bucket

torch.multiprocessing.set_sharing_strategy("file_system")  # shm by file name: works between unrelated processes


def export_handles(buckets: list[Bucket], device: str) -> list[tuple[dict, bytes]]:
    """(meta, handle bytes) per bucket. ``device`` 'cpu' moves buffers to shared memory once;
    'cuda' needs CUDA buffers. The caller keeps ``buckets`` alive (and unchanged) until loaded."""
    out = []
    for b in buckets:
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("weight_sync.transport=cuda_ipc needs CUDA; use shm or object_store on CPU")
            if not b.flat.is_cuda:
                b.flat = b.flat.cuda()
        elif not b.flat.is_shared():
            b.flat.share_memory_()
        out.append((b.meta(), bytes(ForkingPickler.dumps(b.flat))))
    return out


class HandleReader:
    """Engine side: opens handles, caching the mapping of each buffer across syncs."""

    def __init__(self):
        self._cache: dict[bytes, torch.Tensor] = {}

    def open(self, items: list[tuple[dict, bytes]], keep: bool = False) -> list[Bucket]:
        """Buckets for ``items``; ``keep`` adds to the cache instead of replacing it (streaming)."""
        live = dict(self._cache) if keep else {}
        out = []
        for meta, handle in items:
            flat = self._cache.get(handle)
            if flat is None:
                flat = ForkingPickler.loads(handle)
            live[handle] = flat
            out.append(Bucket(meta["version"], meta["index"], meta["count"], meta["dtype"], flat, meta["entries"]))
        self._cache = live  # drop mappings of buffers no longer sent
        return out
