"""Load HF weights into this rank's megatron stage (the way back, HF export and weight sync, is
:mod:`~miles_ray.training.megatron.export`: bucketed tensor collectives).

``hf_state`` is any mapping: the full state dict, or :class:`~miles_ray.training.megatron.hf_files.LazyHF`
(sharded loading: only this rank's TP / PP / EP slices are read from the safetensors files).
"""
from __future__ import annotations

import torch

from miles_ray.training.megatron import convert
from miles_ray.training.megatron.parallel import layout


def layer_offset(model) -> int:
    """Global index of this stage's first decoder layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


@torch.no_grad()
def load_hf(model, hf_state: dict, hf_config) -> dict:
    """Copy this rank's slices of the HF state into its parameters (every parameter, strictly); returns
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
