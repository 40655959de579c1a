"""Weight export of the megatron backend, bucket by bucket, with tensor collectives only.

:class:`HFStream` (what ``engine_state`` returns on *every* rank) is the export's plan: the
*units* in HF order, one per exported megatron parameter and copy (an expert parameter: one per EP
rank, each holding its block of experts), with the global rank that describes it (*sender*: TP
rank 0 of the owning stage's DP rank 0; for experts the expert-TP rank 0 of expert-DP rank 0 of
each EP rank) and the HF tensors it produces (``<name>@<e>``: expert ``e``'s slice of a fused tensor).
The ranks exchange their parts of the plan once, as JSON bytes in a tensor all-gather
(:func:`~miles_ray.training.collectives.all_gather_json`; no pickle).

:func:`iter_buckets` is collective; per bucket of at most ``bucket_bytes`` (whole HF tensors, as
:func:`~miles_ray.weights.buckets.plan_buckets` lays them out), every rank:
1. allocates the bucket's flat buffer, zeros;
2. for each unit with an output in the bucket, each rank of the unit's TP (expert-TP) group
   writes its own shard, converted (:func:`convert.shard_to_hf`: rows / columns of the HF
   tensors), at its place in the buffer (a unit straddling two buckets writes its part in each);
3. :func:`~miles_ray.training.collectives.reduce_disjoint_` to rank 0 (a byte-exact gather of the
   disjoint parts into rank 0's buffer), which yields the :class:`Bucket`.

So no full parameter is ever assembled outside the bucket: rank 0 holds one bucket plus the
reduction's own buffers (peak measured: ``export_peak_over_bucket`` in the benchmark).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from miles_ray.training import collectives
from miles_ray.training.megatron import convert
from miles_ray.training.megatron.parallel import layout
from miles_ray.training.megatron.weights import layer_offset
from miles_ray.weights.buckets import Bucket, plan_buckets

DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16)}


@dataclass(frozen=True)
class Unit:
    """One megatron parameter copy to convert: ``ep`` is the EP rank of an expert's (-1: dense)."""
    stage: int
    key: str
    ep: int
    sender: int
    outputs: tuple  # ((hf name or "<name>@<e>", shape), ...)


def _outputs(key: str, p: torch.Tensor, hf_config, offset: int, expert_offset: int, where: dict) -> list:
    """(HF name, shape) of what parameter ``key`` converts to, from meta tensors shaped like the shards."""
    expert = convert.is_expert(key)
    n = (where["etp"] if expert else where["tp"]) if convert.tp_dim(key) is not None else 1
    shards = [torch.empty(p.shape, dtype=p.dtype, device="meta") for _ in range(n)]
    return [[k, list(t.shape)] for k, t in convert.to_hf(key, shards, hf_config, offset, expert_offset).items()]


def _my_part(model, hf_config) -> dict:
    """This rank's part of the plan: its coordinates, its exported keys in order, and the outputs
    of the units it sends (dense ones as TP rank 0 of DP rank 0, expert ones as expert-TP rank 0
    of expert-DP rank 0)."""
    where, offset = layout(), layer_offset(model)
    local = (getattr(hf_config, "num_experts", 0) or 0) // where["ep"]
    dense = where["tp_rank"] == 0 and where["dp_rank"] == 0
    experts = where["etp_rank"] == 0 and where["edp_rank"] == 0
    keys, units = [], {}
    for key, p in model.named_parameters():
        if not convert.exported(key, hf_config):
            continue
        keys.append(key)
        if experts if convert.is_expert(key) else dense:
            units[key] = _outputs(key, p, hf_config, offset, where["ep_rank"] * local, where)
    return {"rank": collectives.world()[0], "pp": where["pp_rank"], "ep": where["ep_rank"], "dense": dense,
            "experts": experts, "keys": keys, "units": units, "dtype": str(next(model.parameters()).dtype)}


def _units(parts: list, pp: int, ep: int) -> list:
    """The units of every stage in HF order (stage, then parameter, then EP rank)."""
    out = []
    for stage in range(pp):
        first = next(p for p in parts if p["pp"] == stage and p["dense"])
        for key in first["keys"]:
            senders = ([next(p for p in parts if p["pp"] == stage and p["experts"] and p["ep"] == e) for e in range(ep)]
                       if convert.is_expert(key) else [first])
            for e, s in enumerate(senders):
                out.append(Unit(stage, key, e if convert.is_expert(key) else -1, s["rank"],
                                tuple((n, torch.Size(shape)) for n, shape in s["units"][key])))
    return out


