"""Flatten a state dict into size-bounded, single-dtype buckets and load them back in place.

A bucket is ``{"version", "index", "count", "dtype", "flat", "entries": [(name, shape, offset, numel)]}``;
``flat`` is one contiguous 1-D tensor, so a bucket moves as one buffer whatever the transport.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass
class Bucket:
    version: int
    index: int
    count: int
    dtype: torch.dtype
    flat: torch.Tensor
    entries: list = field(default_factory=list)  # (name, shape, offset, numel)

    def __getstate__(self):
        # ship the data as a numpy byte array: Ray stores it zero-copy in the object store
        flat = self.flat.detach().cpu().contiguous()
        state = dict(self.__dict__, flat=flat.view(torch.uint8).numpy())
        return state

    def __setstate__(self, state):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we only ever copy out of it
            flat = torch.from_numpy(state["flat"]).view(state["dtype"])
        self.__dict__.update(state, flat=flat)

    def meta(self) -> dict:
        """Everything but the data (what a receiver needs to allocate and unpack)."""
        return {"version": self.version, "index": self.index, "count": self.count, "dtype": self.dtype,
                "numel": self.flat.numel(), "entries": self.entries}


def plan_buckets(named_shapes: list, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list]:
    """Group ``(name, shape, dtype)`` into buckets: same dtype, at most ``bucket_bytes`` each
    (a larger tensor gets a bucket of its own). Order is kept within a dtype."""
    groups: list[list] = []
    current: dict = {}
    for name, shape, dtype in named_shapes:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        cur = current.get(dtype)
        if cur is None or (cur["bytes"] + nbytes > bucket_bytes and cur["items"]):
            cur = {"items": [], "bytes": 0}
            current[dtype] = cur
            groups.append(cur["items"])
        cur["items"].append((name, tuple(shape), dtype))
        cur["bytes"] += nbytes
    return groups


def to_buckets(state_dict: dict, version: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               reuse: list[Bucket] | None = None) -> list[Bucket]:
    """Pack ``state_dict`` into buckets. ``reuse``: buckets of an earlier call with the same layout,
    whose buffers are overwritten (no fresh allocation: page faults cost more than the copy)."""
    return list(iter_buckets(state_dict, version, bucket_bytes, reuse))


def iter_buckets(state_dict: dict, version: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 reuse: list[Bucket] | None = None):
    """Like :func:`to_buckets`, one bucket at a time (a sender can ship bucket k while packing k+1)."""
    shapes = [(k, tuple(v.shape), v.dtype) for k, v in state_dict.items()]
    plans = plan_buckets(shapes, bucket_bytes)
    if reuse is not None and len(reuse) != len(plans):
        reuse = None
    for i, items in enumerate(plans):
        total = sum(torch.Size(s).numel() for _, s, _ in items)
        device = state_dict[items[0][0]].device
        old = reuse[i].flat if reuse is not None else None
        usable = old is not None and old.numel() == total and old.dtype == items[0][2] and old.device == device
        flat = old if usable else torch.empty(total, dtype=items[0][2], device=device)
        entries, offset = [], 0
        for name, shape, _ in items:
            n = torch.Size(shape).numel()
            src, dst = state_dict[name].reshape(-1), flat[offset:offset + n]
            if src.data_ptr() != dst.data_ptr() or src.device != dst.device:  # adopted buffers: already in place
                dst.copy_(src)
            entries.append((name, shape, offset, n))
            offset += n
        yield Bucket(version, i, len(plans), items[0][2], flat, entries)


def iter_tensors(bucket: Bucket):
    for name, shape, offset, n in bucket.entries:
        yield name, bucket.flat[offset:offset + n].view(shape)


def load_bucket(model: torch.nn.Module, bucket: Bucket, params: dict | None = None) -> int:
    """Copy a bucket's tensors into ``model`` in place (no reallocation). Returns tensors loaded."""
    return load_named(model, iter_tensors(bucket), params)


def load_named(model: torch.nn.Module, named, params: dict | None = None) -> int:
    """Copy ``(name, tensor)`` pairs into ``model`` in place; KeyError / ValueError name the
    weight that does not exist or does not fit. Returns tensors loaded."""
    params = params if params is not None else dict(model.state_dict(keep_vars=True))
    loaded = 0
    with torch.no_grad():
        for name, tensor in named:
            if name not in params:
                raise KeyError(f"weight '{name}' from the trainer does not exist in the rollout model")
            target = params[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight '{name}': trainer shape {tuple(tensor.shape)} != engine {tuple(target.shape)}")
            target.data.copy_(tensor)
            loaded += 1
    return loaded


def check_complete(model: torch.nn.Module, names: set) -> None:
    """Every parameter of the model must have been sent (tied weights count as sent)."""
    seen_storage = {p.data_ptr() for n, p in model.state_dict(keep_vars=True).items() if n in names}
    missing = [n for n, p in model.state_dict(keep_vars=True).items()
               if n not in names and p.data_ptr() not in seen_storage]
    if missing:
        raise ValueError(f"weight update is missing {missing[:5]}")
