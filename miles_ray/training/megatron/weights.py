"""Load HF weights into this rank's megatron stage, and gather them back as HF tensors.

:func:`iter_hf` is collective over the whole world and yields on global rank 0 only, one
megatron parameter at a time: the owning stage's TP group all-gathers that parameter's shards, its
TP rank 0 converts them to HF names and sends them to rank 0 (point-to-point), so no rank ever
holds more than one full parameter besides what the caller keeps.
"""
from __future__ import annotations

import torch

from miles_ray.training import collectives
from miles_ray.training.megatron import convert
from miles_ray.training.megatron.parallel import gather_tp_shards, layout


def layer_offset(model) -> int:
    """Global index of this stage's first decoder layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


@torch.no_grad()
def load_hf(model, hf_state: dict, hf_config) -> dict:
    """Copy the full HF state dict into this rank's parameters (every parameter, strictly); returns
    this rank's converted tensors by megatron name (before any cast to the model dtype)."""
    where = layout()
    params = dict(model.named_parameters())
    tensors = convert.to_megatron(hf_state, list(params), hf_config, where["tp_rank"], where["tp"],
                                  layer_offset(model), experts_of(hf_config))
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: HF gives {tuple(tensors[name].shape)}, the megatron stage has {tuple(p.shape)}")
        p.copy_(tensors[name])
    return tensors  # in the HF dtype: the distributed optimizer's fp32 main weights start from them


def experts_of(hf_config) -> convert.Experts:
    """This rank's experts (expert parallelism: a contiguous block of ``experts / ep``)."""
    where = layout()
    local = (getattr(hf_config, "num_experts", 0) or 0) // where["ep"]
    return convert.Experts(where["ep_rank"] * local, where["etp_rank"], where["etp"])


def _stage_owner_keys(model) -> list:
    """Per global rank: (pp_rank, tp_rank, dp_rank, exported parameter names, (ep_rank, etp_rank,
    expert-dp rank))."""
    where = layout()
    keys = [k for k, _ in model.named_parameters()]
    mine = (where["pp_rank"], where["tp_rank"], where["dp_rank"], keys,
            (where["ep_rank"], where["etp_rank"], where["edp_rank"]))
    return collectives.all_gather_object(mine)


def _owners(table: list, stage: int, key: str, where: dict, local_experts: int):
    """(sender rank, whether this rank joins the shard gather, expert offset) per copy of ``key``
    to export: one for a dense parameter; one per EP rank for an expert's (each holds its block)."""
    if not convert.is_expert(key):
        sender = next(r for r, (p, t, d, *_) in enumerate(table) if p == stage and t == 0 and d == 0)
        yield sender, where["pp_rank"] == stage and where["dp_rank"] == 0, 0
        return
    for ep_rank in range(where["ep"]):
        sender = next(r for r, (p, *_, e) in enumerate(table) if p == stage and e == (ep_rank, 0, 0))
        joins = where["pp_rank"] == stage and where["ep_rank"] == ep_rank and where["edp_rank"] == 0
        yield sender, joins, ep_rank * local_experts


def iter_hf(model, hf_config):
    """Collective on every rank; yields ``(hf_name, tensor)`` on global rank 0 (nothing elsewhere)
    in pipeline-stage order; tied output layers are skipped (HF ties them); MoE experts come as
    HF's fused per-layer tensors."""
    yield from convert.fuse_experts(_iter_parts(model, hf_config), hf_config)


@torch.no_grad()
def _iter_parts(model, hf_config):
    where, me = layout(), collectives.world()[0]
    table = _stage_owner_keys(model)
    params, offset = dict(model.named_parameters()), layer_offset(model)
    local_experts = (getattr(hf_config, "num_experts", 0) or 0) // where["ep"]
    for stage in range(where["pp"]):
        first = next(r for r, (p, t, d, *_) in enumerate(table) if p == stage and t == 0 and d == 0)
        for key, (sender, joins, experts) in ((k, o) for k in table[first][3] if convert.exported(k, hf_config)
                                              for o in _owners(table, stage, k, where, local_experts)):
            hf, expert = None, convert.is_expert(key)
            if joins:
                shards = gather_tp_shards(params[key], convert.tp_dim(key) is not None, expert)
                if me == sender:
                    hf = convert.to_hf(key, [s.cpu() for s in shards], hf_config, offset, experts)
            if sender != 0 and me in (0, sender):
                if me == sender:
                    collectives.send_object(hf, 0)
                else:
                    hf = collectives.recv_object(sender)
            if me == 0:
                yield from hf.items()


def gather_hf_state(model, hf_config) -> dict | None:
    """The full HF state dict on rank 0 (None elsewhere); collective."""
    out = dict(iter_hf(model, hf_config))
    return out if collectives.world()[0] == 0 else None
