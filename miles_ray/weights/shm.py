"""``shm``: same node, CPU, by handle to POSIX shared memory (the CPU twin of CUDA IPC, and the
fastest CPU transport). Rank 0's bucket buffers move to shared memory once and are reused every
version; after an export the live parameters become views into them (:func:`adopt_buffers`), so
the next export copies nothing and the engines load straight from the trainer's memory."""
from __future__ import annotations

from miles_ray.weights.ipc import HandleTransport
from miles_ray.weights.registry import WEIGHT_TRANSPORTS


@WEIGHT_TRANSPORTS.register("shm")
class ShmTransport(HandleTransport):
    device, label = "cpu", "shm"

    def finish_export(self, trainer) -> None:
        super().finish_export(trainer)
        adopt = getattr(trainer, "adopt_export_buffers", None)  # trainers that can (FSDP, one rank)
        if adopt is not None:
            adopt()


def adopt_buffers(params: dict, buckets: list) -> int:
    """Make the CPU tensors ``params`` (name -> parameter, ``state_dict(keep_vars=True)``) views into
    the shared-memory ``buckets`` that hold their values; a tied duplicate keeps its copy, a tensor
    whose device, dtype or shape does not fit is left alone. Returns parameters adopted."""
    seen = set()
    for b in buckets:
        if not b.flat.is_shared():
            continue
        for name, shape, offset, numel in b.entries:
            p = params.get(name)
            fits = p is not None and p.device.type == "cpu" and p.dtype == b.dtype and tuple(p.shape) == tuple(shape)
            if fits and id(p) not in seen:
                seen.add(id(p))
                p.data = b.flat[offset:offset + numel].view(shape)
    return len(seen)
