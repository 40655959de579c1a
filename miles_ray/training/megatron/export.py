"""Weight export of the megatron backend, bucket by bucket: the engines get HF-named buckets that
are gathered and converted from the TP/PP shards as they are packed, so trainer rank 0 holds one
bucket (plus one parameter in flight) at a time, never the whole model.

:class:`HFStream` is what ``engine_state`` returns on *every* rank: the HF names, shapes and dtypes
of the export (known from meta-tensor conversion, no data moved). :func:`iter_buckets` is
collective: every rank drives the gathers of :func:`~miles_ray.training.megatron.weights.iter_hf` in the
same order; rank 0 packs and yields the buckets, the others yield nothing. The existing transports
(object store streaming, broadcast, shm) then move the buckets as for the FSDP backend.
"""
from __future__ import annotations

import torch

from miles_ray.training import collectives
from miles_ray.training.megatron import convert
from miles_ray.training.megatron.parallel import layout
from miles_ray.training.megatron.weights import iter_hf, layer_offset
from miles_ray.weights.buckets import Bucket, plan_buckets


def _stage_entries(model, hf_config) -> list:
    """(HF name, shape, dtype) of this stage's export, from meta tensors shaped like the shards."""
    where, offset = layout(), layer_offset(model)
    local = (getattr(hf_config, "num_experts", 0) or 0) // where["ep"]

    def meta():
        for key, p in model.named_parameters():
            if convert.exported(key, hf_config):
                expert = convert.is_expert(key)  # every EP rank's block of experts (expert-TP shards)
                n = (where["etp"] if expert else where["tp"]) if convert.tp_dim(key) is not None else 1
                shards = [torch.empty(p.shape, dtype=p.dtype, device="meta") for _ in range(n)]
                for first in range(0, local * where["ep"], local) if expert else [0]:
                    yield from convert.to_hf(key, shards, hf_config, offset, first).items()

    return [(name, tuple(t.shape), t.dtype) for name, t in convert.fuse_experts(meta(), hf_config)]


class HFStream:
    """The export's layout on every rank (collective to build); data comes from :func:`iter_buckets`."""

    def __init__(self, model, hf_config):
        self.model, self.hf_config = model, hf_config
        where = layout()
        mine = (where["pp_rank"], where["tp_rank"] == 0 and where["dp_rank"] == 0, _stage_entries(model, hf_config))
        table = collectives.all_gather_object(mine)
        self.entries = [e for _, _, entries in sorted((t for t in table if t[1]), key=lambda t: t[0]) for e in entries]


def iter_buckets(stream: HFStream, version: int, bucket_bytes: int):
    """Yield the export's buckets on rank 0 (collective; other ranks yield nothing)."""
    tensors = iter_hf(stream.model, stream.hf_config)
    if collectives.world()[0] != 0:
        for _ in tensors:  # drives this rank's part of the gathers
            pass
        return
    plans, pending = plan_buckets(stream.entries, bucket_bytes), {}
    for i, items in enumerate(plans):
        flat = torch.empty(sum(torch.Size(s).numel() for _, s, _ in items), dtype=items[0][2])
        entries, offset = [], 0
        for name, shape, _ in items:
            while name not in pending:
                got, tensor = next(tensors)
                pending[got] = tensor
            n = torch.Size(shape).numel()
            flat[offset:offset + n].copy_(pending.pop(name).reshape(-1))
            entries.append((name, shape, offset, n))
            offset += n
        yield Bucket(version, i, len(plans), items[0][2], flat, entries)
    for _ in tensors:  # finish the generator (no tensors left; closes the collectives' loop)
        pass
