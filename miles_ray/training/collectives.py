"""Every collective a trainer rank issues, in one module: the process group's set-up, the rank's
place in it, the small reductions of counts and metrics (sums, maxima) that the trainers, critic,
SFT and megatron steps share, and the tensor / object collectives of the megatron backend (its
gradient reduction and norm, export tables, checkpoint barrier). Nothing under
``miles_ray/training`` calls ``torch.distributed`` collectives directly.

Rule (torch.distributed): a collective's tensor must live on a device the group's backend covers;
a group created as bare ``nccl`` covers CUDA only and refuses CPU tensors ("No backend type
associated with device type cpu").

Choice: **the group covers CPU too.** On GPUs a trainer group is created as
``cpu:gloo,cuda:nccl`` (:data:`GROUP_BACKENDS`), so CUDA tensors (DDP / FSDP2 gradient
reductions, all-gathers, megatron's TP / PP traffic) go over NCCL and CPU tensors over gloo.
Why this and not "every tensor on the rank's device":
- the reductions here are of Python numbers (token counts, metrics): on CPU they cost no
  host-to-device copy and no device sync per metric;
- torch's object collectives and ``barrier`` on a group with a CPU backend use it (no pickles
  staged through GPU memory), and library code (DCP, megatron's checkpointing) issues CPU
  collectives that we do not control;
- megatron's model-parallel groups are made with the default backend and inherit the CPU
  backend, so the norm of :mod:`miles_ray.training.megatron.grads` may live on any device;
- it is one rule, decided once at :func:`init_distributed`, instead of a convention every
  caller must keep.
Weight-sync broadcast groups (``miles_ray/weights``) are created elsewhere and are not covered.

Test mode (``init_distributed(..., emulate=True)``): the group is created with the *same device
coverage* as on the real machine, every backend replaced by gloo (:func:`emulated`): ``nccl``
becomes ``cuda:gloo``, so torch itself refuses CPU tensors on a CPU-only machine exactly as
NCCL would; ``cpu:gloo,cuda:nccl`` becomes ``cpu:gloo,cuda:gloo``.
"""
from __future__ import annotations

import datetime
import json
import os

import torch
import torch.distributed as dist

# what a trainer group is created with, per backend that :func:`actors.common.dist_backend` names
GROUP_BACKENDS = {"nccl": "cpu:gloo,cuda:nccl", "gloo": "gloo"}
OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
TIMEOUT = datetime.timedelta(minutes=10)


def group_backend(backend: str) -> str:
    """The backend spec a trainer group is created with (a ``device:backend`` spec passes as is)."""
    return backend if ":" in backend else GROUP_BACKENDS.get(backend, backend)


def device_backends(spec: str) -> dict[str, str]:
    """``"cpu:gloo,cuda:nccl"`` -> ``{"cpu": "gloo", "cuda": "nccl"}``; a bare name covers its devices."""
    out: dict[str, str] = {}
    for part in spec.split(","):
        dev, _, name = part.strip().rpartition(":")
        for d in (dev,) if dev else dist.Backend.backend_capability.get(name, ("cpu",)):  # torch's registry
            out[d] = name
    return out


def emulated(spec: str) -> str:
    """The CPU test mode's spec: the device coverage of ``spec``, each backend replaced by gloo."""
    return ",".join(f"{d}:gloo" for d in device_backends(spec))


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str = "gloo",
                     emulate: bool = False) -> None:
    """Join the trainer group (idempotent). ``backend`` as :func:`actors.common.dist_backend` names
    it; :func:`group_backend` widens it. ``emulate``: the test mode (module docstring)."""
    if dist.is_initialized():
        return
    spec = group_backend(backend)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
    dist.init_process_group(emulated(spec) if emulate else spec, rank=rank, world_size=world_size, timeout=TIMEOUT)


