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
def load_hf(model, hf_state: dict, hf_config) -> None:
    """Copy the full HF state dict into this rank's parameters (every parameter, strictly)."""
    where = layout()
    params = dict(model.named_parameters())
    tensors = convert.to_megatron(hf_state, list(params), hf_config, where["tp_rank"], where["tp"],
                                  layer_offset(model))
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: HF gives {tuple(tensors[name].shape)}, the megatron stage has {tuple(p.shape)}")
        p.copy_(tensors[name])


def _stage_owner_keys(model) -> list:
    """Per global rank: (pp_rank, tp_rank, dp_rank, exported parameter names)."""
    where = layout()
    keys = [k for k, _ in model.named_parameters()]
    mine = (where["pp_rank"], where["tp_rank"], where["dp_rank"], keys)
    return collectives.all_gather_object(mine)


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
    for stage in range(where["pp"]):
        sender = next(r for r, (p, t, d, _) in enumerate(table) if p == stage and t == 0 and d == 0)
        for key in table[sender][3]:
            if not convert.exported(key, hf_config):
                continue
            hf = None
            if where["pp_rank"] == stage and where["dp_rank"] == 0:
                shards = gather_tp_shards(params[key], convert.tp_dim(key) is not None)
                if where["tp_rank"] == 0:
                    hf = convert.to_hf(key, [s.cpu() for s in shards], hf_config, offset)
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
