"""Megatron-backend checkpoints through megatron-core's distributed checkpointing
(``dist_checkpointing``, torch_dist format): every TP/PP shard is saved with its global offsets
(``model.sharded_state_dict()``), DP replicas write once, so a folder is resumable.

The optimizer is a plain ``torch.optim.AdamW``: its per-parameter moments are saved as sharded
tensors laid out like their parameters (``optim_state_to_sharding_state``); Adam's ``step`` (the
same for every parameter) and the trainer counters go to ``counters.json`` (rank 0). Before a load
a never-stepped optimizer gets zero moments, so the sharded load has tensors to fill.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from miles_ray.training import collectives


def _adam_step(optimizer) -> float:
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _init_state(optimizer) -> None:
    """Zero moments for every parameter (AdamW creates them lazily on its first step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def _sharded(model, optimizer) -> dict:
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    model_sd = model.sharded_state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    optim_sd = optimizer.state_dict()
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    return {"model": model_sd, "optimizer": optim_sd}


def save(folder: str | Path, model, optimizer, counters: dict) -> None:
    """Collective over every trainer rank."""
    from megatron.core import dist_checkpointing

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _init_state(optimizer)
    dist_checkpointing.save(_sharded(model, optimizer), str(folder))
    if collectives.world()[0] == 0:
        (folder / "counters.json").write_text(json.dumps({**counters, "adam_step": _adam_step(optimizer)}))
    collectives.barrier()


def load(folder: str | Path, model, optimizer) -> dict:
    """Collective: the saved shards into this rank's model and optimizer; returns the counters."""
    from megatron.core import dist_checkpointing

    _init_state(optimizer)
    loaded = dist_checkpointing.load(_sharded(model, optimizer), str(folder))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    if [k for k in missing if not k.endswith("_extra_state")] or unexpected:
        raise ValueError(f"megatron checkpoint {folder}: missing {missing}, unexpected {unexpected}")
    counters = json.loads((Path(folder) / "counters.json").read_text())
    optim = loaded["optimizer"]
    for state in optim["state"].values():
        state["step"] = torch.tensor(counters["adam_step"])
    optimizer.load_state_dict(optim)
    return counters