class HFStream:
    """The export's plan on every rank (collective to build; no data moved): :attr:`units` and
    :attr:`entries` (HF name, shape, dtype) in export order; data comes from :func:`iter_buckets`."""

    def __init__(self, model, hf_config):
        self.model, self.hf_config = model, hf_config
        where = layout()
        parts = collectives.all_gather_json(_my_part(model, hf_config))
        self.dtype = DTYPES[parts[0]["dtype"]]
        self.units = _units(parts, where["pp"], where["ep"])
        self.entries, self.slot = _entries(self.units, self.dtype)
        self.to_cpu = True

    def placed(self, to_cpu: bool) -> "HFStream":
        """This plan with buckets handed over on the CPU (``to_cpu``) or on the parameters' device."""
        out = copy.copy(self)
        out.to_cpu = to_cpu
        return out

    def joins(self, unit: Unit, where: dict) -> bool:
        """Whether this rank takes part in ``unit``'s shard gather (its TP / expert-TP group)."""
        if unit.ep < 0:
            return where["pp_rank"] == unit.stage and where["dp_rank"] == 0
        return where["pp_rank"] == unit.stage and where["ep_rank"] == unit.ep and where["edp_rank"] == 0


def _entries(units: list, dtype) -> tuple:
    """(HF entries in order, output name -> (HF name, element offset inside that tensor)): an
    expert's slice ``<name>@<e>`` sits at ``e x slice`` inside the fused ``[E, ...]`` tensor."""
    shapes, slot = {}, {}
    for unit in units:
        for name, shape in unit.outputs:
            base, _, e = name.partition("@")
            if e:
                count = shapes.get(base, (0,))[0]
                shapes[base] = (max(count, int(e) + 1), *shape)
                slot[name] = (base, int(e) * torch.Size(shape).numel())
            else:
                shapes[base], slot[name] = tuple(shape), (base, 0)
    return [(name, shape, dtype) for name, shape in shapes.items()], slot


def _layout(stream: HFStream, bucket_bytes: int) -> list:
    """Per bucket: (its entries ``(name, shape, offset, numel)``, HF name -> offset, its units)."""
    out = []
    for items in plan_buckets(stream.entries, bucket_bytes):
        entries, offsets, at = [], {}, 0
        for name, shape, _ in items:
            n = torch.Size(shape).numel()
            entries.append((name, shape, at, n))
            offsets[name] = at
            at += n
        units = [u for u in stream.units if any(stream.slot[o][0] in offsets for o, _ in u.outputs)]
        out.append((entries, offsets, units))
    return out


@torch.no_grad()
def _fill(stream: HFStream, flat: torch.Tensor, offsets: dict, units: list, where: dict) -> None:
    """Each rank of a unit's TP (expert-TP) group writes its own shard, converted, at its place in
    ``flat`` (:func:`convert.shard_to_hf`): no gather of shards, no full parameter anywhere."""
    params, offset = dict(stream.model.named_parameters()), layer_offset(stream.model)
    local = (getattr(stream.hf_config, "num_experts", 0) or 0) // where["ep"]
    for unit in units:
        if not stream.joins(unit, where):
            continue
        expert, shapes = unit.ep >= 0, dict(unit.outputs)
        rank, size = (where["etp_rank"], where["etp"]) if expert else (where["tp_rank"], where["tp"])
        for name, index, t in convert.shard_to_hf(unit.key, params[unit.key].detach(), stream.hf_config, offset,
                                                  rank, size, max(unit.ep, 0) * local):
            base, inner = stream.slot[name]
            if base in offsets:
                start = offsets[base] + inner
                flat[start:start + shapes[name].numel()].view(shapes[name])[index].copy_(t)


def iter_buckets(stream: HFStream, version: int, bucket_bytes: int, to_cpu: bool = True):
    """Yield the export's buckets on rank 0 (collective; other ranks yield nothing)."""
    where, me = layout(), collectives.world()[0]
    device = next(stream.model.parameters()).device
    plans = _layout(stream, bucket_bytes)
    for i, (entries, offsets, units) in enumerate(plans):
        flat = torch.zeros(sum(n for *_, n in entries), dtype=stream.dtype, device=device)
        _fill(stream, flat, offsets, units, where)
        collectives.reduce_disjoint_(flat, 0)
        if me == 0:
            yield Bucket(version, i, len(plans), stream.dtype, flat.cpu() if to_cpu else flat, entries)
        del flat


def gather_hf_state(stream: HFStream, bucket_bytes: int = 256 << 20) -> dict | None:
    """The full HF state dict on rank 0 (None elsewhere), through the same buckets; collective."""
    from miles_ray.weights.buckets import iter_tensors

    state = {name: t for b in iter_buckets(stream, 0, bucket_bytes) for name, t in iter_tensors(b)}
    return state if collectives.world()[0] == 0 else None