def init_single_process() -> None:
    """A world of one over gloo (megatron needs a group even on one process); idempotent."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def covers(device_type: str, group=None) -> bool:
    """Whether ``group``'s backend takes tensors of ``device_type`` (False without a group)."""
    return is_initialized() and device_type in device_backends(dist.get_backend_config(group))


def world(group=None) -> tuple[int, int]:
    """(rank, size) in ``group`` (default: the world); (0, 1) without a process group."""
    if is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_sum(values: list[float], group=None) -> list[float]:
    """Element-wise sums over ranks, in float64, on CPU (module docstring: the group covers CPU)."""
    if world(group)[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_max(value: int | float, group=None) -> int | float:
    """The maximum over ranks (ints stay ints)."""
    if world(group)[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long if isinstance(value, int) else torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` (``op``: a key of :data:`OPS`); returns it."""
    if world(group)[1] > 1:
        dist.all_reduce(tensor, op=OPS[op], group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in rank order."""
    size = world(group)[1]
    if size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def all_gather_uneven(tensor: torch.Tensor, sizes: list, group=None) -> torch.Tensor:
    """Every rank's ``tensor`` (``sizes[r]`` rows on rank ``r``, the rest of the shape equal)
    concatenated along dim 0 in rank order. Padded to the largest part and gathered in one
    equal-size all-gather: gloo refuses parts of different sizes (``ProcessGroupGloo::allgather:
    invalid tensor size``), which NCCL takes (megatron's MoE alltoall dispatcher under TP)."""
    if world(group)[1] == 1:
        return tensor
    rows = max(sizes)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = all_gather(padded, group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def reduce_scatter(output: torch.Tensor, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` (``size x output.numel()`` elements) over ranks; rank ``r`` gets the ``r``-th
    contiguous chunk in ``output`` (the megatron distributed optimizer's gradient reduction)."""
    if world(group)[1] == 1:
        return output.copy_(tensor)
    dist.reduce_scatter_tensor(output, tensor.contiguous(), group=group)
    return output


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated in rank order into the flat ``output``."""
    if world(group)[1] == 1:
        return output.copy_(tensor.reshape(output.shape))
    dist.all_gather_into_tensor(output, tensor.contiguous(), group=group)
    return output


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    size = world(group)[1]
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int, group=None):
    """Global rank ``src``'s ``obj`` on every rank of ``group``."""
    if world(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def reduce_disjoint_(tensor: torch.Tensor, dst: int = 0, group=None) -> torch.Tensor:
    """A gather into one buffer: each element of the contiguous ``tensor`` is set on at most one
    rank (zeros elsewhere); afterwards global rank ``dst`` holds every rank's elements, bit for bit.
    The bytes are summed (a ``uint8`` view): ``x + 0`` is exact for every bit pattern (-0.0 and NaN
    included), which a float sum is not (``-0.0 + 0.0 = +0.0``); NCCL and gloo both sum ``uint8``.
    Other ranks' ``tensor`` is left undefined."""
    if world(group)[1] > 1:
        dist.reduce(tensor.view(torch.uint8), dst=dst, group=group)
    return tensor


def all_gather_json(obj, group=None) -> list:
    """Every rank's JSON-serialisable ``obj`` in rank order, moved as UTF-8 bytes in tensors (no
    pickle: what arrives is only ever parsed as JSON)."""
    if world(group)[1] == 1:
        return [json.loads(json.dumps(obj))]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [int(n) for n in all_gather(torch.tensor([data.numel()]), group)]
    joined = all_gather_uneven(data, sizes, group).numpy().tobytes()
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [json.loads(joined[a:a + n].decode()) for a, n in zip(starts, sizes)]


def send_object(obj, dst: int) -> None:
    dist.send_object_list([obj], dst)


def recv_object(src: int):
    box = [None]
    dist.recv_object_list(box, src)
    return box[0]


def barrier(group=None) -> None:
    if world(group)[1] > 1:
        dist.barrier(group=group)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
